"""The data layer: manifests and trial lists (svlab.manifests), audio files (svlab.audio) and MFCC
features (svlab.features), the datasets' collate functions. The datasets themselves and the augmented
copies: test_augment.py; faults: test_faults.py.

Expected values are computed independently in the tests, never copied from the code's output.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import dataset
from svlab import audio, checkpoint, config, embedding, features, manifests
from svlab.errors import DataError


# =========================================================================== manifests and trials
def test_backslash_relpaths_give_the_same_keys(tmp_path):
    fwd, back = tmp_path / "fwd.txt", tmp_path / "back.txt"
    fwd.write_text("S0001 S0001/S0001W0001.wav\nS0002 ./S0002/S0002W0003.wav\n", encoding="utf-8")
    back.write_text("S0001 S0001\\S0001W0001.wav\nS0002 .\\S0002\\S0002W0003.wav\n", encoding="utf-8")
    keys_fwd = [u.relpath for u in manifests.read_manifest(fwd)]
    keys_back = [u.relpath for u in manifests.read_manifest(back)]
    assert keys_fwd == keys_back == ["S0001/S0001W0001.wav", "S0002/S0002W0003.wav"]

    tf, tb = tmp_path / "trials_fwd.txt", tmp_path / "trials_back.txt"
    tf.write_text("S0001/S0001W0001.wav S0002/S0002W0003.wav 0\n", encoding="utf-8")
    tb.write_text("S0001\\S0001W0001.wav S0002\\S0002W0003.wav 0\n", encoding="utf-8")
    a, b = manifests.read_trials(tf)[0], manifests.read_trials(tb)[0]
    assert (a.enroll, a.test, a.label) == (b.enroll, b.test, b.label)
    assert a.enroll in keys_fwd and a.test in keys_fwd


def test_duplicate_detection_sees_through_separators(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text("S0001 S0001/a.wav\nS0001 S0001\\a.wav\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        manifests.read_manifest(path)


def test_manifest_errors_listed_together_with_file_and_lines(tmp_path):
    path = tmp_path / "train_list.txt"
    path.write_text("S1 S1/a.wav\n"
                    "lonely_field\n"
                    "S1 S1/b.wav\n"
                    "S2 S1/a.wav\n"
                    "\n"
                    "also_alone\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        manifests.read_manifest(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "3 bad line" in msg
    for line in ("line 2", "line 4", "line 6"):
        assert line in msg
    assert "line 1" in msg  # the duplicate names where the file was first listed
    assert "line 3" not in msg


def test_manifest_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "win_manifest.txt"
    path.write_bytes(b"\xef\xbb\xbfS0001 S0001\\a.wav\r\n\r\n  \r\nS0002 S0002\\b.wav\r\n\r\n")
    utts = manifests.read_manifest(path)
    assert [(u.speaker, u.relpath, u.line) for u in utts] == [("S0001", "S0001/a.wav", 1),
                                                              ("S0002", "S0002/b.wav", 4)]


def test_manifest_missing_empty_and_not_utf8(tmp_path):
    with pytest.raises(DataError, match="data.train_manifest"):
        manifests.read_manifest(tmp_path / "nope.txt", key="data.train_manifest")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt"):
        manifests.read_manifest(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("S1 caf\u00e9.wav\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        manifests.read_manifest(latin)


def test_manifest_problem_list_is_capped(tmp_path):
    path = tmp_path / "many_bad.txt"
    path.write_text("".join(f"bad{i}\n" for i in range(25)), encoding="utf-8")
    with pytest.raises(DataError) as err:
        manifests.read_manifest(path)
    msg = str(err.value)
    assert "25 bad line" in msg and "5 more" in msg and "line 20" in msg and "line 21:" not in msg


def test_trial_errors_listed_together(tmp_path):
    path = tmp_path / "my_trials.txt"
    path.write_text("a.wav b.wav 1\n"
                    "a.wav c.wav 2\n"
                    "a.wav c.wav\n"
                    "b.wav c.wav yes\n"
                    "a.wav b.wav 0 extra\n"
                    "b.wav a.wav 0\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        manifests.read_trials(path)
    msg = str(err.value)
    assert str(path) in msg and "4 bad line" in msg
    for line in ("line 2", "line 3", "line 4", "line 5"):
        assert line in msg
    assert "'2'" in msg and "'yes'" in msg


def test_trials_bom_crlf_blank_lines(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_bytes(b"\xef\xbb\xbfS1\\a.wav S2\\b.wav 1\r\n\r\nS1\\a.wav S3\\c.wav 0\r\n")
    trials = manifests.read_trials(path)
    assert [(t.enroll, t.test, t.label, t.line) for t in trials] == [
        ("S1/a.wav", "S2/b.wav", 1, 1), ("S1/a.wav", "S3/c.wav", 0, 3)]
    empty = tmp_path / "no_trials.txt"
    empty.write_text("\r\n", encoding="utf-8")
    with pytest.raises(DataError, match="no trials"):
        manifests.read_trials(empty)


# =========================================================================== audio
def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_load_audio_mono_16k(tmp_path):
    wav = _tone(0.5, 16000)
    path = tmp_path / "mono.wav"
    sf.write(path, wav, 16000, subtype="FLOAT")
    out = audio.load_audio(path, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_allclose(out, wav, atol=1e-7)


def test_load_audio_bad_files_name_the_file(tmp_path):
    cases = {}
    cases["missing.wav"] = tmp_path / "missing.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cases["empty.wav"] = empty
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).bytes(3000))
    cases["noise.wav"] = noise
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    cases["silent.wav"] = silent
    nan = tmp_path / "nan.wav"
    data = _tone(0.1, 16000)
    data[10] = np.nan
    sf.write(nan, data, 16000, subtype="FLOAT")
    cases["nan.wav"] = nan
    for name, path in cases.items():
        with pytest.raises(DataError) as err:
            audio.load_audio(path, 16000)
        assert name in str(err.value), str(err.value)


def test_load_audio_stereo_is_averaged(tmp_path):
    left, right = _tone(0.25, 16000, 300.0), _tone(0.25, 16000, 1000.0) * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    out = audio.load_audio(path, 16000)
    assert out.shape == left.shape
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)


def test_load_audio_resamples_8k_to_16k(tmp_path):
    path = tmp_path / "phone.wav"
    sf.write(path, _tone(1.0, 8000, 300.0), 8000, subtype="PCM_16")
    out = audio.load_audio(path, 16000)
    assert abs(out.size - 16000) <= 1
    # still a 300 Hz tone at the new rate
    spectrum = np.abs(np.fft.rfft(out[:16000] if out.size >= 16000 else np.pad(out, (0, 16000 - out.size))))
    assert np.argmax(spectrum) == pytest.approx(300, abs=2)


def test_mfcc_shape_and_mean_normalisation():
    feat_cfg = config.load_config(None, {"features.n_mfcc": 20})["features"]
    wav = _tone(1.0, 16000) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    feats = features.mfcc(wav, feat_cfg)
    assert feats.dtype == np.float32 and feats.shape[0] == 20
    assert abs(feats.shape[1] - 100) <= 1  # 10 ms hop: about 100 frames per second
    np.testing.assert_allclose(feats.mean(axis=1), 0.0, atol=1e-4)


def test_mfcc_without_mean_normalisation_keeps_the_channel():
    feat_cfg = config.load_config(None, {"features.n_mfcc": 20, "features.mean_norm": False})["features"]
    wav = _tone(1.0, 16000) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    raw = features.mfcc(wav, feat_cfg)
    normalised = features.mfcc(wav, {**feat_cfg, "mean_norm": True})
    # the only difference is the per-coefficient utterance mean, which is far from 0 for c0
    np.testing.assert_allclose(raw - raw.mean(axis=1, keepdims=True), normalised, atol=1e-3)
    assert abs(raw[0].mean()) > 10.0
    np.testing.assert_array_equal(features.mfcc(wav, feat_cfg, mean_norm=True), normalised)
    # a fixed channel (a 6 dB gain) moves the raw c0 by a constant and leaves normalised MFCCs alone
    louder = features.mfcc(2.0 * wav, feat_cfg)
    shift = louder[0] - raw[0]
    assert shift.std() < 0.05 * abs(shift.mean()) and abs(shift.mean()) > 1.0
    np.testing.assert_allclose(features.mfcc(2.0 * wav, {**feat_cfg, "mean_norm": True}), normalised, atol=1e-2)


@pytest.mark.parametrize("n_mels,n_mfcc,fmax", [(40, 40, 7600), (80, 80, 8000), (64, 20, 4000)])
def test_mfcc_equals_librosa_mfcc_of_the_waveform(n_mels, n_mfcc, fmax):
    # features.mfcc unrolls librosa.feature.mfcc(y=...) to cache the filterbank: same numbers
    import librosa
    feat_cfg = config.load_config(None, {"features.n_mfcc": n_mfcc, "features.n_mels": n_mels,
                                         "features.fmax": fmax, "features.mean_norm": False})["features"]
    wav = np.random.default_rng(n_mels).standard_normal(23_456).astype(np.float32) * 0.1
    ref = librosa.feature.mfcc(y=wav, sr=16000, n_mfcc=n_mfcc, n_fft=512, hop_length=160, win_length=400,
                               n_mels=n_mels, fmin=feat_cfg["fmin"], fmax=min(fmax, 8000))
    for _ in range(2):  # the second call uses the cached filterbank
        np.testing.assert_allclose(features.mfcc(wav, feat_cfg), ref, rtol=0, atol=1e-4)
    assert features._mel_filterbank.cache_info().hits >= 1


def test_mean_norm_is_part_of_the_feature_signature_and_legacy_checkpoints_used_it():
    cfg = config.load_config(None, {})
    assert cfg["features"]["mean_norm"] is True
    sig = features.feature_signature(cfg["features"])
    assert sig["mean_norm"] is True
    legacy = {k: v for k, v in cfg["features"].items() if k != "mean_norm"}
    assert features.feature_signature(legacy) == sig  # written before the key existed: normalised
    off = config.load_config(None, {"features.mean_norm": False})
    assert features.feature_signature(off["features"]) != sig
    # a checkpoint from before the key is evaluated with normalisation, whatever the config says ...
    state = {"config": {"features": legacy}}
    assert embedding.checkpoint_features(off, state, log=lambda *a: None)["mean_norm"] is True
    # ... and asking for the other setting explicitly is reported as a mismatch
    assert checkpoint.describe_mismatch(state["config"], off, sections=("features",)) == [
        "features.mean_norm: checkpoint True vs config False"]


def test_repeat_to_pads_short_utterances():
    feat = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = features.repeat_to(feat, 7)
    assert out.shape[1] >= 7
    np.testing.assert_array_equal(out[:, :7], feat[:, [0, 1, 2, 0, 1, 2, 0]])
    assert features.repeat_to(feat, 2) is feat


def test_equal_length_batches_group_identical_lengths():
    lengths = [5, 3, 5, 5, 3, 7]
    batches = features.equal_length_batches(lengths, 2)
    assert batches == [[1, 4], [0, 2], [3], [5]]  # shortest first, at most 2 per batch, in input order


def test_equal_length_batches_hold_at_most_max_frames():
    lengths = [100] * 7 + [250] * 3 + [1000, 40]
    batches = features.equal_length_batches(lengths, 64, max_frames=300)
    assert batches == [[11], [0, 1, 2], [3, 4, 5], [6], [7], [8], [9], [10]]
    # no batch over the budget unless one utterance is longer than it; every utterance once
    assert all(len(b) == 1 or sum(lengths[i] for i in b) <= 300 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert features.equal_length_batches([10] * 5, 64, max_frames=10 ** 6) == [[0, 1, 2, 3, 4]]


def test_the_library_frame_budget_is_the_shipped_config_default():
    # BATCH_FRAMES serves library callers without a configuration; the commands read test.batch_frames
    assert config.load_config()["test"]["batch_frames"] == features.BATCH_FRAMES


# =========================================================================== datasets
def test_collate_functions_stack_and_pad():
    x, y = dataset.SpkTrainDataset.collate_fn([(torch.zeros(3, 4), 1), (torch.ones(3, 4), 0)])
    assert x.shape == (2, 3, 4) and torch.equal(x[1], torch.ones(3, 4))
    assert y.dtype == torch.long and y.tolist() == [1, 0]
    feats = [torch.full((3, n), float(n)) for n in (4, 2, 5)]
    out, lengths, keys = dataset.SpkTestDataset.collate_fn(list(zip(feats, ["a", "b", "c"])))
    assert out.shape == (3, 3, 5) and lengths.tolist() == [4, 2, 5] and keys == ["a", "b", "c"]
    for j, f in enumerate(feats):
        assert torch.equal(out[j, :, :f.shape[1]], f) and not out[j, :, f.shape[1]:].any()  # zero padding

"""The Python API (issue 22.2, 22.5): ``svlab.SpeakerEncoder`` on a .pth checkpoint, the pretrained
model's loader, bad input. The ONNX side (export, parity, the torch-free path, docs/api.md) is in
tests/test_onnx.py, which builds its checkpoint with ``tiny_run`` from here.

The checkpoint is a tiny x-vector with random weights (no training: the API's behaviour does not depend
on what the weights learned), evaluated by ``EER.py`` on the tiny corpus, with a calibration.
"""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

import EER
import similarity
import verify
from conftest import quiet, tiny_overrides, nest
from svlab import config, encoder
from svlab.checkpoint import save_checkpoint
from svlab.errors import CheckpointError, DataError, LabError, VerifyError
from svlab.features import feature_dim, feature_signature
from svlab.models import build_model, describe


def tiny_checkpoint(tiny_corpus, work, extra: dict | None = None, epoch: int = 30):
    """A random-weight checkpoint ``work/saved_model/000/checkpoint_<epoch>.pth`` of the tiny config
    (``extra``: other settings); ``(cfg, checkpoint, cfg_file)``."""
    overrides = tiny_overrides(tiny_corpus, work, {"train.save_dir": str(work / "saved_model"), **(extra or {})})
    cfg = config.load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg["model"], feature_dim(cfg["features"]))
    ckpt = work / "saved_model" / "000" / f"checkpoint_{epoch:03d}.pth"
    save_checkpoint({"epoch": epoch, "model_state": model.state_dict(), "config": config.public_config(cfg),
                     "speakers": [f"S{i}" for i in range(8)], "history": [],
                     "tag": describe(cfg["model"], cfg["loss"]), "features": feature_signature(cfg["features"])}, ckpt)
    cfg_file = work / "tiny.yaml"
    cfg_file.write_text(json.dumps(nest(overrides)), encoding="utf-8")  # JSON is YAML
    return cfg, ckpt, cfg_file


def tiny_run(tiny_corpus, work, extra: dict | None = None, calibrate: bool = False):
    """``tiny_checkpoint`` evaluated by EER.py on the tiny trial list (``calibrate``: with a calibration)."""
    cfg, ckpt, cfg_file = tiny_checkpoint(tiny_corpus, work, extra)
    args = ["--config", str(cfg_file), "--checkpoint", str(ckpt)] + (["--calibrate"] if calibrate else [])
    assert EER.main(args) == 0
    return cfg, ckpt, cfg_file


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("encoder")
    cfg, ckpt, cfg_file = tiny_run(tiny_corpus, work, calibrate=True)
    wavs = sorted(tiny_corpus.root.rglob("*.wav"))
    return dict(cfg=cfg, ckpt=ckpt, cfg_file=cfg_file, work=work, wavs=wavs, enc=encoder.SpeakerEncoder.from_checkpoint(ckpt))


def test_embed_files_arrays_and_batches_like_the_lab_commands(run):
    from svlab.embedding import checkpoint_features, embed_files
    from svlab.models import model_from_checkpoint
    enc, wavs = run["enc"], run["wavs"][:5]
    one = enc.embed(wavs[0])
    many = enc.embed(wavs)
    assert one.shape == (16,) and many.shape == (5, 16) and many.dtype == np.float32
    np.testing.assert_array_equal(many[0], one)
    assert abs(float(np.linalg.norm(one)) - 1.0) > 1e-3  # raw, not length-normalised
    state = torch.load(run["ckpt"], weights_only=True)  # what EER.py and tools/extract.py compute
    ref, _, _ = embed_files(model_from_checkpoint(state), wavs, checkpoint_features(run["cfg"], state, quiet, cache=False),
                            log=quiet)
    np.testing.assert_allclose(many, ref, atol=1e-5)
    # a numpy array with its rate; int16 stereo at 44.1 kHz (either axis order) is the same recording
    wav, sr = sf.read(wavs[0], dtype="float32")
    np.testing.assert_allclose(enc.embed(wav, sample_rate=sr), one, atol=1e-6)
    import librosa
    hi = librosa.resample(wav, orig_sr=sr, target_sr=44100)
    pcm = (np.stack([hi, hi], axis=1) * 32767).astype(np.int16)
    for arr in (pcm, pcm.T):
        e = enc.embed(arr, sample_rate=44100)
        assert float(e @ one / np.linalg.norm(e) / np.linalg.norm(one)) > 0.98


def test_a_long_list_is_embedded_a_chunk_at_a_time_with_the_same_result(run, monkeypatch, tmp_path):
    enc, wavs = run["enc"], run["wavs"][:7]
    whole = enc.embed(wavs)
    held = []
    real_model = enc._model
    monkeypatch.setattr(enc, "_model", lambda feats, bs: held.append(len(feats)) or real_model(feats, bs))
    monkeypatch.setattr(encoder, "EMBED_CHUNK", 3)
    np.testing.assert_allclose(enc.embed(wavs), whole, atol=1e-6)
    assert held == [3, 3, 1]  # never more than a chunk's features at once
    # an unusable recording in a later chunk is still named, with the others of the list
    text = tmp_path / "late.wav"
    text.write_text("not audio")
    with pytest.raises(DataError, match=r"^2 unusable recording\(s\): .*late\.wav.*late\.wav"):
        enc.embed([*wavs, text, text])


def test_similarity_verify_threshold_and_llr_come_from_the_checkpoints_evaluation(run):
    enc, (a, b) = run["enc"], (run["wavs"][0], run["wavs"][9])
    ea, eb = enc.embed(a), enc.embed(b)
    cos = float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb))
    assert enc.similarity(a, b) == pytest.approx(cos, abs=1e-6)
    assert enc.similarity(a, a) == pytest.approx(1.0, abs=1e-6)
    r = enc.verify(a, b)
    entries = json.loads((run["ckpt"].parent / "evaluations.json").read_text())[run["ckpt"].name]
    latest = entries[-1]  # the calibrated cosine evaluation: same system, calibration aside
    assert r.threshold == pytest.approx(latest["threshold"]) and r.accepted == (r.score >= r.threshold)
    assert r.threshold_source.startswith("EER threshold of evaluation") and "eval_030_cal" in r.threshold_source
    assert "trials.txt" in r.threshold_source
    # the same score, threshold and LLR as tools/verify.py
    ref = verify.verify(run["cfg"], run["ckpt"], [a], [b], out=quiet)
    assert r.score == pytest.approx(ref["score"], abs=1e-5) and r.threshold == pytest.approx(ref["threshold"])
    assert r.llr is not None and r.llr == pytest.approx(ref["llr"], abs=1e-4)
    mine = enc.verify(a, b, threshold=2.0)
    assert not mine.accepted and mine.threshold_source == "given by the caller"


def test_no_config_file_is_read(run, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the API read a config file")
    monkeypatch.setattr(config, "load_config", refuse)
    monkeypatch.setattr(config, "_read_yaml", refuse)
    enc = encoder.SpeakerEncoder.from_checkpoint(run["ckpt"])
    assert enc.verify(run["wavs"][0], run["wavs"][1]).threshold == pytest.approx(run["enc"].decision.threshold)


def test_a_checkpoint_without_evaluation_has_no_threshold(run, tmp_path):
    lonely = tmp_path / "checkpoint_001.pth"
    shutil.copy(run["ckpt"], lonely)
    enc = encoder.SpeakerEncoder.from_checkpoint(lonely)
    with pytest.raises(VerifyError, match="no decision threshold.*EER.py --checkpoint.*threshold=T"):
        enc.verify(run["wavs"][0], run["wavs"][1])
    assert enc.verify(run["wavs"][0], run["wavs"][1], threshold=0.5).threshold == 0.5


def test_pretrained_prefers_the_pth_and_reads_its_model_card(run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    monkeypatch.setattr(encoder, "PRETRAINED_DIR", folder)
    with pytest.raises(CheckpointError, match="speaker_encoder.pth|speaker_encoder.onnx") as err:
        encoder.SpeakerEncoder.pretrained()
    assert "\n" not in str(err.value)
    a, b = str(run["wavs"][0]), str(run["wavs"][1])
    assert similarity.main([a, b, "--pretrained"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the pretrained model's file") and len(err.splitlines()) == 1
    shutil.copy(run["ckpt"], folder / encoder.PRETRAINED_PTH)
    with pytest.raises(CheckpointError, match="model_card.json.*missing"):
        encoder.SpeakerEncoder.pretrained()
    (folder / encoder.MODEL_CARD).write_text(json.dumps({"threshold": 0.25, "threshold_source": "EER threshold on X",
                                                         "calibration": {"a": 2.0, "b": -1.0}}))
    enc = encoder.SpeakerEncoder.pretrained()
    assert enc.info["backend"] == "pytorch" and enc.source.name == encoder.PRETRAINED_PTH
    r = enc.verify(run["wavs"][0], run["wavs"][1])
    assert (r.threshold, r.threshold_source) == (0.25, "EER threshold on X")
    assert r.llr == pytest.approx(2.0 * r.score - 1.0)
    assert similarity.main([a, b, "--pretrained"]) == 0          # the commands' --pretrained
    assert float(capsys.readouterr().out) == pytest.approx(r.score, abs=1e-5)
    assert verify.main([a, b, "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "threshold: 0.25000 (EER threshold on X" in out and "calibrated LLR" in out
    (folder / encoder.MODEL_CARD).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable model card"):
        encoder.SpeakerEncoder.pretrained()


def test_bad_input_is_one_line_naming_the_file_and_the_fix(run, tmp_path):
    enc = run["enc"]
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (foreign, garbage, tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError) as err:
            encoder.SpeakerEncoder.from_checkpoint(path)
        assert path.name in str(err.value) and "\n" not in str(err.value)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    with pytest.raises(DataError, match=r"notes\.wav: not a readable WAV/FLAC.*Check each file"):
        enc.embed([run["wavs"][0], text])
    with pytest.raises(DataError, match="sample_rate="):
        enc.embed(np.zeros(16000, np.float32) + 0.1)
    for bad in (np.zeros(16000, np.float32), np.full(4000, np.nan, np.float32), np.array(["a"]), np.zeros((2, 2, 2))):
        with pytest.raises(DataError):
            enc.embed(bad, sample_rate=16000)
    # 8 kHz audio for a 16 kHz model: resampled up and embedded, with a warning that says so
    wav, sr = sf.read(run["wavs"][0], dtype="float32")
    import librosa
    low = tmp_path / "phone.wav"
    sf.write(low, librosa.resample(wav, orig_sr=sr, target_sr=8000), 8000)
    with pytest.warns(UserWarning, match=r"phone\.wav \(8000 Hz\) resampled up to 16000 Hz.*less reliable"):
        s = enc.similarity(low, run["wavs"][0])
    assert np.isfinite(s) and s > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the model's rate: no note
        enc.embed(run["wavs"][0])
    assert issubclass(DataError, LabError)
    # shorter than the network's context (min_seconds off): one line, not the runtime's traceback
    short = encoder.SpeakerEncoder.from_checkpoint(run["ckpt"])
    short.features["min_seconds"] = 0.0
    with pytest.raises(DataError, match=r"could not embed.*6 frames \(0\.06 s\): pass longer"):
        short.embed(wav[:800], sample_rate=16000)

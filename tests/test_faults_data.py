"""Fault injection, data side (issue 8: nothing lost, nothing silent): the configuration, manifests
and trial lists, audio files and the feature-extraction workers.

Every test breaks one thing on purpose -- a config key, a data path, a manifest line, an audio file, a
worker process -- and checks that the program stops with one readable message naming the culprit
(file, line, key), or carries on as documented, and that nothing good is lost on the way.
tests/test_faults.py does the same for training, evaluation and the disk.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from svlab import audio, config, evaluation, feature_cache, manifests
from svlab.checkpoint import run_folder
from svlab.errors import DataError
import train
import xvector
from conftest import quiet

SR = 16000


# --------------------------------------------------------------------------- helpers
def _tone(seconds: float, sr: int = SR, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _write(path: Path, data: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def _bad_audio_zoo(folder: Path) -> dict[str, Path]:
    """One file per kind of unusable audio (the names say which)."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {"missing": folder / "missing.wav"}
    bad["zero_bytes"] = folder / "zero_bytes.wav"
    bad["zero_bytes"].write_bytes(b"")
    full = _write(folder / "full.wav", _tone(1.0)).read_bytes()
    bad["truncated"] = folder / "truncated.wav"
    bad["truncated"].write_bytes(full[: len(full) // 2])  # header still claims 1 s
    bad["random_bytes"] = folder / "random_bytes.wav"
    bad["random_bytes"].write_bytes(np.random.default_rng(1).bytes(5000))
    bad["silent"] = _write(folder / "silent.wav", np.zeros(SR, dtype=np.float32))
    bad["too_short"] = _write(folder / "too_short.wav", _tone(0.05))
    nan = _tone(0.5)
    nan[100] = np.nan
    bad["nan"] = _write(folder / "nan.wav", nan, subtype="FLOAT")
    (folder / "full.wav").unlink()
    return bad


def _good_audio_zoo(folder: Path) -> dict[str, Path]:
    """Usable files that need conversion: stereo and the common other sample rates."""
    good = {"plain": _write(folder / "plain.wav", _tone(0.5))}
    good["stereo"] = _write(folder / "stereo.wav", np.stack([_tone(0.5), _tone(0.5, freq=900.0)], axis=1))
    for sr in (8000, 22050, 44100, 48000):
        good[f"sr{sr}"] = _write(folder / f"sr{sr}.wav", _tone(0.5, sr=sr), sr=sr)
    return good


def _feat_cfg(tmp_path: Path, **extra) -> dict:
    overrides = {"features.n_mfcc": 20, "features.cache_dir": str(tmp_path / "cache")}
    overrides.update({f"features.{k}": v for k, v in extra.items()})
    return config.load_config(None, overrides)["features"]



# =========================================================================== 1. configuration
def test_config_problems_name_key_and_file(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  batchsize: 8\n  epohcs: 3\n", encoding="utf-8")
    with pytest.raises(config.ConfigError) as err:
        config.load_config(user)
    msg = str(err.value)
    assert "train.epohcs" in msg and "did you mean 'train.epochs'" in msg and str(user) in msg

    user.write_text("train:\n  batchsize: eight\n", encoding="utf-8")
    with pytest.raises(config.ConfigError) as err:
        config.load_config(user)
    assert "train.batchsize" in str(err.value) and str(user) in str(err.value)

    # a value check names the file the value came from, not the shipped config
    user.write_text("features:\n  min_seconds: -1\n", encoding="utf-8")
    with pytest.raises(config.ConfigError) as err:
        config.load_config(user)
    assert "features.min_seconds" in str(err.value) and str(user) in str(err.value)

    with pytest.raises(config.ConfigError, match=r"train\.crop_frames.*14"):
        config.load_config(None, {"train.crop_frames": 10})  # shorter than the x-vector's context
    assert config.XVECTOR_CONTEXT == xvector.CONTEXT
    cfg = config.load_config(None, {"train.crop_frames": 10, "model.name": "ecapa"})
    assert cfg["train"]["crop_frames"] == 10  # ECAPA keeps the frame count: no minimum


def test_key_sources_and_explicit_keys(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("model:\n  channels: 64\n", encoding="utf-8")
    cfg = config.load_config(user, {"train.lr": 0.01, "train.epochs": None})
    assert config.key_source(cfg, "model.channels") == str(user)
    assert "command line" in config.key_source(cfg, "train.lr")
    assert config.key_source(cfg, "train.epochs") == str(config.DEFAULT_CONFIG)
    assert config.explicit_keys(cfg) == {"model.channels", "train.lr"}
    assert "_sources" not in config.public_config(cfg)


@pytest.mark.parametrize("fault", ["missing_root", "empty_root", "missing_manifest"])
def test_bad_data_paths_fail_before_any_work_and_touch_nothing(fault, write_config_yaml, tiny_corpus, tmp_path,
                                                               monkeypatch, capsys):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    (empty / "unrelated.wav").write_bytes(b"x")
    extra, key = {
        "missing_root": ({"data.root": str(tmp_path / "no_such_folder")}, "data.root"),
        "empty_root": ({"data.root": str(empty)}, "data.root"),
        "missing_manifest": ({"data.train_manifest": str(tmp_path / "no_list.txt")}, "data.train_manifest"),
    }[fault]
    yaml_path = write_config_yaml(tmp_path, extra)
    # a previous run whose checkpoint must survive even --overwrite when the data is wrong
    folder = tmp_path / "runs" / "000"
    folder.mkdir(parents=True)
    (folder / "checkpoint_001.pth").write_bytes(b"previous run")
    before = sorted(p.name for p in folder.iterdir())

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("feature extraction started before the data paths were checked")
    monkeypatch.setattr(feature_cache, "_extract_all", no_heavy_work)
    rc = train.main(["--config", str(yaml_path), "--gpu", "-1", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and err.count("error:") == 1
    assert key in err and str(yaml_path) in err, err
    if fault == "empty_root":
        assert "none of the first" in err
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "checkpoint_001.pth").read_bytes() == b"previous run"


# =========================================================================== 2. manifests and trials
def test_manifest_problems_listed_together_with_lines(tmp_path):
    path = tmp_path / "train_list.txt"
    lines = ["S1 S1/a.wav", "", "only_one_field", "S1 S1/b.wav", "   ", "S2 S1\\a.wav", "S3 S3/c.wav"]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))  # BOM + CRLF + blanks
    with pytest.raises(DataError) as err:
        manifests.read_manifest(path, key="data.train_manifest", source="my.yaml")
    msg = str(err.value)
    assert str(path) in msg and "2 bad line" in msg
    assert "line 3" in msg and "line 6" in msg and "already listed on line 1" in msg
    assert "line 4" not in msg and "line 7" not in msg

    path.write_bytes(("\ufeff" + "\r\n".join(lines[:2] + lines[3:5] + lines[6:]) + "\r\n").encode("utf-8"))
    utts = manifests.read_manifest(path)
    assert [(u.speaker, u.relpath, u.line) for u in utts] == [("S1", "S1/a.wav", 1), ("S1", "S1/b.wav", 3),
                                                              ("S3", "S3/c.wav", 5)]
    with pytest.raises(DataError) as err:
        manifests.read_manifest(tmp_path / "gone.txt", key="data.train_manifest", source="my.yaml")
    assert "data.train_manifest" in str(err.value) and "my.yaml" in str(err.value)


def test_trial_problems_listed_together_with_lines(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_bytes("\ufeffa.wav b.wav 1\r\n"
                     "\r\n"
                     "a.wav c.wav 2\r\n"          # label not 0/1
                     "a.wav c.wav\r\n"            # two columns
                     "a.wav b.wav 0\r\n"          # same trial again, other label
                     "c.wav c.wav 1\r\n"          # compared with itself
                     "b.wav c.wav 0 x\r\n"        # four columns
                     "b.wav c.wav 0\r\n".encode("utf-8"))
    with pytest.raises(DataError) as err:
        manifests.read_trials(path)
    msg = str(err.value)
    assert str(path) in msg and "5 bad line" in msg
    for n in (3, 4, 5, 6, 7):
        assert f"line {n}:" in msg
    assert "line 1:" not in msg and "line 8:" not in msg
    assert "same pair as line 1" in msg and "other label" in msg and "itself" in msg and "'2'" in msg


def test_trial_utterances_missing_from_test_manifest(tmp_path):
    trials_path, manifest = tmp_path / "trials.txt", tmp_path / "test_set.txt"
    manifest.write_text("S1 S1/a.wav\nS2 S2/b.wav\n", encoding="utf-8")
    trials_path.write_text("S1/a.wav S2/b.wav 0\nS1/a.wav S1/zz.wav 1\nS9/x.wav S2/b.wav 0\n", encoding="utf-8")
    trials = manifests.read_trials(trials_path)
    index = {u.relpath for u in manifests.read_manifest(manifest)}
    with pytest.raises(DataError) as err:
        evaluation.trial_utterances(trials, index, trials_path, manifest)
    msg = str(err.value)
    assert str(trials_path) in msg and str(manifest) in msg and "2 trial utterance" in msg
    assert "line 2: S1/zz.wav" in msg and "line 3: S9/x.wav" in msg
    assert evaluation.trial_utterances(trials[:1], index, trials_path, manifest) == ["S1/a.wav", "S2/b.wav"]


def test_overlapping_speakers_warning(tmp_path):
    train_list = tmp_path / "train.txt"
    train_list.write_text("S1 S1/a.wav\nS2 S2/a.wav\nS3 S3/a.wav\n", encoding="utf-8")
    train_utts = manifests.read_manifest(train_list)
    test_utts = [manifests.Utterance("S3", "S3/b.wav", 1), manifests.Utterance("S1", "S1/a.wav", 2),
                 manifests.Utterance("S7", "S7/a.wav", 3)]
    assert manifests.overlapping_speakers(train_utts, test_utts) == ["S1", "S3"]
    assert manifests.overlapping_speakers(["S1", "S2"], ["S4"]) == []
    note = manifests.overlap_warning(train_list, test_utts)
    assert note.startswith("warning: 2 test speaker(s)") and "S1, S3" in note and "optimistic" in note
    assert "1 test file(s) are training files" in note
    assert manifests.overlap_warning(train_list, [manifests.Utterance("S9", "S9/a.wav", 1)]) is None
    assert manifests.overlap_warning(tmp_path / "gone.txt", test_utts) is None  # not needed to evaluate


# =========================================================================== 3. audio
def test_each_kind_of_bad_audio_is_named(tmp_path):
    expected = {"missing": "not found", "zero_bytes": "0 bytes", "truncated": "truncated",
                "random_bytes": "not a readable", "silent": "silent", "too_short": "too short",
                "nan": "NaN"}
    for kind, path in _bad_audio_zoo(tmp_path).items():
        with pytest.raises(DataError) as err:
            audio.load_audio(path, SR, min_seconds=0.2)
        msg = str(err.value)
        assert path.name in msg and expected[kind] in msg, (kind, msg)
        assert "\n" not in msg
    # the shipped minimum is long enough for the x-vector's context on a whole test utterance
    cfg = config.load_config(None)
    frames = 1 + int(cfg["features"]["min_seconds"] * SR) // int(SR * cfg["features"]["hop_length_ms"] / 1000)
    assert frames > xvector.CONTEXT


def test_stereo_and_other_rates_are_converted_and_counted(tmp_path):
    good = _good_audio_zoo(tmp_path / "audio")
    for name, path in good.items():
        wav = audio.load_audio(path, SR)
        assert wav.ndim == 1 and wav.dtype == np.float32 and abs(wav.size - SR // 2) <= 2, name
    lines = []
    feat_cfg = _feat_cfg(tmp_path)
    feats, kept, problems = feature_cache.load_features(list(good.values()), feat_cfg, log=lines.append)
    assert kept == list(range(len(good))) and problems == []
    assert all(f.shape[0] == 20 and abs(f.shape[1] - 51) <= 1 for f in feats)
    notes = [line for line in lines if "resampled" in line]
    assert len(notes) == 1, lines
    assert "4 file(s) resampled to 16000 Hz" in notes[0] and "1 at 8000 Hz" in notes[0] and \
        "1 at 44100 Hz" in notes[0] and "1 multi-channel file(s) averaged to mono" in notes[0]
    lines.clear()  # the same note again when the features come from the disk cache
    again, _, _ = feature_cache.load_features(list(good.values()), feat_cfg, log=lines.append)
    assert [line for line in lines if "resampled" in line] == notes
    for a, b in zip(feats, again):
        np.testing.assert_array_equal(a, b)


def test_bad_audio_policy_error_lists_all_skip_leaves_out(tmp_path):
    bad = _bad_audio_zoo(tmp_path / "bad")
    good = _good_audio_zoo(tmp_path / "good")
    paths = [good["plain"], *bad.values(), good["sr8000"]]
    feat_cfg = _feat_cfg(tmp_path)
    with pytest.raises(DataError) as err:
        feature_cache.load_features(paths, feat_cfg, policy="error", log=quiet, fix=feature_cache.TRAINING_AUDIO_FIX)
    msg = str(err.value)
    assert msg.startswith(f"{len(bad)} unusable audio file(s)") and "data.bad_audio: skip" in msg
    for path in bad.values():
        assert path.name in msg
    feats, kept, problems = feature_cache.load_features(paths, feat_cfg, policy="skip", log=quiet)
    assert kept == [0, len(paths) - 1] and len(feats) == 2
    assert len(problems) == len(bad) and all("\n" not in p for p in problems)


def test_skip_policy_writes_skipped_files_txt(make_config, tiny_corpus, tmp_path):
    bad = _bad_audio_zoo(tiny_corpus.root.parent / "bad_for_skip_test")
    manifest = tmp_path / "train_with_bad.txt"
    lines = tiny_corpus.train_manifest.read_text(encoding="utf-8").splitlines()
    lines += [f"S0001 {os.path.relpath(p, tiny_corpus.root)}" for p in (bad["truncated"], bad["silent"])]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = make_config(tmp_path, {"data.train_manifest": str(manifest), "train.epochs": 1})
    with pytest.raises(DataError, match="truncated.wav"):
        train.train(cfg, log=quiet)
    assert not run_folder(cfg).exists()  # nothing created for a run that could not start

    logged = []
    cfg = make_config(tmp_path, {"data.train_manifest": str(manifest), "train.epochs": 1, "data.bad_audio": "skip"})
    result = train.train(cfg, log=logged.append)
    skipped = (result["run_folder"] / "skipped_files.txt").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == 2 and "truncated.wav" in skipped[0] + skipped[1] and "silent.wav" in "".join(skipped)
    assert any("skipped 2 unusable" in line for line in logged)


def _raise_multiline(*args, **kwargs):
    raise ValueError("first line\nsecond line\n  third")


def _die(*args, **kwargs):
    os._exit(7)


@pytest.mark.skipif(sys.platform == "win32", reason="the fork-based pool is POSIX only")
def test_failures_inside_worker_processes_become_one_line(tmp_path, monkeypatch):
    good = _write(tmp_path / "good.wav", _tone(0.3))
    paths = [good] * 64  # enough for the process pool
    feat_cfg = {**_feat_cfg(tmp_path), "cache_dir": ""}
    monkeypatch.setattr(feature_cache, "extract", _raise_multiline)  # inherited by the forked workers
    feats, problems = feature_cache.extract_features(paths, feat_cfg, workers=2)
    assert feats == [None] * 64 and len(problems) == 64
    assert all("\n" not in p and "good.wav" in p and "ValueError: first line second line third" in p
               for p in problems)

    monkeypatch.setattr(feature_cache, "read_audio", _die)  # a worker that dies outright (OOM kill, segfault)
    with pytest.raises(DataError) as err:
        feature_cache.extract_features(paths, feat_cfg, workers=2)
    msg = str(err.value)
    assert "worker process died" in msg and "\n" not in msg

"""Fault injection (issue 8: nothing lost, nothing silent).

Every test breaks one thing on purpose -- a config key, a manifest line, an audio file, the loss, a
signal, a kill in the middle of a write, a full disk, a hostile checkpoint -- and checks that the
program stops with one readable message naming the culprit (file, line, key, epoch/step), or
carries on as documented, and that nothing good is lost on the way. Sized for a shared 2-core
machine: the tiny corpus and narrow x-vector of conftest.py, a few epochs of 4 steps.
"""
from __future__ import annotations

import csv
import errno
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import checkpoint
import config
import dataset
import EER
import train
import xvector
from conftest import PROJECT, quiet

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


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def trained(make_config, write_config_yaml, tmp_path_factory):
    """A finished 2-epoch run (read-only for the tests) and a YAML config pointing at it."""
    work = tmp_path_factory.mktemp("faults_run")
    cfg = make_config(work)
    result = train.train(cfg, log=quiet)
    return SimpleNamespace(cfg=cfg, work=work, result=result, folder=train.run_folder(cfg),
                           yaml=write_config_yaml(work))


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
    monkeypatch.setattr(dataset, "_extract_all", no_heavy_work)
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
    with pytest.raises(dataset.DataError) as err:
        dataset.read_manifest(path, key="data.train_manifest", source="my.yaml")
    msg = str(err.value)
    assert str(path) in msg and "2 bad line" in msg
    assert "line 3" in msg and "line 6" in msg and "already listed on line 1" in msg
    assert "line 4" not in msg and "line 7" not in msg

    path.write_bytes(("\ufeff" + "\r\n".join(lines[:2] + lines[3:5] + lines[6:]) + "\r\n").encode("utf-8"))
    utts = dataset.read_manifest(path)
    assert [(u.speaker, u.relpath, u.line) for u in utts] == [("S1", "S1/a.wav", 1), ("S1", "S1/b.wav", 3),
                                                              ("S3", "S3/c.wav", 5)]
    with pytest.raises(dataset.DataError) as err:
        dataset.read_manifest(tmp_path / "gone.txt", key="data.train_manifest", source="my.yaml")
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
    with pytest.raises(dataset.DataError) as err:
        dataset.read_trials(path)
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
    trials = dataset.read_trials(trials_path)
    index = {u.relpath for u in dataset.read_manifest(manifest)}
    with pytest.raises(dataset.DataError) as err:
        EER.trial_utterances(trials, index, trials_path, manifest)
    msg = str(err.value)
    assert str(trials_path) in msg and str(manifest) in msg and "2 trial utterance" in msg
    assert "line 2: S1/zz.wav" in msg and "line 3: S9/x.wav" in msg
    assert EER.trial_utterances(trials[:1], index, trials_path, manifest) == ["S1/a.wav", "S2/b.wav"]


def test_overlapping_speakers_warning(tmp_path):
    train_list = tmp_path / "train.txt"
    train_list.write_text("S1 S1/a.wav\nS2 S2/a.wav\nS3 S3/a.wav\n", encoding="utf-8")
    train_utts = dataset.read_manifest(train_list)
    test_utts = [dataset.Utterance("S3", "S3/b.wav", 1), dataset.Utterance("S1", "S1/a.wav", 2),
                 dataset.Utterance("S7", "S7/a.wav", 3)]
    assert dataset.overlapping_speakers(train_utts, test_utts) == ["S1", "S3"]
    assert dataset.overlapping_speakers(["S1", "S2"], ["S4"]) == []
    note = dataset.overlap_warning(train_list, test_utts)
    assert note.startswith("warning: 2 test speaker(s)") and "S1, S3" in note and "optimistic" in note
    assert "1 test file(s) are training files" in note
    assert dataset.overlap_warning(train_list, [dataset.Utterance("S9", "S9/a.wav", 1)]) is None
    assert dataset.overlap_warning(tmp_path / "gone.txt", test_utts) is None  # not needed to evaluate


# =========================================================================== 3. audio
def test_each_kind_of_bad_audio_is_named(tmp_path):
    expected = {"missing": "not found", "zero_bytes": "0 bytes", "truncated": "truncated",
                "random_bytes": "not a readable", "silent": "silent", "too_short": "too short",
                "nan": "NaN"}
    for kind, path in _bad_audio_zoo(tmp_path).items():
        with pytest.raises(dataset.DataError) as err:
            dataset.load_audio(path, SR, min_seconds=0.2)
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
        wav = dataset.load_audio(path, SR)
        assert wav.ndim == 1 and wav.dtype == np.float32 and abs(wav.size - SR // 2) <= 2, name
    lines = []
    feat_cfg = _feat_cfg(tmp_path)
    feats, kept, problems = dataset.load_features(list(good.values()), feat_cfg, log=lines.append)
    assert kept == list(range(len(good))) and problems == []
    assert all(f.shape[0] == 20 and abs(f.shape[1] - 51) <= 1 for f in feats)
    notes = [line for line in lines if "resampled" in line]
    assert len(notes) == 1, lines
    assert "4 file(s) resampled to 16000 Hz" in notes[0] and "1 at 8000 Hz" in notes[0] and \
        "1 at 44100 Hz" in notes[0] and "1 multi-channel file(s) averaged to mono" in notes[0]
    lines.clear()  # the same note again when the features come from the disk cache
    again, _, _ = dataset.load_features(list(good.values()), feat_cfg, log=lines.append)
    assert [line for line in lines if "resampled" in line] == notes
    for a, b in zip(feats, again):
        np.testing.assert_array_equal(a, b)


def test_bad_audio_policy_error_lists_all_skip_leaves_out(tmp_path):
    bad = _bad_audio_zoo(tmp_path / "bad")
    good = _good_audio_zoo(tmp_path / "good")
    paths = [good["plain"], *bad.values(), good["sr8000"]]
    feat_cfg = _feat_cfg(tmp_path)
    with pytest.raises(dataset.DataError) as err:
        dataset.load_features(paths, feat_cfg, policy="error", log=quiet)
    msg = str(err.value)
    assert msg.startswith(f"{len(bad)} unusable audio file(s)") and "data.bad_audio: skip" in msg
    for path in bad.values():
        assert path.name in msg
    feats, kept, problems = dataset.load_features(paths, feat_cfg, policy="skip", log=quiet)
    assert kept == [0, len(paths) - 1] and len(feats) == 2
    assert len(problems) == len(bad) and all("\n" not in p for p in problems)


def test_skip_policy_writes_skipped_files_txt(make_config, tiny_corpus, tmp_path):
    bad = _bad_audio_zoo(tiny_corpus.root.parent / "bad_for_skip_test")
    manifest = tmp_path / "train_with_bad.txt"
    lines = tiny_corpus.train_manifest.read_text(encoding="utf-8").splitlines()
    lines += [f"S0001 {os.path.relpath(p, tiny_corpus.root)}" for p in (bad["truncated"], bad["silent"])]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = make_config(tmp_path, {"data.train_manifest": str(manifest), "train.epochs": 1})
    with pytest.raises(dataset.DataError, match="truncated.wav"):
        train.train(cfg, log=quiet)
    assert not train.run_folder(cfg).exists()  # nothing created for a run that could not start

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
    monkeypatch.setattr(dataset, "mfcc", _raise_multiline)  # inherited by the forked workers
    feats, problems = dataset.extract_features(paths, feat_cfg, workers=2)
    assert feats == [None] * 64 and len(problems) == 64
    assert all("\n" not in p and "good.wav" in p and "ValueError: first line second line third" in p
               for p in problems)

    monkeypatch.setattr(dataset, "_read_audio", _die)  # a worker that dies outright (OOM kill, segfault)
    with pytest.raises(dataset.DataError) as err:
        dataset.extract_features(paths, feat_cfg, workers=2)
    msg = str(err.value)
    assert "worker process died" in msg and "\n" not in msg


# =========================================================================== 4. training faults
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_last_good(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"train.epochs": 3})
    original = dataset.SpkTrainDataset.__getitem__

    def poisoned(self, i):
        x, y = original(self, i)
        return (x * float("nan"), y) if self.epoch == 2 else (x, y)
    monkeypatch.setattr(dataset.SpkTrainDataset, "__getitem__", poisoned)
    with pytest.raises(train.TrainingError) as err:
        train.train(cfg, log=quiet)
    msg = str(err.value)
    assert "epoch 2, step 1" in msg and "nan" in msg and "epoch 1, is kept" in msg and "--resume" in msg
    folder = train.run_folder(cfg)
    assert list(checkpoint.list_epoch_checkpoints(folder)) == [1]
    state = checkpoint.load_checkpoint(folder / "checkpoint_001.pth")
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())
    assert len(_read_log(folder / "train_log.csv")) == 1
    assert not (folder / train.INTERRUPTED).exists() and not _no_temp_files(folder)


def test_non_finite_weights_are_never_saved(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"train.epochs": 2})
    real_step = torch.optim.Adam.step
    steps_per_epoch = math.ceil(len(dataset.read_manifest(config.config_path_value(cfg, "data.train_manifest"))) / 8)
    calls = []

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == steps_per_epoch:  # the epoch's last update overflows; its loss was still finite
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    with pytest.raises(train.TrainingError, match="weights became non-finite.*epoch 1"):
        train.train(cfg, log=quiet)
    assert checkpoint.list_epoch_checkpoints(train.run_folder(cfg)) == {}


def test_resume_from_epoch_checkpoint_reproduces_straight_run(make_config, tmp_path):
    shared = {"features.cache_dir": str(tmp_path / "cache"), "train.epochs": 4}
    cfg_a = make_config(tmp_path / "straight", shared)
    cfg_b = make_config(tmp_path / "resumed", shared)
    straight = train.train(cfg_a, log=quiet)
    steps = math.ceil(len(dataset.read_manifest(config.config_path_value(cfg_a, "data.train_manifest"))) / 8)
    assert len(straight["history"]) == 4 and steps >= 2
    # killed one step into epoch 3: only checkpoint_002 survives (drop the interrupted.pth the
    # simulated stop leaves, as SIGKILL would never have written it)
    train.train(cfg_b, log=quiet, stop_after_steps=2 * steps + 1)
    folder = train.run_folder(cfg_b)
    (folder / train.INTERRUPTED).unlink()
    assert list(checkpoint.list_epoch_checkpoints(folder)) == [1, 2]
    assert len(_read_log(folder / "train_log.csv")) == 2
    logged = []
    train.train(cfg_b, resume=True, log=logged.append)
    assert any("resuming from checkpoint_002.pth" in line for line in logged)
    rows_a = _read_log(train.run_folder(cfg_a) / "train_log.csv")
    rows_b = _read_log(folder / "train_log.csv")
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == ["1", "2", "3", "4"]
    for ra, rb in zip(rows_a, rows_b):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), abs=1e-5), (ra, rb)
        assert float(rb["acc"]) == pytest.approx(float(ra["acc"]), abs=1e-3)
        assert float(rb["lr"]) == pytest.approx(float(ra["lr"]), rel=1e-9)


class _Compiled(torch.nn.Module):
    """Stands in for what torch.compile returns: a wrapper that runs the model..."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class _FailingCompiled(_Compiled):
    """... or, on a machine without a working compiler, fails when first run."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compiler not found")


@pytest.mark.parametrize("works", [False, True])
def test_compile_falls_back_to_eager_when_the_first_step_fails(make_config, tmp_path, monkeypatch, works):
    reference = train.train(make_config(tmp_path / "eager", {"train.epochs": 1}), log=quiet)["history"]
    monkeypatch.setattr(torch, "compile", _Compiled if works else _FailingCompiled)
    lines = []
    result = train.train(make_config(tmp_path / "compiled", {"train.epochs": 1}), compile_model=True,
                         log=lambda *a: lines.append(" ".join(map(str, a))))
    notes = [line for line in lines if "torch.compile" in line]
    if works:
        assert len(notes) == 1 and notes[0].startswith("torch.compile: model compiled")
    else:
        assert len(notes) == 1 and "torch.compile failed at the first step (RuntimeError" in notes[0]
        assert "C++ compiler not found" in notes[0] and "training uncompiled" in notes[0]
    # the failed attempt changed nothing: the run is the uncompiled run, loss for loss
    assert result["history"][0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6)


def test_resume_with_new_lr_applies_it_and_other_model_is_refused(make_config, tmp_path):
    cfg = make_config(tmp_path, {"train.epochs": 2})
    train.train(cfg, log=quiet, stop_after_steps=1)
    logged = []
    cfg_lr = make_config(tmp_path, {"train.epochs": 2, "train.lr": 0.0001})
    result = train.train(cfg_lr, resume=True, log=logged.append)
    assert any("train.lr changed from 0.001 to 0.0001" in line for line in logged)
    # end of epoch 1 = end of the 1-epoch warm-up: the peak rate, i.e. the new one (not the saved 0.001)
    assert result["history"][0]["lr"] == pytest.approx(0.0001, rel=1e-6)
    assert all(h["lr"] <= 0.0001 * (1 + 1e-6) for h in result["history"])

    cfg_other = make_config(tmp_path, {"train.epochs": 3, "model.channels": 64, "features.n_mfcc": 24})
    with pytest.raises(train.TrainingError) as err:
        train.train(cfg_other, resume=True, log=quiet)
    msg = str(err.value)
    assert "model.channels: checkpoint 32 vs config 64" in msg and "features.n_mfcc: checkpoint 20 vs config 24" \
        in msg


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_resumable_checkpoint_then_resume_completes(trained, tmp_path):
    import yaml
    cfg_yaml = tmp_path / "sig.yaml"
    data = yaml.safe_load(trained.yaml.read_text(encoding="utf-8"))
    data["train"].update(save_dir=str(tmp_path / "runs"), epochs=40)
    data["features"]["cache_dir"] = str(trained.work / "cache")  # features already extracted
    cfg_yaml.write_text(yaml.safe_dump(data), encoding="utf-8")
    folder = tmp_path / "runs" / "000"
    cmd = [sys.executable, str(PROJECT / "train.py"), "--config", str(cfg_yaml), "--gpu", "-1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (folder / "checkpoint_001.pth").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "SIGTERM received" in err and "Traceback" not in err
    assert "continue with: python train.py --resume" in out
    inter = checkpoint.load_checkpoint(folder / train.INTERRUPTED)
    assert inter["step_in_epoch"] >= 1 and "optimizer_state" in inter
    stopped_in = inter["epoch"] + 1
    assert stopped_in < 40

    resumed = subprocess.run(cmd + ["--resume", "--epochs", str(stopped_in + 1)], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{inter['step_in_epoch']} steps into epoch {stopped_in}" in resumed.stdout
    assert not (folder / train.INTERRUPTED).exists()
    assert [int(r["epoch"]) for r in _read_log(folder / "train_log.csv")] == list(range(1, stopped_in + 2))
    final = checkpoint.load_checkpoint(folder / "xvector_gap_softmax_checkpoint.pth")
    assert final["epoch"] == stopped_in + 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_mid_epoch_saves_interrupted_checkpoint(make_config, tmp_path, monkeypatch, capsys):
    cfg = make_config(tmp_path, {"train.epochs": 3})
    original = dataset.SpkTrainDataset.__getitem__
    sent = []

    def press_ctrl_c(self, i):
        if self.epoch == 2 and not sent:
            sent.append(i)
            os.kill(os.getpid(), signal.SIGINT)  # handled by train's flag: no KeyboardInterrupt here
        return original(self, i)
    monkeypatch.setattr(dataset.SpkTrainDataset, "__getitem__", press_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)
    result = train.train(cfg, log=quiet)
    assert result["interrupted"] is True and sent
    assert signal.getsignal(signal.SIGINT) is handler_before  # the previous handler is back
    assert "SIGINT received" in capsys.readouterr().err
    folder = train.run_folder(cfg)
    state = checkpoint.load_checkpoint(folder / train.INTERRUPTED)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    assert list(checkpoint.list_epoch_checkpoints(folder)) == [1]


_KILL_ME_WHILE_SAVING = textwrap.dedent("""
    import sys, time, torch
    import checkpoint
    real_save = torch.save

    class SlowFile:  # a slow disk: every write takes a while, so the kill lands mid-write
        def __init__(self, f):
            self.f = f
        def write(self, b):
            time.sleep(0.02)
            return self.f.write(b)
        def flush(self):
            return self.f.flush()

    torch.save = lambda obj, f, *a, **k: real_save(obj, SlowFile(f), *a, **k)
    state = {"epoch": 99, "model_state": {f"w{i}": torch.randn(50_000) for i in range(60)},
             "config": {}, "speakers": ["new"]}
    print("saving", flush=True)
    checkpoint.save_checkpoint(state, sys.argv[1])
    print("finished", flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_while_writing_keeps_the_previous_checkpoint(trained, tmp_path):
    target = tmp_path / "checkpoint_002.pth"
    target.write_bytes((trained.folder / "checkpoint_002.pth").read_bytes())
    good = target.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(_KILL_ME_WHILE_SAVING, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(target)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            if temps and temps[0].stat().st_size > 100_000:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and "finished" not in out
    assert target.read_bytes() == good
    state = checkpoint.load_checkpoint(target)
    assert state["epoch"] == 2 and state["speakers"] != ["new"]
    # the killed writer could not clean up its temporary file; training finds and removes such litter
    litter = checkpoint.stale_temp_files(tmp_path)
    assert [p.name.split(".")[1] for p in litter] == ["checkpoint_002"]


# =========================================================================== 5. evaluation faults
def test_missing_cp_num_lists_existing(trained, capsys):
    rc = EER.main(["--config", str(trained.yaml), "--cp_num", "9", "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint_009.pth" in err and "epochs 1, 2" in err and "Traceback" not in err


def test_describe_mismatch_reports_what_differs(trained, make_config):
    state = checkpoint.load_checkpoint(trained.result["final_checkpoint"])
    same = make_config(trained.work)
    assert checkpoint.describe_mismatch(state["config"], same) == []
    other = make_config(trained.work, {"model.channels": 64, "features.n_mfcc": 24, "model.pooling": "stats",
                                       "features.cache_dir": "elsewhere", "train.lr": 0.5})
    diff = checkpoint.describe_mismatch(state["config"], other)
    assert diff == ["model.channels: checkpoint 32 vs config 64", "model.pooling: checkpoint 'gap' vs config 'stats'",
                    "features.n_mfcc: checkpoint 20 vs config 24"]
    # only what the user asked for counts: shipped defaults (channels 512, ...) that the checkpoint
    # overrides are no mismatch
    plain = config.load_config(None, {"model.pooling": "stats"})
    assert len(checkpoint.describe_mismatch(state["config"], plain)) >= 3
    assert checkpoint.describe_mismatch(state["config"], plain, only_keys=config.explicit_keys(plain)) == [
        "model.pooling: checkpoint 'gap' vs config 'stats'"]


class _CreatesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_or_foreign_files_are_refused_by_eer(trained, tmp_path, capsys):
    marker = tmp_path / "CODE_WAS_EXECUTED"
    evil = tmp_path / "evil.pth"
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "model_state": {}, "config": {}, "speakers": [],
                "payload": _CreatesMarker(marker)}, evil)
    raw = tmp_path / "raw_pickle.pth"
    raw.write_bytes(pickle.dumps(_CreatesMarker(marker)))
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not a model\n", encoding="utf-8")
    for path in (evil, raw, text):
        rc = EER.main(["--config", str(trained.yaml), "--checkpoint", str(path), "--gpu", "-1"])
        err = capsys.readouterr().err
        assert rc == 2 and path.name in err and "Traceback" not in err, err
        assert not marker.exists()


# =========================================================================== 6. disk
def test_run_folder_is_not_reused_without_resume_or_overwrite(trained):
    before = {p.name: p.stat().st_mtime_ns for p in trained.folder.iterdir()}
    with pytest.raises(train.TrainingError, match="--resume.*--overwrite"):
        train.train(trained.cfg, log=quiet)
    assert {p.name: p.stat().st_mtime_ns for p in trained.folder.iterdir()} == before


def _disk_full_save(obj, f, *args, **kwargs):
    """torch.save onto a full disk: the first bytes go out, then ENOSPC."""
    f.write(b"PK\x03\x04 half a zip")
    if os.path.exists("/dev/full"):
        with open("/dev/full", "wb") as dev:  # the kernel's own ENOSPC, raised through torch's writer
            torch.serialization.save(obj, dev, *args, **kwargs)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_keeps_old_file_and_leaves_no_temp(trained, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_002.pth"
    target.write_bytes((trained.folder / "checkpoint_002.pth").read_bytes())
    good = target.read_bytes()
    state = checkpoint.load_checkpoint(target)
    monkeypatch.setattr(torch, "save", _disk_full_save)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.save_checkpoint({**state, "epoch": 3}, target)
    msg = str(err.value)
    assert "No space left" in msg and str(target) in msg and "previous file is intact" in msg
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_002.pth"]


def test_disk_full_during_training_is_one_clear_error(write_config_yaml, tmp_path, monkeypatch, capsys):
    yaml_path = write_config_yaml(tmp_path, {"train.epochs": 1})
    monkeypatch.setattr(torch, "save", _disk_full_save)
    rc = train.main(["--config", str(yaml_path), "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left" in err and "checkpoint_001.pth" in err and "Traceback" not in err
    folder = tmp_path / "runs" / "000"
    assert not list(folder.glob("*.pth")) and not _no_temp_files(folder)

"""Fault injection, training side (issue 8: nothing lost, nothing silent): the loss, the weights,
signals, a kill in the middle of a write, a full disk, a hostile checkpoint, a reused run folder.

Every test breaks one thing on purpose and checks that the program stops with one readable message
naming the culprit (file, key, epoch/step), or carries on as documented, and that nothing good is lost
on the way. Sized for a shared 2-core machine: the tiny corpus and narrow x-vector of conftest.py, a
few epochs of 4 steps. tests/test_faults_data.py does the same for the configuration, manifests and audio.
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

import pytest
import torch

from svlab import checkpoint, config, files, manifests
from svlab.checkpoint import INTERRUPTED, run_folder
from svlab.errors import TrainingError
import dataset
import EER
import train
from conftest import PROJECT, quiet


# --------------------------------------------------------------------------- helpers
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
    return SimpleNamespace(cfg=cfg, work=work, result=result, folder=run_folder(cfg),
                           yaml=write_config_yaml(work))



# =========================================================================== 4. training faults
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_last_good(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"train.epochs": 3})
    original = dataset.SpkTrainDataset.__getitem__

    def poisoned(self, i):
        x, y = original(self, i)
        return (x * float("nan"), y) if self.epoch == 2 else (x, y)
    monkeypatch.setattr(dataset.SpkTrainDataset, "__getitem__", poisoned)
    with pytest.raises(TrainingError) as err:
        train.train(cfg, log=quiet)
    msg = str(err.value)
    assert "epoch 2, step 1" in msg and "nan" in msg and "epoch 1, is kept" in msg and "--resume" in msg
    folder = run_folder(cfg)
    assert list(checkpoint.list_epoch_checkpoints(folder)) == [1]
    state = checkpoint.load_checkpoint(folder / "checkpoint_001.pth")
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())
    assert len(_read_log(folder / "train_log.csv")) == 1
    assert not (folder / INTERRUPTED).exists() and not _no_temp_files(folder)


def test_non_finite_weights_are_never_saved(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"train.epochs": 2})
    real_step = torch.optim.Adam.step
    steps_per_epoch = math.ceil(len(manifests.read_manifest(config.config_path_value(cfg, "data.train_manifest"))) / 8)
    calls = []

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == steps_per_epoch:  # the epoch's last update overflows; its loss was still finite
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    with pytest.raises(TrainingError, match="weights became non-finite.*epoch 1"):
        train.train(cfg, log=quiet)
    assert checkpoint.list_epoch_checkpoints(run_folder(cfg)) == {}


def test_resume_from_epoch_checkpoint_reproduces_straight_run(make_config, tmp_path):
    shared = {"features.cache_dir": str(tmp_path / "cache"), "train.epochs": 4}
    cfg_a = make_config(tmp_path / "straight", shared)
    cfg_b = make_config(tmp_path / "resumed", shared)
    straight = train.train(cfg_a, log=quiet)
    steps = math.ceil(len(manifests.read_manifest(config.config_path_value(cfg_a, "data.train_manifest"))) / 8)
    assert len(straight["history"]) == 4 and steps >= 2
    # killed one step into epoch 3: only checkpoint_002 survives (drop the interrupted.pth the
    # simulated stop leaves, as SIGKILL would never have written it)
    train.train(cfg_b, log=quiet, stop_after_steps=2 * steps + 1)
    folder = run_folder(cfg_b)
    (folder / INTERRUPTED).unlink()
    assert list(checkpoint.list_epoch_checkpoints(folder)) == [1, 2]
    assert len(_read_log(folder / "train_log.csv")) == 2
    logged = []
    train.train(cfg_b, resume=True, log=logged.append)
    assert any("resuming from checkpoint_002.pth" in line for line in logged)
    rows_a = _read_log(run_folder(cfg_a) / "train_log.csv")
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
    with pytest.raises(TrainingError) as err:
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
    # the exact command from this folder (tmp_path): the project's train.py, this run's --config
    assert f"continue with: python {PROJECT / 'train.py'} --resume --config sig.yaml" in out
    inter = checkpoint.load_checkpoint(folder / INTERRUPTED)
    assert inter["step_in_epoch"] >= 1 and "optimizer_state" in inter
    stopped_in = inter["epoch"] + 1
    assert stopped_in < 40

    resumed = subprocess.run(cmd + ["--resume", "--epochs", str(stopped_in + 1)], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{inter['step_in_epoch']} steps into epoch {stopped_in}" in resumed.stdout
    assert not (folder / INTERRUPTED).exists()
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
    folder = run_folder(cfg)
    state = checkpoint.load_checkpoint(folder / INTERRUPTED)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    assert list(checkpoint.list_epoch_checkpoints(folder)) == [1]


_KILL_ME_WHILE_SAVING = textwrap.dedent("""
    import sys, time, torch
    from svlab import checkpoint
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
    litter = files.stale_temp_files(tmp_path)
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
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
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

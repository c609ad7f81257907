"""Fault injection, the run folder (issue 18, items 1-4 and the last line of train.py): nothing of a
finished run is lost or overwritten, whatever happens to the folder or the command line.

1. ``--resume`` past a truncated or unreadable newest checkpoint: from the newest readable resumable
   one (the skipped files kept and named), or a refusal naming every file; never a fresh start over
   checkpoints, never a readable checkpoint overwritten by a retrained epoch.
2. ``--overwrite`` followed by a failure (bad setting, divergence, Ctrl-C, SIGTERM): the previous run
   is back in place; a leftover ``.previous/`` of a killed run is put back or named, never deleted unsaid.
3. The lock: a second ``train.py`` on a busy folder is refused naming the first (pid, host, start,
   command); a lock whose process is gone, or a pid reused by another process, does not block.
4. The run folder lies inside ``train.save_dir`` and never is the project folder; a Windows path in
   any path-valued key is refused with the key on other systems.
10. ``train.py`` ends with the exact ``EER.py`` command that evaluates this run on its own test set.

Sized for a shared 2-core machine: the tiny corpus of conftest.py, 2-epoch runs copied from one.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from svlab import checkpoint, config, run_folder as rf, training
from svlab.checkpoint import INTERRUPTED, run_folder
from svlab.errors import ConfigError, TrainingError
import dataset
import train
from conftest import PROJECT, quiet

FINAL = "xvector_gap_softmax_checkpoint.pth"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def base(make_config, write_config_yaml, tmp_path_factory):
    """A finished 2-epoch run (copied, never changed) and the shared feature cache."""
    work = tmp_path_factory.mktemp("runs_base")
    cache = str(work / "cache")
    cfg = make_config(work, {"features.cache_dir": cache})
    train.train(cfg, log=quiet)
    return SimpleNamespace(folder=run_folder(cfg), cache=cache, work=work)


@pytest.fixture
def run(base, make_config, write_config_yaml, tmp_path):
    """A copy of the finished run in ``tmp_path``, its config (and YAML) sharing the feature cache."""
    extra = {"features.cache_dir": base.cache}
    cfg = make_config(tmp_path, extra)
    folder = run_folder(cfg)
    shutil.copytree(base.folder, folder)
    return SimpleNamespace(cfg=cfg, folder=folder, yaml=write_config_yaml(tmp_path, extra),
                           make=lambda more: make_config(tmp_path, {**extra, **more}))


# =========================================================================== 1. --resume
def test_resume_refuses_when_newest_is_truncated_and_older_hold_weights_only(run, capsys):
    """The issue's case: checkpoint_002 truncated, checkpoint_001 stripped of the optimiser state (as
    every older epoch is). It used to start from scratch and overwrite checkpoint_001."""
    (run.folder / FINAL).unlink()  # a run killed in epoch 3 has no lab-named copy
    _truncate(run.folder / "checkpoint_002.pth")
    before = _snapshot(run.folder)
    rc = train.main(["--config", str(run.yaml), "--gpu", "-1", "--resume", "--epochs", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "nothing in" in err and "can be resumed" in err
    assert "checkpoint_002.pth: unreadable, truncated" in err
    assert "checkpoint_001.pth: epoch 1, weights only" in err
    assert "--overwrite" in err and "--n_folder" in err
    assert _snapshot(run.folder) == before  # nothing written, nothing renamed, no lock left


def test_resume_continues_from_newest_readable_and_keeps_the_unreadable(run):
    """Truncated checkpoint_002 but a readable lab-named copy of epoch 2: continue from it."""
    _truncate(run.folder / "checkpoint_002.pth")
    damaged = (run.folder / "checkpoint_002.pth").read_bytes()
    logged = []
    result = train.train(run.make({"train.epochs": 3}), resume=True, log=logged.append)
    text = "\n".join(logged)
    assert "warning: skipped checkpoint_002.pth (unreadable, truncated" in text
    assert "kept as checkpoint_002.pth.unreadable" in text
    assert f"resuming from {FINAL}: epoch 2 done" in text
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert (run.folder / "checkpoint_002.pth.unreadable").read_bytes() == damaged
    assert sorted(checkpoint.list_epoch_checkpoints(run.folder)) == [1, 3]
    assert checkpoint.load_checkpoint(run.folder / "checkpoint_003.pth")["epoch"] == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_resume_past_an_unreadable_interrupted_state(run, damage):
    cfg = run.make({"train.epochs": 3})
    train.train(cfg, resume=True, log=quiet, stop_after_steps=1)  # interrupted.pth: epoch 3, step 1
    inter = run.folder / INTERRUPTED
    assert checkpoint.load_checkpoint(inter)["step_in_epoch"] == 1
    if damage == "truncated":
        _truncate(inter)
    else:
        inter.write_bytes(b"" if damage == "empty" else b"\x1b[2J not a checkpoint")
    logged = []
    train.train(cfg, resume=True, log=logged.append)
    text = "\n".join(logged)
    assert f"skipped {INTERRUPTED}" in text and "resuming from checkpoint_002.pth: epoch 2 done" in text
    assert (run.folder / f"{INTERRUPTED}.unreadable").is_file() and not inter.exists()


def test_resume_never_overwrites_a_newer_readable_checkpoint(run, capsys):
    """A readable epoch-3 checkpoint without the optimiser state, newer than the resumable epoch 2:
    resuming would retrain epoch 3 over it."""
    state = checkpoint.load_checkpoint(run.folder / "checkpoint_002.pth")
    for key in ("optimizer_state", "scheduler_state"):
        state.pop(key)
    checkpoint.save_checkpoint({**state, "epoch": 3}, run.folder / "checkpoint_003.pth")
    (run.folder / FINAL).unlink()
    before = _snapshot(run.folder)
    rc = train.main(["--config", str(run.yaml), "--gpu", "-1", "--resume", "--epochs", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint_003.pth, readable and newer than checkpoint_002.pth" in err
    assert _snapshot(run.folder) == before


def test_resume_past_a_checkpoint_damaged_into_non_finite_weights(run):
    """A bit flip inside a tensor loads without error; one that makes a weight NaN/inf is caught."""
    path = run.folder / "checkpoint_002.pth"
    state = checkpoint.load_checkpoint(path)
    name = next(k for k, t in state["model_state"].items() if t.is_floating_point())
    state["model_state"][name].view(-1)[0] = float("inf")
    checkpoint.save_checkpoint(state, path)
    logged = []
    train.train(run.make({"train.epochs": 3}), resume=True, log=logged.append)
    text = "\n".join(logged)
    assert f"skipped checkpoint_002.pth (damaged: non-finite values in {name})" in text
    assert f"resuming from {FINAL}: epoch 2 done" in text


def test_resume_with_fewer_epochs_never_copies_an_older_epoch_over_the_final(run):
    final = (run.folder / FINAL).read_bytes()
    logged = []
    result = train.train(run.make({"train.epochs": 1}), resume=True, log=logged.append)
    assert any("nothing to train" in line for line in logged)
    assert (run.folder / FINAL).read_bytes() == final and len(result["history"]) == 2


def test_resume_point_reads_no_older_checkpoint_than_needed(run, monkeypatch):
    read = []
    real = checkpoint.load_checkpoint
    monkeypatch.setattr(rf, "load_checkpoint", lambda p, *a, **k: read.append(Path(p).name) or real(p, *a, **k))
    path, state, unreadable = rf.resume_point(run.folder)
    assert path.name == "checkpoint_002.pth" and state["epoch"] == 2 and unreadable == []
    assert "checkpoint_001.pth" not in read


def test_resume_and_overwrite_together_are_refused(run):
    before = _snapshot(run.folder)
    with pytest.raises(ConfigError, match="--resume.*--overwrite.*one of them"):
        train.train(run.cfg, resume=True, overwrite=True, log=quiet)
    assert _snapshot(run.folder) == before


# =========================================================================== 2. --overwrite
def test_overwrite_with_negative_weight_decay_is_refused_before_anything(run, capsys):
    before = _snapshot(run.folder)
    rc = train.main(["--config", str(run.yaml), "--gpu", "-1", "--overwrite", "--set", "train.weight_decay=-0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.weight_decay" in err and "0 or more" in err and err.count("error:") == 1
    assert _snapshot(run.folder) == before


def test_overwrite_that_diverges_at_once_puts_the_previous_run_back(run, capsys):
    before = _snapshot(run.folder)
    rc = train.main(["--config", str(run.yaml), "--gpu", "-1", "--overwrite", "--lr", "1e30"])
    out, err = capsys.readouterr()
    assert rc == 2 and "training diverged" in err and "epoch 1" in err
    assert "set aside in" in out and "the previous run is back in place" in out
    assert _snapshot(run.folder) == before  # byte for byte, config.yaml included; no .previous, no lock


def test_overwrite_failing_after_set_aside_puts_the_previous_run_back(run, monkeypatch):
    before = _snapshot(run.folder)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building the model")
    monkeypatch.setattr(train, "build_model", broken)
    logged = []
    with pytest.raises(RuntimeError, match="a bug"):  # not even a bug of ours loses the previous run
        train.train(run.cfg, overwrite=True, log=logged.append)
    assert any("back in place (" in line for line in logged)
    assert _snapshot(run.folder) == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_overwrite_interrupted_by_ctrl_c_in_first_epoch_keeps_the_previous_run(run, monkeypatch):
    before = _snapshot(run.folder)
    original = dataset.SpkTrainDataset.__getitem__
    sent = []

    def press_ctrl_c(self, i):
        if not sent:
            sent.append(i)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, i)
    monkeypatch.setattr(dataset.SpkTrainDataset, "__getitem__", press_ctrl_c)
    logged = []
    result = train.train(run.cfg, overwrite=True, log=logged.append)
    assert result["interrupted"] and sent
    text = "\n".join(logged)
    assert "before this --overwrite run's first checkpoint: nothing of it is kept" in text
    assert "continue with" not in text and "back in place" in text
    assert _snapshot(run.folder) == before


def test_overwrite_deletes_the_previous_run_once_the_first_checkpoint_is_saved(run):
    logged = []
    train.train(run.make({"train.epochs": 1, "train.seed": 5}), overwrite=True, log=logged.append)
    assert any("checkpoint_001.pth is saved; the previous run's files" in line for line in logged)
    names = sorted(p.name for p in run.folder.iterdir())
    assert names == ["checkpoint_001.pth", "config.yaml", "curves.png", "train_log.csv", FINAL]
    assert yaml.safe_load((run.folder / "config.yaml").read_text())["train"]["seed"] == 5


def _leave_aside(folder: Path) -> dict[str, bytes]:
    """What a kill in the first epoch of an --overwrite run leaves: the old run in .previous/, the new
    run's config.yaml."""
    old = _snapshot(folder)
    aside = folder / rf.ASIDE
    aside.mkdir()
    for name in old:
        os.replace(folder / name, aside / name)
    (folder / "config.yaml").write_text("the new run's config\n")
    return old


def test_leftover_aside_folder_is_put_back_at_the_next_start(run):
    old = _leave_aside(run.folder)
    logged = []
    with pytest.raises(TrainingError, match="already holds checkpoints"):  # the old run is back: --resume it
        train.train(run.cfg, log=logged.append)
    assert any("was left by an --overwrite run killed" in line and "back in place" in line for line in logged)
    assert _snapshot(run.folder) == old


def test_leftover_aside_folder_beside_new_checkpoints_is_named_not_deleted(run, capsys):
    _leave_aside(run.folder)
    shutil.copyfile(run.folder / rf.ASIDE / "checkpoint_001.pth", run.folder / "checkpoint_001.pth")
    before = _snapshot(run.folder)
    rc = train.main(["--config", str(run.yaml), "--gpu", "-1", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1
    assert f"{run.folder / rf.ASIDE} holds" in err and "checkpoint_001.pth" in err and "keep one" in err
    assert _snapshot(run.folder) == before


def test_half_done_move_is_put_back(run):
    old = _snapshot(run.folder)
    moving = run.folder / rf.MOVING
    moving.mkdir()
    os.replace(run.folder / "checkpoint_002.pth", moving / "checkpoint_002.pth")
    logged = []
    rf.recover_leftovers(run.folder, logged.append)
    assert "put back 1 file(s)" in logged[0] and _snapshot(run.folder) == old


_SIGTERM_IN_BUILD = textwrap.dedent("""
    import os, signal, sys, time
    import train
    def build_model(*args, **kwargs):  # after --overwrite set the old run aside: a kill by SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise SystemExit("SIGTERM was not delivered")
    train.build_model = build_model
    sys.exit(train.main(sys.argv[1:]))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_before_the_first_checkpoint_puts_back_and_unlocks(run, tmp_path):
    before = _snapshot(run.folder)
    script = tmp_path / "term.py"
    script.write_text(_SIGTERM_IN_BUILD, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), "--config", str(run.yaml), "--gpu", "-1", "--overwrite"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "back in place" in proc.stdout
    assert _snapshot(run.folder) == before


# =========================================================================== 3. the lock
def _lock(folder: Path, **fields) -> Path:
    path = folder / training.LOCK
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 10:00:00",
              "process_start": training._process_start(os.getpid()), "command": "python train.py --n_folder x"}
    path.write_text(json.dumps({**holder, **fields}), encoding="utf-8")
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_second_train_on_a_busy_folder_is_refused_naming_the_first(run, tmp_path):
    data = yaml.safe_load(run.yaml.read_text(encoding="utf-8"))
    data["train"].update(epochs=400, n_folder="busy")
    long_yaml = tmp_path / "long.yaml"
    long_yaml.write_text(yaml.safe_dump(data), encoding="utf-8")
    busy = run.folder.parent / "busy"
    cmd = [sys.executable, str(PROJECT / "train.py"), "--config", str(long_yaml), "--gpu", "-1"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (busy / "checkpoint_001.pth").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run saved no checkpoint in 240 s"
            time.sleep(0.05)
        second = subprocess.run(cmd + ["--overwrite"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None, "the first run ended too early for this test"
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith("error: ") and "is in use by another train.py" in lines[0]
    assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and "started 20" in lines[0]
    assert "train.py --config" in lines[0] and "long.yaml" in lines[0]
    assert first.returncode == 130 and "Traceback" not in err
    assert not (busy / training.LOCK).exists()  # released on SIGTERM
    assert (busy / INTERRUPTED).is_file() and (busy / "checkpoint_001.pth").is_file()  # untouched by the second


def test_lock_of_a_process_that_is_gone_does_not_block(run):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    _lock(run.folder, pid=dead, process_start=None)
    logged = []
    train.train(run.make({"train.epochs": 3}), resume=True, log=logged.append)
    assert any(f"was left by pid {dead}" in line and "no longer runs; taking it over" in line for line in logged)
    assert not (run.folder / training.LOCK).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times from /proc")
def test_lock_with_a_reused_pid_is_stale(run):
    """The holder's pid now belongs to another process (here: this one, started at another time)."""
    _lock(run.folder, process_start="1")
    logged = []
    train.train(run.make({"train.epochs": 3}), resume=True, log=logged.append)
    assert any("no longer runs; taking it over" in line for line in logged)


def test_lock_of_a_live_process_blocks_and_is_left_alone(run):
    path = _lock(run.folder, pid=os.getppid(), process_start=training._process_start(os.getppid()))
    held = path.read_bytes()
    with pytest.raises(TrainingError, match=rf"in use by another train.py \(pid {os.getppid()} on .*started 2026"):
        train.train(run.cfg, resume=True, log=quiet)
    assert path.read_bytes() == held


def test_lock_of_another_host_blocks_and_says_how_to_remove_it(run):
    _lock(run.folder, pid=12345, host="other-machine")
    with pytest.raises(TrainingError) as err:
        train.train(run.cfg, resume=True, log=quiet)
    msg = str(err.value)
    assert "pid 12345 on other-machine" in msg and "another host" in msg
    assert f"delete {run.folder / training.LOCK}" in msg


def test_unreadable_lock_blocks_while_fresh_and_is_taken_over_when_old(run):
    path = run.folder / training.LOCK
    path.write_bytes(b"")  # created, not yet written: its owner is taking it right now
    with pytest.raises(TrainingError, match="being taken by another train.py right now"):
        train.train(run.cfg, resume=True, log=quiet)
    old = time.time() - 3600
    os.utime(path, (old, old))  # an owner killed between creating and writing it, long ago
    logged = []
    train.train(run.make({"train.epochs": 3}), resume=True, log=logged.append)
    assert any("names no owner" in line for line in logged) and not path.exists()


def test_lock_released_and_new_folder_removed_after_a_failure(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"train.save_dir": str(tmp_path / "runs" / "deeper")})

    def failing(*args, **kwargs):
        raise ConfigError("the data is wrong")
    monkeypatch.setattr(train, "check_training_data", failing)
    with pytest.raises(ConfigError):
        train.train(cfg, log=quiet)
    assert not (tmp_path / "runs").exists()  # the folders this run created, empty again, are gone


# =========================================================================== 4. where a run may write
@pytest.mark.parametrize("name", ["..", "../x", "a/../../b", ".", "", "  ", "/tmp/elsewhere", "C:\\runs\\x",
                                  "\\\\server\\share"])
def test_run_folder_outside_save_dir_is_refused_before_anything(write_config_yaml, tmp_path, capsys, name):
    yaml_path = write_config_yaml(tmp_path)
    project_config = (PROJECT / "config.yaml").read_bytes()
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = train.main(["--config", str(yaml_path), "--gpu", "-1", "--n_folder", name])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "key 'train.n_folder'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (PROJECT / "config.yaml").read_bytes() == project_config


def test_run_folder_may_never_be_the_project_folder(make_config, tmp_path):
    cfg = make_config(tmp_path, {"train.save_dir": str(PROJECT.parent), "train.n_folder": PROJECT.name})
    with pytest.raises(ConfigError, match="the project folder or one above it"):
        train.train(cfg, log=quiet)
    cfg = make_config(tmp_path, {"train.save_dir": str(PROJECT), "train.n_folder": "sub"})
    assert run_folder(cfg) == PROJECT / "sub"  # inside the project is allowed (saved_model/ is)


@pytest.mark.skipif(os.name == "nt", reason="Windows paths are valid there")
@pytest.mark.parametrize("key", ["data.root", "data.train_manifest", "test.root", "test.test_manifest",
                                 "test.trials", "test.model_path", "features.cache_dir", "train.save_dir"])
@pytest.mark.parametrize("value", ["D:\\runs", "C:/x", "E:", "\\\\server\\share\\runs"])
def test_windows_path_in_any_path_key_is_refused_with_the_key(write_config_yaml, tmp_path, key, value):
    yaml_path = write_config_yaml(tmp_path, {key: value})
    with pytest.raises(ConfigError) as err:
        config.load_config(yaml_path)
    msg = str(err.value)
    assert f"key '{key}'" in msg and str(yaml_path) in msg and "Windows path" in msg and "\n" not in msg


@pytest.mark.skipif(os.name == "nt", reason="Windows paths are valid there")
def test_windows_save_dir_creates_nothing_under_the_working_folder(write_config_yaml, tmp_path, capsys, monkeypatch):
    yaml_path = write_config_yaml(tmp_path, {"train.save_dir": "D:\\runs"})
    monkeypatch.chdir(tmp_path)
    rc = train.main(["--config", str(yaml_path), "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.save_dir" in err and "/mnt/d/runs" in err
    assert not (tmp_path / "D:").exists() and not (PROJECT / "D:").exists()
    with pytest.raises(ConfigError, match="Windows path"):  # a path given on a command line, too
        config.resolve_path("D:\\runs", base=tmp_path)
    with pytest.raises(ConfigError, match="--config: D:.*Windows path"):
        config.load_config("D:\\lab\\my.yaml")


# =========================================================================== 10. the next command
def test_train_ends_with_the_eer_command_that_evaluates_this_run(run, tmp_path, capsys, monkeypatch):
    """Trained with --config, --n_folder and a --set of the test section: the printed command scores
    this run on that trial list (not the demo's), run as printed from the same folder."""
    trials = Path(config.config_path_value(run.cfg, "test.trials"))
    lines = trials.read_text(encoding="utf-8").splitlines()
    kept = lines[::3]  # targets and non-targets
    assert len(kept) < len(lines)
    short = tmp_path / "short trials.txt"  # a space: the command must quote it
    short.write_text("\n".join(kept) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rc = train.main(["--config", str(run.yaml), "--gpu", "-1", "--n_folder", "007", "--epochs", "1",
                     "--set", f"test.trials={short}"])
    out = capsys.readouterr().out
    assert rc == 0
    line = [x for x in out.splitlines() if x.startswith("next, evaluate it: ")][-1]
    command = line.split(": ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["python", str(PROJECT / "EER.py")] and "--epochs" not in command
    assert args[2:] == ["--cp_num", "1", "--config", "tiny_config.yaml", "--n_folder", "007",
                        "--set", f"test.trials={short}"]
    proc = subprocess.run([sys.executable, *args[1:], "--gpu", "-1"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = list((tmp_path / "runs" / "007").rglob("scores.txt"))
    assert len(scores) == 1
    n_scored = len([x for x in scores[0].read_text(encoding="utf-8").splitlines() if x.strip()])
    assert n_scored in (len(kept), len(kept) + 1)  # this run's trial list (+ a header line, if any)


def test_next_command_quotes_and_round_trips_values(make_config, tmp_path):
    cfg = make_config(tmp_path, {"train.n_folder": "001"})
    cfg["_sources"] = {"train.n_folder": "command line (--set train.n_folder=...)",
                       "train.lr": "command line (--set train.lr=...)",
                       "test.backend": "command line (--set test.backend=...)",
                       "augment.noise_types": "command line (--set augment.noise_types=...)"}
    cfg["augment"]["noise_types"] = ["white", "pink"]
    args = shlex.split(rf.next_command("train.py", cfg, "--resume"))
    sets = dict(config.parse_override(a) for a in args[args.index("--set"):][1::2])
    assert args[2] == "--resume" and args[args.index("--n_folder") + 1] == "001"
    assert sets == {"train.lr": cfg["train"]["lr"], "test.backend": "cosine", "augment.noise_types": ["white", "pink"]}
    eer = shlex.split(rf.next_command("EER.py", cfg, sections=rf.EVAL_SECTIONS))
    assert "train.lr" not in " ".join(eer) and "test.backend=cosine" in eer

"""Fault injection, evaluation side (issue 18): EER.py, tools/verify.py and the report.

Each test breaks one thing on purpose: a full disk in the middle of an evaluation, a swap that fails or
is killed half way, Ctrl-C / SIGTERM, a truncated index, a checkpoint whose tag holds terminal escape
codes, a config that no longer matches the run, a second trial list, several test recordings. It
checks that nothing finished is lost or mixed, and that what is printed is the truth, escaped.

One tiny run (the conftest corpus, one epoch of a narrow x-vector) is trained once for the module.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import EER
import report
import train
import verify
from conftest import PROJECT, nest, quiet, tiny_overrides
from svlab import checkpoint, config, evaluation, safe_update
from svlab.checkpoint import run_folder

ESC_TAG = "\x1b[2J\x1b[32mACCEPT"
LAB_PREFIX = re.compile(r"^Epoch=\d+ EER= \d+\.\d\d Thres= -?\d+\.\d{5} \(trials: (.+)\)$", re.MULTILINE)


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def run(tiny_corpus, make_config, tmp_path_factory):
    """A finished one-epoch run on trial list A (the tiny corpus's) and a second trial list B (a part
    of A: other content, other file), plus a user config that points at the run (trial list A)."""
    work = tmp_path_factory.mktemp("faults_eval")
    cfg = make_config(work, {"train.epochs": 1})
    train.train(cfg, log=quiet)
    folder = run_folder(cfg)
    lines = [ln for ln in tiny_corpus.trials.read_text(encoding="utf-8").splitlines() if ln.strip()]
    trials_b = work / "trials_b.txt"
    trials_b.write_text("\n".join(lines[::2]) + "\n", encoding="utf-8")
    cfg_yaml = work / "run_a.yaml"
    cfg_yaml.write_text(yaml.safe_dump(nest(tiny_overrides(tiny_corpus, work, {"train.epochs": 1}))),
                        encoding="utf-8")
    return SimpleNamespace(work=work, cfg=cfg, folder=folder, ckpt=folder / "checkpoint_001.pth",
                           trials_a=tiny_corpus.trials, trials_b=trials_b, yaml=cfg_yaml, corpus=tiny_corpus)


def _eer(run, *args) -> int:
    return EER.main(["--config", str(run.yaml), "--checkpoint", str(run.ckpt), "--gpu", "-1", *args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def _fresh_copy(run, tmp_path: Path) -> Path:
    """A copy of the run's checkpoint in a folder of its own (tests that change evaluations use it)."""
    ckpt = tmp_path / "run" / "checkpoint_001.pth"
    ckpt.parent.mkdir(parents=True)
    shutil.copyfile(run.ckpt, ckpt)
    return ckpt


def _full_disk_on(n: int, folder_name: str):
    """``os.replace`` that fails with ENOSPC on the n-th file written for the evaluation ``folder_name``
    (the last step of every ``atomic_write``), wherever that evaluation is being written."""
    real, count = os.replace, []

    def replace(src, dst, *a, **k):
        dst_p = Path(dst)
        if dst_p.name in evaluation.EVAL_FILES and (dst_p.parent.name == folder_name
                                                     or dst_p.parent.name.startswith(f".{folder_name}.")):
            count.append(dst_p.name)
            if len(count) == n:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)
    return replace


# --------------------------------------------------------------------------- item 6: all old or all new
@pytest.mark.parametrize("nth", [1, 2, 5, 7])
def test_full_disk_mid_evaluation_leaves_the_old_evaluation_whole(run, tmp_path, monkeypatch, capsys, nth):
    ckpt = _fresh_copy(run, tmp_path)
    base = ["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]
    assert EER.main(base) == 0
    out = ckpt.parent / "eval_001"
    (out / "my_notes.txt").write_text("the student's own notes\n", encoding="utf-8")
    before, index_before = _snapshot(out), (ckpt.parent / "evaluations.json").read_bytes()
    capsys.readouterr()
    # the new evaluation writes other files (the embeddings) and other scores (another system): mixing shows
    monkeypatch.setattr(os, "replace", _full_disk_on(nth, "eval_001"))
    rc = EER.main(base + ["--save_embeddings", "--out", str(out), "--center"])
    # the first case extracts the training features for --center (the store holds training's; the
    # back-end reads its own cache): a progress bar that erases itself with \r may come first
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: could not write")
    assert "No space left on device" in err and "unchanged" in err and ".new-" not in err, err
    assert _snapshot(out) == before                      # every old file, byte for byte; nothing new
    assert (ckpt.parent / "evaluations.json").read_bytes() == index_before
    assert _hidden(ckpt.parent) == [] and _hidden(out) == []   # no half-written sibling or temporary file


def test_a_failed_swap_puts_the_old_evaluation_back(run, tmp_path, monkeypatch, capsys):
    ckpt = _fresh_copy(run, tmp_path)
    base = ["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]
    assert EER.main(base) == 0
    out = ckpt.parent / "eval_001"
    before = _snapshot(out)
    real = os.rename

    def rename(src, dst):
        if ".new-" in Path(src).name:  # the new folder cannot be moved into place (e.g. a file is open)
            raise OSError(errno.EACCES, "Permission denied")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    assert EER.main(base + ["--save_embeddings"]) == 2
    err = capsys.readouterr().err
    assert "could not put the new evaluation in place" in err and "unchanged" in err
    assert _snapshot(out) == before and _hidden(ckpt.parent) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_swap_killed_half_way_is_undone_or_finished_next_time(tmp_path):
    made = {"scores.txt", "metrics.json"}
    target = tmp_path / "eval_001"
    # killed after the old folder went aside, before the new one moved in: the old one comes back
    old = tmp_path / f".eval_001.old-{_dead_pid()}"
    old.mkdir()
    (old / "metrics.json").write_text("{\"old\": 1}")
    (old / "notes.txt").write_text("mine")
    half_new = tmp_path / f".eval_001.new-{_dead_pid()}"
    half_new.mkdir()
    (half_new / "scores.txt").write_text("half")
    lines = []
    safe_update.recover_folder(target, made, log=lines.append)
    assert _snapshot(target) == {"metrics.json": b"{\"old\": 1}", "notes.txt": b"mine"}
    assert _hidden(tmp_path) == [] and "put back" in lines[0]
    # killed after the new folder moved in, before the user's files followed: they follow now
    old = tmp_path / f".eval_001.old-{_dead_pid()}"
    old.mkdir()
    (old / "metrics.json").write_text("{\"older\": 1}")
    (old / "screenshot.png").write_bytes(b"png")
    safe_update.recover_folder(target, made, log=lines.append)
    assert _snapshot(target) == {"metrics.json": b"{\"old\": 1}", "notes.txt": b"mine", "screenshot.png": b"png"}
    assert _hidden(tmp_path) == []


def test_out_never_replaces_a_folder_that_is_not_an_evaluation_of_this_trial_list(run, tmp_path, capsys):
    ckpt = _fresh_copy(run, tmp_path)
    base = ["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]
    before = _snapshot(ckpt.parent)
    assert EER.main(base + ["--out", str(ckpt.parent)]) == 2          # the run folder itself
    err = capsys.readouterr().err
    assert "is not an evaluation folder" in err and "checkpoint_001.pth" in err
    assert _snapshot(ckpt.parent) == before
    # an evaluation of another trial list in the folder (e.g. made before issue 18): refused, kept
    other = tmp_path / "other_eval"
    assert EER.main(base + ["--out", str(other), "--set", f"test.trials={run.trials_b}"]) == 0
    kept = _snapshot(other)
    capsys.readouterr()
    assert EER.main(base + ["--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another trial list" in err and str(run.trials_b) in err and _snapshot(other) == kept


# --------------------------------------------------------------------------- item 17: Ctrl-C and SIGTERM
def test_ctrl_c_and_sigterm_in_process_give_one_line_and_keep_the_folder(run, tmp_path, monkeypatch, capsys):
    ckpt = _fresh_copy(run, tmp_path)
    base = ["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]
    assert EER.main(base) == 0
    before = _snapshot(ckpt.parent)
    capsys.readouterr()
    real_plot, handler = evaluation.plot_det, signal.getsignal(signal.SIGTERM)
    for how in ("ctrl-c", "sigterm"):
        def interrupt(*a, **k):  # scores.txt and roc.png of the new evaluation are written by now
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)   # the handler EER.py installs turns it into the same path
            time.sleep(5)
            return real_plot(*a, **k)
        monkeypatch.setattr(evaluation, "plot_det", interrupt)
        # another system written over the same folder: a half-written new evaluation would show
        assert EER.main(base + ["--center", "--out", str(ckpt.parent / "eval_001")]) == 130, how
        err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the progress bars (feature store, extraction)
        assert err == "interrupted; the evaluation folder is unchanged\n", (how, err)
        assert _snapshot(ckpt.parent) == before and _hidden(ckpt.parent) == []
    assert signal.getsignal(signal.SIGTERM) == handler        # EER.main put the previous handler back


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_running_eer_process(run, tmp_path, sig):
    ckpt = _fresh_copy(run, tmp_path)
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]) == 0
    before = _snapshot(ckpt.parent)
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background CI job may inherit it ignored
        import EER
        from svlab import evaluation
        def slow(*a, **k):  # after scores.txt and roc.png of the new evaluation
            print("READY", flush=True)
            time.sleep(120)
        evaluation.plot_det = slow
        sys.exit(EER.main(["--config", {str(run.yaml)!r}, "--checkpoint", {str(ckpt)!r}, "--gpu", "-1",
                           "--center", "--out", {str(ckpt.parent / "eval_001")!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "READY":
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; the evaluation folder is unchanged"
    assert "Traceback" not in err
    assert _snapshot(ckpt.parent) == before and _hidden(ckpt.parent) == []


# --------------------------------------------------------------------------- item 7: an unreadable index
@pytest.mark.parametrize("damage", ["truncated", "not-utf8", "wrong-shape"])
def test_unreadable_index_is_kept_aside_and_named(run, tmp_path, capsys, damage):
    ckpt = _fresh_copy(run, tmp_path)
    base = ["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]
    assert EER.main(base) == 0 and EER.main(base + ["--center"]) == 0
    index = ckpt.parent / "evaluations.json"
    text = index.read_bytes()
    broken = {"truncated": text[:len(text) // 2], "not-utf8": b"\xff\xfe" + text,
              "wrong-shape": b'{"checkpoint_001.pth": 5}'}[damage]
    index.write_bytes(broken)
    capsys.readouterr()
    assert EER.main(base + ["--score_norm", "asnorm"]) == 0
    out = capsys.readouterr().out
    kept = sorted(ckpt.parent.glob("evaluations.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == broken                 # nothing lost
    notes = [ln for ln in out.splitlines() if "evaluations.json" in ln and "unreadable" in ln]
    assert len(notes) == 1 and kept[0].name in notes[0]
    fresh = json.loads(index.read_text(encoding="utf-8"))                   # a new index was started
    assert [e["metrics"] for e in fresh["checkpoint_001.pth"]] == ["eval_001_asnorm/metrics.json"]
    # readers do not move it: verify still finds every evaluation from the folders next to the checkpoint
    index.write_bytes(broken)
    found = {p.parent.name for p in evaluation.evaluations_of(ckpt)}
    assert found == {"eval_001", "eval_001_center", "eval_001_asnorm"} and index.read_bytes() == broken


# --------------------------------------------------------------------------- item 9: escaped output
def _crafted(run, tmp_path: Path, tag: str, folder: str = "crafted", trials: Path | None = None) -> Path:
    state = checkpoint.load_checkpoint(run.ckpt)
    state["tag"] = tag
    if trials is not None:
        state["config"]["test"]["trials"] = str(trials)
    path = tmp_path / folder / "checkpoint_001.pth"
    path.parent.mkdir()
    checkpoint.save_checkpoint(state, path)
    return path


def test_escape_codes_in_a_checkpoint_tag_are_printed_escaped(run, tmp_path, capsys):
    ckpt = _crafted(run, tmp_path, ESC_TAG + "\nEpoch=1 EER= 0.00 Thres= 0.00000 (trials: fake)")
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1", "--report"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[32mACCEPT" in out
    assert len(LAB_PREFIX.findall(out)) == 1                  # the line break in the tag cannot fake a result
    wav = run.corpus.root / "S0009" / "S0009W0001.wav"
    assert verify.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), str(wav), str(wav)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[32mACCEPT" in out
    assert len([ln for ln in out.splitlines() if "ACCEPT" in ln and not ln.startswith("decision:")]) == 1
    md = (ckpt.parent / "report.md").read_text(encoding="utf-8")
    assert "\x1b" not in md


def test_a_checkpoint_trained_on_windows_is_evaluated_with_this_machines_paths(run, tmp_path, capsys):
    """Its recorded data/test paths (D:\\...) name nothing here: the config's paths are used, and the
    run's trial list is not looked for on a drive this machine has not got (a Windows path in one's own
    config is refused instead: tests/test_faults_runs.py)."""
    state = checkpoint.load_checkpoint(run.ckpt)
    for section, key in (("data", "root"), ("data", "train_manifest"), ("test", "root"), ("test", "trials")):
        state["config"][section][key] = "D:\\lab\\" + key
    path = tmp_path / "windows" / "checkpoint_001.pth"
    path.parent.mkdir()
    checkpoint.save_checkpoint(state, path)
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(path), "--gpu", "-1",
                     "--score_norm", "asnorm"]) == 0
    out = capsys.readouterr().out
    assert LAB_PREFIX.search(out).group(1).endswith(run.trials_a.name)


def test_file_names_and_html_are_escaped(run, tmp_path, capsys):
    odd = tmp_path / "tri\x1b[31mals<b>.txt"       # a trial list recorded in the checkpoint, a folder name
    shutil.copyfile(run.trials_b, odd)
    ckpt = _crafted(run, tmp_path, "<script>alert(1)</script>", folder="cr\x1b[1Aafted", trials=odd)
    assert EER.main(["--checkpoint", str(ckpt), "--gpu", "-1", "--report",
                     "--set", f"features.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "tri\\x1b[31mals<b>.txt" in out and "cr\\x1b[1Aafted" in out
    assert LAB_PREFIX.search(out).group(1) == str(odd).replace("\x1b", "\\x1b")
    page = (ckpt.parent / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page and "als&lt;b&gt;.txt" in page
    assert "\x1b" not in page and "\x1b" not in (ckpt.parent / "report.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- items 10, 11, 13
@pytest.fixture()
def shipped_says_b(run, tmp_path, monkeypatch):
    """``config.yaml`` as a student might leave it after training: the data and test keys point at
    trial list B (a copy of the shipped file in tmp_path stands in for it)."""
    shipped = yaml.safe_load(config.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    shipped["data"].update(root=str(run.corpus.root), train_manifest=str(run.corpus.train_manifest))
    shipped["test"].update(root=str(run.corpus.root), test_manifest=str(run.corpus.test_manifest),
                           trials=str(run.trials_b))
    shipped["features"]["cache_dir"] = str(tmp_path / "cache")
    shipped["train"]["save_dir"] = str(run.work / "runs")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(shipped), encoding="utf-8")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", path)
    return path


def test_a_run_is_evaluated_on_its_own_trial_list_and_others_never_replace_it(run, tmp_path, shipped_says_b,
                                                                               capsys):
    ckpt = _fresh_copy(run, tmp_path)
    assert EER.main(["--checkpoint", str(ckpt), "--gpu", "-1"]) == 0      # no --config: config.yaml says B
    out = capsys.readouterr().out
    own = ckpt.parent / "eval_001"
    m = json.loads((own / "metrics.json").read_text(encoding="utf-8"))
    assert Path(m["trials"]) == run.trials_a                              # the run's own trial list (A)
    assert LAB_PREFIX.search(out).group(1) == str(run.trials_a)
    assert "the run's own settings" in out and f"test.trials={run.trials_a}" in out
    kept = _snapshot(own)
    # B asked for explicitly: another folder, named after B; the evaluation of A stays as it was
    assert EER.main(["--checkpoint", str(ckpt), "--gpu", "-1", "--set", f"test.trials={run.trials_b}"]) == 0
    out = capsys.readouterr().out
    assert LAB_PREFIX.search(out).group(1) == str(run.trials_b)
    other = [p for p in ckpt.parent.glob("eval_001_trials_b-*") if p.is_dir()]
    assert len(other) == 1 and _snapshot(own) == kept
    index = json.loads((ckpt.parent / "evaluations.json").read_text(encoding="utf-8"))
    assert {e["metrics"] for e in index["checkpoint_001.pth"]} == {"eval_001/metrics.json",
                                                                   f"{other[0].name}/metrics.json"}
    # verify decides with A's threshold although B ran last, and says so
    lines = []
    wav_a, wav_b = run.corpus.root / "S0009" / "S0009W0001.wav", run.corpus.root / "S0010" / "S0010W0002.wav"
    res = verify.verify(config.load_config(), ckpt, [wav_a], [wav_b], out=lines.append)
    assert res["threshold"] == m["threshold"] and res["metrics"] == str(own / "metrics.json")
    threshold_line = next(ln for ln in lines if ln.startswith("threshold:"))
    assert "eval_001/metrics.json" in threshold_line and "the run's own trial list" in threshold_line


def test_verify_without_an_evaluation_on_the_runs_trial_list_says_so(run, tmp_path, capsys):
    ckpt = _fresh_copy(run, tmp_path)
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1",
                     "--set", f"test.trials={run.trials_b}"]) == 0
    capsys.readouterr()
    wav = run.corpus.root / "S0009" / "S0009W0001.wav"
    assert verify.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), str(wav), str(wav)]) == 2
    err = capsys.readouterr().err
    assert "on the run's own trial list" in err and "--eval" in err and "trials_b.txt" in err


def test_several_test_recordings_get_one_decision_each(run, tmp_path, capsys):
    ckpt = _fresh_copy(run, tmp_path)
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), "--gpu", "-1"]) == 0
    root = run.corpus.root
    a, a2, b, c = (root / "S0009" / "S0009W0001.wav", root / "S0009" / "S0009W0002.wav",
                   root / "S0010" / "S0010W0002.wav", root / "S0009" / "S0009W0003.wav")
    capsys.readouterr()
    cfg = config.load_config(run.yaml)
    both = verify.verify(cfg, ckpt, [a, a2], [b, c], out=quiet)
    singles = [verify.verify(cfg, ckpt, [a, a2], [t], out=quiet) for t in (b, c)]
    assert [t["score"] for t in both["tests"]] == pytest.approx([s["score"] for s in singles], abs=1e-5)
    assert [t["accept"] for t in both["tests"]] == [s["accept"] for s in singles]
    assert "score" not in both                                   # no single (averaged) score for two tests
    assert verify.main(["--config", str(run.yaml), "--checkpoint", str(ckpt), "--enroll", str(a), str(a2),
                        "--test", str(b), str(c)]) == 0
    out = capsys.readouterr().out
    assert "test 1/2:" in out and "test 2/2:" in out and out.count("decision:") == 2
    assert "2 recordings: their embeddings are averaged into one enrolment" in out


def test_baselines_per_trial_list_and_the_report_compares_like_with_like(run, tmp_path, capsys):
    ckpt = _fresh_copy(run, tmp_path)
    save_dir = tmp_path / "runs_b"
    base = ["--config", str(run.yaml), "--gpu", "-1", "--set", f"train.save_dir={save_dir}"]
    assert EER.main(base + ["--baseline"]) == 0
    assert EER.main(base + ["--baseline", "--set", f"test.trials={run.trials_b}"]) == 0
    baselines = sorted(p.name for p in save_dir.iterdir())
    assert len(baselines) == 2 and all(n.startswith("baseline_") for n in baselines)
    assert {json.loads((save_dir / n / "metrics.json").read_text())["trials"] for n in baselines} == \
        {str(run.trials_a), str(run.trials_b)}
    # the run lives next to the baselines; evaluations of A and of B
    run_dir = save_dir / "000"
    shutil.copytree(ckpt.parent, run_dir)
    shutil.copyfile(run.folder / "config.yaml", run_dir / "config.yaml")
    ck = run_dir / "checkpoint_001.pth"
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(ck), "--gpu", "-1"]) == 0
    assert EER.main(["--config", str(run.yaml), "--checkpoint", str(ck), "--gpu", "-1",
                     "--set", f"test.trials={run.trials_b}"]) == 0
    assert report.main(["--config", str(run.yaml), "--run_dir", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    tables = re.split(r"^### Trial list ", md, flags=re.MULTILINE)[1:]
    assert len(tables) == 2 and "(the run's own)" in tables[0].splitlines()[0]
    rows = [[ln for ln in t.splitlines() if ln.startswith("| ") and not ln.startswith("| evaluation")]
            for t in tables]
    assert all(row.rstrip(" |").endswith(str(trials)) for row in rows[0] for trials in [run.trials_a])
    assert all(row.rstrip(" |").endswith(str(run.trials_b)) for row in rows[1])
    assert len(rows[0]) == 2 and len(rows[1]) == 2           # each: its evaluation and its own baseline only

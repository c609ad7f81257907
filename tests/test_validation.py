"""Validation during training (issue 19, item 4; ``svlab/validation.py``): speakers held apart from
training, their EER and minDCF(0.01) after every epoch in the log, ``train_log.csv``, ``curves.png``,
``best.json`` and ``EER.py --cp_num best``; off (and a given list) trains exactly as before."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import EER
import train
from dataset import SpkTrainDataset
from svlab import checkpoint, validation
from svlab.checkpoint import run_folder
from svlab.config import load_config
from svlab.errors import CheckpointError, ConfigError
from svlab.manifests import read_manifest
from svlab.plots import plot_training_curves
from svlab.run_folder import LOG_FIELDS, prune

ON = {"validation.mode": "on"}
VAL_LINE = re.compile(r"^Train Stage: \d+/\d+ ===> Loss \d+\.\d{4} Acc \d+\.\d\d% \| val EER \d+\.\d\d% "
                      r"minDCF \d\.\d{3}  \(lr ")


def _rows(folder: Path) -> tuple[list[str], list[dict]]:
    with open(folder / "train_log.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _speakers(manifest: Path) -> set[str]:
    return {u.speaker for u in read_manifest(manifest)}


def _weights(folder: Path, epoch: int) -> dict:
    return checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(folder, epoch))["model_state"]


@pytest.fixture(scope="module")
def validated(make_config, tmp_path_factory):
    """A 3-epoch run on the tiny corpus (8 training speakers) with validation on."""
    work = tmp_path_factory.mktemp("validated")
    cfg = make_config(work, {**ON, "train.epochs": 3})
    logged: list[str] = []
    result = train.train(cfg, log=logged.append)
    return SimpleNamespace(cfg=cfg, work=work, folder=run_folder(cfg), result=result, log=logged)


# --------------------------------------------------------------------------- the split
def test_choose_speakers_holds_a_tenth_at_most_20_with_2_utterances_never_excluded():
    counts = {f"S{i:03d}": (1 if i % 7 == 0 else 2 + i % 5) for i in range(300)}
    test = {f"S{i:03d}" for i in range(0, 300, 3)}
    held = validation.choose_speakers(counts, test, 0.1, 20, 2, seed=0)
    assert len(held) == 20 and held == sorted(held)  # 10 % of 300 is 30: capped at 20
    assert all(counts[s] >= 2 for s in held) and not set(held) & test
    assert held == validation.choose_speakers(counts, test, 0.1, 20, 2, seed=0)  # deterministic
    assert held != validation.choose_speakers(counts, test, 0.1, 20, 2, seed=1)
    small = dict(list(counts.items())[:150])
    assert len(validation.choose_speakers(small, set(), 0.1, 20, 2, seed=0)) == 15  # 10 % of 150
    assert len(validation.choose_speakers(dict(list(counts.items())[:8]), set(), 0.1, 20, 2, seed=0)) == 2  # at least 2
    # fewer qualifying speakers than wanted: all of them; fewer than 2: none
    assert validation.choose_speakers({"a": 5, "b": 1, "c": 3, "d": 1}, {"c"}, 0.5, 20, 2, 0) == []
    assert validation.choose_speakers({"a": 5, "b": 2, "c": 1}, set(), 0.9, 20, 2, 0) == ["a", "b"]


def test_pairs_are_all_pairs_or_a_fixed_sample():
    for n in range(2, 41):
        a, b = validation.pair_at(np.arange(n * (n - 1) // 2), n)
        ta, tb = np.triu_indices(n, 1)
        assert np.array_equal(a, ta) and np.array_equal(b, tb), n
    names = [f"s{i % 20}" for i in range(2000)]  # 1,999,000 pairs
    a, b, labels = validation.pairs(names, 5000, seed=0)
    assert len(a) == 5000 and len(set(zip(a.tolist(), b.tolist()))) == 5000 and (a < b).all()
    assert np.array_equal(labels, [names[i] == names[j] for i, j in zip(a, b)]) and 0 < labels.sum() < 5000
    a2, b2, _ = validation.pairs(names, 5000, seed=0)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    a, b, labels = validation.pairs(["x", "x", "y"], 50000, seed=0)
    assert (a.tolist(), b.tolist(), labels.tolist()) == ([0, 0, 1], [1, 2, 2], [1, 0, 0])


def test_held_apart_speakers_are_never_test_speakers(make_config, tiny_corpus, tmp_path):
    # a training manifest that also lists the 4 test speakers: they are never held apart
    manifest = tmp_path / "train_and_test.txt"
    manifest.write_text(tiny_corpus.train_manifest.read_text() + tiny_corpus.test_manifest.read_text())
    test_speakers = _speakers(tiny_corpus.test_manifest)
    for seed in range(6):
        cfg = make_config(tmp_path, {**ON, "data.train_manifest": str(manifest), "validation.seed": seed,
                                     "validation.fraction": 0.3})
        dataset = SpkTrainDataset(cfg, log=lambda *a: None)
        before = set(dataset.speakers)
        v = validation.prepare(cfg, dataset, log=lambda *a: None)
        held = v.state["speakers"]
        assert len(held) == 3 and not set(held) & test_speakers  # 30 % of 12 speakers
        assert set(dataset.speakers) == before - set(held) and len(dataset.labels) == len(dataset.features)
        assert all(dataset.speakers[y] == u.speaker for y, u in zip(dataset.labels, dataset.utterances))


def test_speed_copies_of_held_apart_speakers_leave_too(make_config, tmp_path):
    cfg = make_config(tmp_path, {**ON, "augment.speed_as_new_speakers": True})  # S0001_sp0.9, S0001_sp1.1
    dataset = SpkTrainDataset(cfg, log=lambda *a: None)
    assert len(dataset.speakers) == 24
    held = validation.prepare(cfg, dataset, log=lambda *a: None).state["speakers"]
    assert len(dataset.speakers) == 18 and len(dataset.features) == len(dataset.speeds) == len(dataset.labels) == 72
    assert not [s for s in dataset.speakers if s.split("_sp")[0] in held]


# --------------------------------------------------------------------------- what a run shows and writes
def test_training_with_validation_logs_and_writes_it(validated, tiny_corpus):
    log, folder = validated.log, validated.folder
    held = checkpoint.load_checkpoint(folder / "checkpoint_003.pth")["validation"]["speakers"]
    assert len(held) == 2 and not set(held) & _speakers(tiny_corpus.test_manifest)
    assert any(f"validation: 2 of the 8 training speakers held apart" in line and "6 classes instead of 8" in line
               for line in log), log
    assert any(line.startswith("validation: 8 utterances of 2 speakers, 28 trials (12 target)") for line in log), log
    stages = [line for line in log if line.startswith("Train Stage")]
    assert len(stages) == 3 and all(VAL_LINE.match(line) for line in stages), stages
    state = checkpoint.load_checkpoint(folder / "checkpoint_003.pth")
    assert state["speakers"] == sorted(_speakers(tiny_corpus.train_manifest) - set(held))
    assert any(t.ndim == 2 and t.shape[0] == 6 for t in state["loss_state"].values())  # 6 classes
    fields, rows = _rows(folder)
    assert fields == LOG_FIELDS + validation.VAL_FIELDS  # the old columns first, in their order
    eers = [float(r["val_eer_pct"]) for r in rows]
    assert all(0 <= e <= 100 for e in eers) and all(0 <= float(r["val_min_dcf"]) for r in rows)
    best = json.loads((folder / "best.json").read_text())
    assert best["epoch"] == validated.result["history"].index(validation.best_record(validated.result["history"])) + 1
    assert float(rows[best["epoch"] - 1]["val_eer_pct"]) == min(eers)
    assert any("--cp_num best" in line for line in log)
    assert (folder / "curves.png").stat().st_size > 0


def test_curves_get_a_third_panel_only_with_validation(tmp_path):
    history = [{"epoch": e, "loss": 3.0 / e, "acc": 10.0 * e, "val_eer_pct": 9.0 - e % 3, "val_min_dcf": 0.9}
               for e in range(1, 6)]
    titles = plot_training_curves(history, tmp_path / "with.png", best_epoch=2)
    assert titles == ["Loss", "Accuracy", "Validation"]
    plain = [{k: h[k] for k in ("epoch", "loss", "acc")} for h in history]
    assert plot_training_curves(plain, tmp_path / "without.png") == ["Loss", "Accuracy"]
    # a run resumed from one without validation: only the validated epochs are drawn
    assert len(plot_training_curves(plain[:2] + history[2:], tmp_path / "mixed.png")) == 3
    for name in ("with.png", "without.png", "mixed.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_best_is_the_lowest_validation_eer_ties_by_mindcf_then_earlier():
    h = [{"epoch": 1, "val_eer_pct": 5.0, "val_min_dcf": 0.5}, {"epoch": 2, "val_eer_pct": 3.0, "val_min_dcf": 0.6},
         {"epoch": 3, "val_eer_pct": 3.0, "val_min_dcf": 0.4}, {"epoch": 4, "val_eer_pct": 3.0, "val_min_dcf": 0.4},
         {"epoch": 5, "loss": 1.0}]
    assert validation.best_record(h)["epoch"] == 3
    assert validation.best_record([{"epoch": 1, "loss": 1.0}]) is None


def test_eer_cp_num_best_evaluates_the_best_validation_epoch(validated, write_config_yaml, capsys):
    cfg_yaml = write_config_yaml(validated.work)
    best = json.loads((validated.folder / "best.json").read_text())["epoch"]
    assert EER.main(["--config", str(cfg_yaml), "--cp_num", "best", "--gpu", "-1"]) == 0
    out = capsys.readouterr().out
    assert f"--cp_num best: epoch {best}, the lowest validation EER" in out
    assert re.search(rf"^Epoch={best} EER= ", out, re.M), out
    assert (validated.folder / f"eval_{best:03d}" / "metrics.json").is_file()


def test_cp_num_best_refusals(make_config, tmp_path, write_config_yaml, capsys):
    parser = EER.build_parser()
    assert parser.parse_args(["--cp_num", "BEST"]).cp_num == "best"
    assert parser.parse_args(["--cp_num", "7"]).cp_num == 7
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--cp_num", "bets"])
    assert e.value.code == 2 and "expected an epoch number or 'best', got 'bets'" in capsys.readouterr().err
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="has no best.json; this run was trained without validation"):
        validation.checkpoint_path(folder, "best")
    (folder / "best.json").write_text(json.dumps({"epoch": 4}))
    with pytest.raises(CheckpointError, match=r"epoch, 4 \(best.json\), has no checkpoint any more"):
        validation.checkpoint_path(folder, "best")
    (folder / "best.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="best.json is unreadable"):
        validation.checkpoint_path(folder, "best")
    # through the command: one line, exit 2 (a run trained without validation)
    cfg_yaml = write_config_yaml(tmp_path)
    train.train(make_config(tmp_path, {"train.epochs": 1}), log=lambda *a: None)
    capsys.readouterr()
    assert EER.main(["--config", str(cfg_yaml), "--cp_num", "best"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cp_num best:") and "give an epoch number" in err[0]


def test_pruning_keeps_the_best_epoch(tmp_path):
    for e in range(1, 6):
        checkpoint.epoch_checkpoint_path(tmp_path, e).write_bytes(b"x")
    prune(tmp_path, keep=2, protect=2)
    assert list(checkpoint.list_epoch_checkpoints(tmp_path)) == [2, 4, 5]


# --------------------------------------------------------------------------- training itself unchanged
def test_holding_apart_trains_exactly_like_a_manifest_without_those_speakers(validated, make_config, tiny_corpus,
                                                                           tmp_path):
    held = set(checkpoint.load_checkpoint(validated.folder / "checkpoint_003.pth")["validation"]["speakers"])
    manifest = tmp_path / "without_held.txt"
    manifest.write_text("".join(line + "\n" for line in tiny_corpus.train_manifest.read_text().splitlines()
                                if line.split()[0] not in held))
    cfg = make_config(tmp_path, {"train.epochs": 3, "validation.mode": "off", "data.train_manifest": str(manifest)})
    reduced = train.train(cfg, log=lambda *a: None)
    for a, b in zip(validated.result["history"], reduced["history"]):
        assert a["loss"] == b["loss"] and a["acc"] == b["acc"]  # bit for bit
    wa, wb = _weights(validated.folder, 3), _weights(run_folder(cfg), 3)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_off_and_a_given_list_train_exactly_as_without_validation(make_config, tiny_corpus, tmp_path):
    logged: list[str] = []
    off = train.train(make_config(tmp_path / "off", {"validation.mode": "off"}), log=logged.append)
    folder = Path(off["run_folder"])
    assert "validation" not in checkpoint.load_checkpoint(folder / "checkpoint_002.pth")
    assert _rows(folder)[0] == LOG_FIELDS and not (folder / "best.json").exists()
    assert not [line for line in logged if re.search(r"\bval\b|validation", line)], logged
    # the default (auto) on 8 speakers: off, and said so
    auto_log: list[str] = []
    auto = train.train(make_config(tmp_path / "auto"), log=auto_log.append)
    assert any(line.startswith("validation: off (validation.mode auto holds speakers apart only where "
                               "validation.min_train_speakers, 250, remain: this corpus has 8;") for line in auto_log)
    # scoring a given list after every epoch changes nothing in the training
    given_log: list[str] = []
    given = train.train(make_config(tmp_path / "given", {"validation.trials": str(tiny_corpus.trials),
                                                         "validation.manifest": str(tiny_corpus.test_manifest)}),
                        log=given_log.append)
    assert all("val_eer_pct" in h for h in given["history"])
    for run in (auto, given):
        assert [h["loss"] for h in run["history"]] == [h["loss"] for h in off["history"]]
        wa, wb = _weights(folder, 2), _weights(Path(run["run_folder"]), 2)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo is tested on Linux")
def test_torchrun_validates_on_rank_0_only(tmp_path, write_config_yaml):
    """Only rank 0 embeds (the model itself, not its DDP wrapper: no collective call that the other
    process would never join); the others wait at the end-of-epoch barrier."""
    cfg = write_config_yaml(tmp_path, {**ON, "train.batchsize": 16})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(train.__file__)), "--config", str(cfg), "--gpu", "-1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stages = [line for line in proc.stdout.splitlines() if line.startswith("Train Stage")]
    assert len(stages) == 2 and all(VAL_LINE.match(line) for line in stages), proc.stdout
    fields, rows = _rows(tmp_path / "runs" / "000")
    assert fields == LOG_FIELDS + validation.VAL_FIELDS and len(rows) == 2
    assert (tmp_path / "runs" / "000" / "best.json").is_file()


# --------------------------------------------------------------------------- warnings, resume, config
def test_a_validation_list_on_test_speakers_gets_a_warning(make_config, tiny_corpus, tmp_path):
    def warnings(extra: dict) -> list[str]:
        cfg = make_config(tmp_path, extra)
        logged: list[str] = []
        validation.prepare(cfg, SpkTrainDataset(cfg, log=lambda *a: None), log=logged.append)
        return [line for line in logged if line.startswith("warning:")]
    same = warnings({"validation.trials": str(tiny_corpus.trials),
                     "validation.manifest": str(tiny_corpus.test_manifest)})
    assert len(same) == 1 and "validation.trials is the test trial list" in same[0]
    copy = tmp_path / "val_trials.txt"
    copy.write_text(tiny_corpus.trials.read_text())
    shared = warnings({"validation.trials": str(copy), "validation.manifest": str(tiny_corpus.test_manifest)})
    assert len(shared) == 1 and "shares 4 speaker(s) with the test manifest" in shared[0]
    # a list over training speakers: optimistic the other way
    utts = read_manifest(tiny_corpus.train_manifest)[:8]
    (tmp_path / "train_trials.txt").write_text("".join(f"{a.relpath} {b.relpath} {int(a.speaker == b.speaker)}\n"
                                                       for i, a in enumerate(utts) for b in utts[i + 1:]))
    seen = warnings({"validation.trials": str(tmp_path / "train_trials.txt"),
                     "validation.manifest": str(tiny_corpus.train_manifest)})
    assert len(seen) == 1 and "with the training manifest" in seen[0] and "optimistic" in seen[0]
    # the default (held-apart training speakers) warns about nothing
    assert warnings(ON) == []


def test_resume_continues_with_the_saved_split(validated, make_config, tmp_path):
    cfg = make_config(tmp_path, {**ON, "train.epochs": 3, "features.cache_dir": validated.cfg["features"]["cache_dir"]})
    part = train.train(cfg, log=lambda *a: None, stop_after_steps=5)  # into epoch 2 (24 utterances: 3 steps per epoch)
    assert part["interrupted"]
    # another validation.seed would choose other speakers: --resume keeps the checkpoint's
    changed = make_config(tmp_path, {**ON, "train.epochs": 3, "validation.seed": 7,
                                     "features.cache_dir": validated.cfg["features"]["cache_dir"]})
    logged: list[str] = []
    resumed = train.train(changed, resume=True, log=logged.append)
    assert any("held apart (as saved in the checkpoint)" in line for line in logged), logged
    folder = run_folder(cfg)
    straight = checkpoint.load_checkpoint(validated.folder / "checkpoint_003.pth")
    state = checkpoint.load_checkpoint(folder / "checkpoint_003.pth")
    assert state["validation"] == straight["validation"] and state["speakers"] == straight["speakers"]
    for a, b in zip(validated.result["history"], resumed["history"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["val_eer_pct"] == pytest.approx(a["val_eer_pct"], abs=1e-6)
    # a run started without validation resumes with every speaker, and says why there is no validation
    plain = make_config(tmp_path / "plain", {"train.epochs": 1, "validation.mode": "off"})
    train.train(plain, log=lambda *a: None)
    later = make_config(tmp_path / "plain", {**ON, "train.epochs": 2})
    logged = []
    out = train.train(later, resume=True, log=logged.append)
    assert any("trained on every speaker" in line for line in logged)
    assert "val_eer_pct" not in out["history"][-1]
    assert checkpoint.load_checkpoint(Path(out["run_folder"]) / "checkpoint_002.pth")["speakers"] == \
        checkpoint.load_checkpoint(Path(out["run_folder"]) / "checkpoint_001.pth")["speakers"]


def test_config_keys(make_config, tmp_path):
    assert make_config(tmp_path, {"validation.mode": False})["validation"]["mode"] == "off"  # YAML's unquoted off
    assert make_config(tmp_path, {"validation.mode": True})["validation"]["mode"] == "on"
    for key, value, what in [("validation.fraction", 1.5, "between 0 and 1"),
                             ("validation.max_speakers", 1, "2 or more"),
                             ("validation.max_frames", 10, "more than 14 frames"),
                             ("validation.mode", "sometimes", "choose one of auto, on, off")]:
        with pytest.raises(ConfigError, match=re.escape(key) + ".*" + re.escape(what)):
            make_config(tmp_path, {key: value})
    with pytest.raises(ConfigError, match="validation.manifest.*must name the manifest"):
        make_config(tmp_path, {"validation.trials": "files/trials.txt"})
    assert load_config()["validation"]["mode"] == "auto"


def test_too_few_speakers_for_validation_on_is_one_clear_error(make_config, tiny_corpus, tmp_path):
    manifest = tmp_path / "three.txt"
    lines = tiny_corpus.train_manifest.read_text().splitlines()
    manifest.write_text("".join(f"{line}\n" for line in lines if line.split()[0] in sorted(
        {x.split()[0] for x in lines})[:3]))
    cfg = make_config(tmp_path, {**ON, "data.train_manifest": str(manifest)})
    with pytest.raises(ConfigError, match="validation.mode is on, but .* has 3 speakers.*too few to hold 2 apart"):
        train.train(cfg, log=lambda *a: None)
    assert not run_folder(cfg).exists() or not list(run_folder(cfg).glob("checkpoint_*"))

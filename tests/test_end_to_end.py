"""End to end on a tiny synthetic corpus: train.train -> checkpoints/log/curves -> EER.evaluate -> outputs,
the CLI entry points' error paths, and resume reproducibility. Each test takes a few seconds on one CPU
thread (narrow x-vector, 1-1.5 s utterances, 50-frame crops)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from svlab import checkpoint
import EER
from svlab import audio, feature_cache, features
from svlab import metrics
from svlab.checkpoint import INTERRUPTED, run_folder
from svlab.errors import DataError, TrainingError
import train


def quiet(*args, **kwargs) -> None:
    """A ``log`` callable that drops everything."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image
    img = matplotlib.image.imread(path)  # decodes the whole file
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def _count_lines(path: Path) -> int:
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


@pytest.fixture(scope="module")
def trained(make_config, tmp_path_factory):
    """One 2-epoch training run shared by the tests of this module (read-only for them)."""
    work = tmp_path_factory.mktemp("e2e_run")
    cfg = make_config(work)
    result = train.train(cfg, log=quiet)
    return SimpleNamespace(cfg=cfg, work=work, result=result, folder=run_folder(cfg))


def test_training_writes_checkpoints_log_and_curves(trained, tiny_corpus):
    folder = trained.folder
    assert folder == trained.work / "runs" / "000"
    assert trained.result["interrupted"] is False
    for name in ("checkpoint_001.pth", "checkpoint_002.pth", "xvector_gap_softmax_checkpoint.pth",
                 "train_log.csv", "curves.png", "config.yaml"):
        assert (folder / name).is_file(), name
    assert trained.result["final_checkpoint"] == folder / "xvector_gap_softmax_checkpoint.pth"
    assert not (folder / INTERRUPTED).exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]

    old = checkpoint.load_checkpoint(folder / "checkpoint_001.pth")
    new = checkpoint.load_checkpoint(folder / "checkpoint_002.pth")
    assert "optimizer_state" not in old and "scheduler_state" not in old
    assert "optimizer_state" in new and "scheduler_state" in new
    assert (old["epoch"], new["epoch"]) == (1, 2)
    n_speakers = len({line.split()[0] for line in tiny_corpus.train_manifest.read_text().splitlines() if line})
    assert new["speakers"] == sorted({line.split()[0] for line in
                                      tiny_corpus.train_manifest.read_text().splitlines() if line})
    assert len(new["speakers"]) == n_speakers
    assert new["config"]["model"]["channels"] == 32 and new["config"]["features"]["n_mfcc"] == 20
    assert "_config_path" not in new["config"]
    final = checkpoint.load_checkpoint(folder / "xvector_gap_softmax_checkpoint.pth")
    assert final["epoch"] == 2
    for k, v in new["model_state"].items():
        assert torch.equal(v, final["model_state"][k]), k

    history = trained.result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    assert all(0.0 <= h["acc"] <= 100.0 for h in history)
    with open(folder / "train_log.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, h in zip(rows, history):
        assert float(row["loss"]) == pytest.approx(h["loss"], rel=1e-9)
        assert float(row["acc"]) == pytest.approx(h["acc"], rel=1e-9)
    _assert_png(folder / "curves.png")


def test_evaluate_writes_scores_metrics_and_roc(trained, tiny_corpus):
    ckpt = trained.result["final_checkpoint"]
    result = EER.evaluate(trained.cfg, ckpt, log=quiet)
    assert 0.0 <= result["eer"] <= 1.0
    out = Path(result["out_dir"])
    assert out.parent == trained.folder

    trial_lines = [line.split() for line in tiny_corpus.trials.read_text().splitlines() if line.strip()]
    score_lines = [line.split() for line in (out / "scores.txt").read_text().splitlines()]
    assert len(score_lines) == len(trial_lines)
    assert [s[:2] for s in score_lines] == [t[:2] for t in trial_lines]
    scores = np.array([float(s[2]) for s in score_lines])
    labels = np.array([int(t[2]) for t in trial_lines])
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)  # cosine similarities

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("eer", "threshold", "n_target", "n_nontarget", "checkpoint"):
        assert key in saved, key
    assert saved["n_target"] == int(labels.sum()) and saved["n_nontarget"] == int((labels == 0).sum())
    assert saved["checkpoint"] == str(ckpt)
    assert saved["eer"] == pytest.approx(result["eer"])
    # the EER is the one of the written scores (rounded to 6 decimals in scores.txt, which can at most
    # swap two nearly tied trials)
    one_swap = 1.0 / min(saved["n_target"], saved["n_nontarget"])
    assert metrics.compute_eer(scores, labels)[0] == pytest.approx(saved["eer"], abs=one_swap)
    _assert_png(out / "roc.png")

    # one trial re-scored by hand: audio -> MFCC -> model -> cosine
    state = checkpoint.load_checkpoint(ckpt)
    from svlab.models import model_from_checkpoint
    model = model_from_checkpoint(state)
    feat_cfg = state["config"]["features"]
    embs = []
    for rel in trial_lines[0][:2]:
        wav = audio.load_audio(tiny_corpus.root / rel, feat_cfg["sample_rate"])
        with torch.no_grad():
            embs.append(model(torch.from_numpy(features.mfcc(wav, feat_cfg))[None])[0])
    by_hand = torch.nn.functional.cosine_similarity(embs[0], embs[1], dim=0).item()
    assert scores[0] == pytest.approx(by_hand, abs=1e-4)


def test_backslash_trial_list_scores_the_same(trained, tiny_corpus, make_config, tmp_path):
    ckpt = trained.result["final_checkpoint"]
    base = EER.evaluate(trained.cfg, ckpt, out_dir=tmp_path / "fwd", log=quiet)
    win_trials = tmp_path / "trials_windows.txt"
    win_trials.write_bytes(("\ufeff" + tiny_corpus.trials.read_text().replace("/", "\\")
                            .replace("\n", "\r\n")).encode("utf-8"))
    cfg = make_config(trained.work, {"test.trials": str(win_trials)})
    win = EER.evaluate(cfg, ckpt, out_dir=tmp_path / "win", log=quiet)
    assert win["eer"] == base["eer"] and win["threshold"] == base["threshold"]
    fwd_scores = [line.split()[2] for line in (tmp_path / "fwd" / "scores.txt").read_text().splitlines()]
    win_scores = [line.split()[2] for line in (tmp_path / "win" / "scores.txt").read_text().splitlines()]
    assert fwd_scores == win_scores


def test_trials_naming_unknown_utterances_are_reported(trained, tiny_corpus, make_config, tmp_path):
    lines = tiny_corpus.trials.read_text().splitlines()
    enroll = lines[0].split()[0]
    bad = tmp_path / "trials_bad.txt"
    bad.write_text("\n".join(lines[:3] + [f"{enroll} S9999/S9999W0001.wav 0", f"S8888/x.wav {enroll} 1"]) + "\n",
                   encoding="utf-8")
    cfg = make_config(trained.work, {"test.trials": str(bad)})
    with pytest.raises(DataError) as err:
        EER.evaluate(cfg, trained.result["final_checkpoint"], out_dir=tmp_path / "eval", log=quiet)
    msg = str(err.value)
    assert str(bad) in msg and "line 4: S9999/S9999W0001.wav" in msg and "line 5: S8888/x.wav" in msg
    assert not (tmp_path / "eval" / "scores.txt").exists()


def test_eer_main_runs_and_reports(trained, write_config_yaml, tmp_path, capsys):
    yaml_path = write_config_yaml(trained.work)
    out = tmp_path / "cli_eval"
    rc = EER.main(["--config", str(yaml_path), "--cp_num", "2", "--out", str(out), "--gpu", "-1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Epoch=2 EER=" in captured.out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epoch"] == 2 and saved["checkpoint"] == str(trained.folder / "checkpoint_002.pth")


def test_eer_main_missing_epoch_lists_existing(trained, write_config_yaml, capsys):
    yaml_path = write_config_yaml(trained.work)
    rc = EER.main(["--config", str(yaml_path), "--cp_num", "7", "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and "checkpoint_007.pth" in err
    assert "epochs 1, 2" in err
    assert "Traceback" not in err


def test_train_main_bad_config_returns_2(write_config_yaml, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n", encoding="utf-8")
    rc = train.main(["--config", str(bad), "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and "epochz" in err and "did you mean 'train.epochs'" in err

    # a wrong type given with --set; the base config points every output at tmp_path, so even a
    # regression that let it through could not touch the project's saved_model/
    good = write_config_yaml(tmp_path)
    rc = train.main(["--config", str(good), "--set", "train.warmup_epochs=many", "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "train.warmup_epochs" in err
    assert not (tmp_path / "runs").exists()


def test_train_set_override_of_flag_keys_is_applied():
    args = train.build_parser().parse_args(["--set", "train.epochs=5", "--set", "train.lr=0.01",
                                            "--set", "train.n_folder=abc"])
    cfg = train.config_from_args(args)  # config only: nothing is trained
    assert (cfg["train"]["epochs"], cfg["train"]["lr"], cfg["train"]["n_folder"]) == (5, 0.01, "abc")


def test_train_flags_override_config():
    args = train.build_parser().parse_args(["--epochs", "3", "--lr", "0.01", "--n_folder", "007",
                                            "--loss_type", "amsoftmax", "--pooling", "stats"])
    cfg = train.config_from_args(args)
    assert (cfg["train"]["epochs"], cfg["train"]["lr"], cfg["train"]["n_folder"]) == (3, 0.01, "007")
    assert (cfg["loss"]["type"], cfg["model"]["pooling"]) == ("amsoftmax", "stats")


def test_eer_main_set_n_folder_is_applied(trained, write_config_yaml, capsys):
    yaml_path = write_config_yaml(trained.work)
    rc = EER.main(["--config", str(yaml_path), "--set", "train.n_folder=zzz", "--cp_num", "7", "--gpu", "-1"])
    err = capsys.readouterr().err
    assert rc == 2  # checkpoint_007 exists in neither folder
    assert str(trained.work / "runs" / "zzz" / "checkpoint_007.pth") in err


def test_training_again_in_same_folder_needs_resume_or_overwrite(trained):
    before = sorted(p.name for p in trained.folder.iterdir())
    with pytest.raises(TrainingError, match="resume"):
        train.train(trained.cfg, log=quiet)
    assert sorted(p.name for p in trained.folder.iterdir()) == before


@pytest.fixture(scope="module")
def straight_run(make_config, tiny_corpus, tmp_path_factory):
    """An uninterrupted 4-epoch run, the reference for the resume tests."""
    work = tmp_path_factory.mktemp("straight")
    cfg = make_config(work, {"train.epochs": 4})
    result = train.train(cfg, log=quiet)
    steps_per_epoch = math.ceil(_count_lines(tiny_corpus.train_manifest) / cfg["train"]["batchsize"])
    assert steps_per_epoch >= 3  # so that the interruptions below can fall mid-epoch
    return SimpleNamespace(cfg=cfg, work=work, result=result, steps_per_epoch=steps_per_epoch)


@pytest.mark.parametrize("stops", ["mid_epoch_2", "end_of_epoch_1", "twice"])
def test_resume_after_interruption_reproduces_uninterrupted_run(straight_run, make_config, tmp_path, stops):
    spe = straight_run.steps_per_epoch
    # optimiser steps of each interrupted invocation (counted from where that invocation started)
    plan = {"mid_epoch_2": [spe + 2], "end_of_epoch_1": [spe], "twice": [1, spe + 1]}[stops]
    cfg = make_config(tmp_path, {"train.epochs": 4,
                                 "features.cache_dir": straight_run.cfg["features"]["cache_dir"]})
    folder = run_folder(cfg)
    done = 0
    for i, n in enumerate(plan):
        partial = train.train(cfg, resume=i > 0, log=quiet, stop_after_steps=n)
        done += n
        assert partial["interrupted"] is True
        inter = checkpoint.load_checkpoint(folder / INTERRUPTED)
        assert (inter["epoch"], inter["step_in_epoch"]) == ((done - 1) // spe, (done - 1) % spe + 1)
        assert list(checkpoint.list_epoch_checkpoints(folder)) == list(range(1, (done - 1) // spe + 1))
    if stops == "mid_epoch_2":
        assert (inter["epoch"], inter["step_in_epoch"]) == (1, 2)

    resumed = train.train(cfg, resume=True, log=quiet)
    assert resumed["interrupted"] is False
    assert not (folder / INTERRUPTED).exists()
    a, b = straight_run.result["history"], resumed["history"]
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [1, 2, 3, 4]
    for ha, hb in zip(a, b):
        assert hb["loss"] == pytest.approx(ha["loss"], abs=1e-5), (ha, hb)
        assert hb["acc"] == pytest.approx(ha["acc"], abs=1e-3)
        assert hb["lr"] == pytest.approx(ha["lr"], rel=1e-9)
    wa = checkpoint.load_checkpoint(run_folder(straight_run.cfg) / "checkpoint_004.pth")["model_state"]
    wb = checkpoint.load_checkpoint(folder / "checkpoint_004.pth")["model_state"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    with open(folder / "train_log.csv", newline="", encoding="utf-8") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_amsoftmax_stats_run_trains_and_evaluates(make_config, tmp_path):
    cfg = make_config(tmp_path, {"train.epochs": 1, "model.pooling": "stats", "loss.type": "amsoftmax",
                                 "loss.margin": 0.2, "loss.margin_warmup_epochs": 2})
    result = train.train(cfg, log=quiet)
    folder = run_folder(cfg)
    assert result["final_checkpoint"] == folder / "xvector_stats_amsoftmax_checkpoint.pth"
    record = result["history"][0]
    assert math.isfinite(record["loss"])
    assert 0.0 < record["margin"] < 0.2  # still warming up: the margin grows from 0 over 2 epochs
    state = checkpoint.load_checkpoint(result["final_checkpoint"])
    assert state["loss_state"]["W"].shape == (16, len(state["speakers"]))
    metrics_out = EER.evaluate(cfg, result["final_checkpoint"], out_dir=tmp_path / "eval", log=quiet)
    assert 0.0 <= metrics_out["eer"] <= 1.0


def test_run_without_mean_normalisation_is_evaluated_without_it(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"train.epochs": 1, "features.mean_norm": False, "model.stat_channels": 24})
    result = train.train(cfg, log=quiet)
    state = checkpoint.load_checkpoint(result["final_checkpoint"])
    assert state["features"]["mean_norm"] is False
    assert state["model_state"]["frame_layers.4.conv.weight"].shape[0] == 24  # model.stat_channels
    seen = []
    real_mfcc = features.extract

    def spy(wav, feat_cfg, mean_norm=None):
        seen.append(feat_cfg.get("mean_norm") if mean_norm is None else mean_norm)
        return real_mfcc(wav, feat_cfg, mean_norm)
    monkeypatch.setattr(feature_cache, "extract", spy)  # the MFCC of every file load_features reads
    default_cfg = make_config(tmp_path)  # the shipped default (true): the checkpoint's setting wins
    out = EER.evaluate(default_cfg, result["final_checkpoint"], out_dir=tmp_path / "eval", log=quiet)
    assert seen and set(seen) == {False}
    assert 0.0 <= out["eer"] <= 1.0

"""Large-margin fine-tuning (issue 21.3): ``train.py --finetune_from CHECKPOINT`` / ``train.finetune_from``.

One tiny source run (amsoftmax, 1 epoch) is fine-tuned with a larger margin, longer crops and a batch
holding the whole corpus, so that epoch 1 of the fine-tune is exactly one step: its logged loss is the
loss of the source's weights on the fine-tune's first batch.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import EER
import train
from conftest import quiet
from dataset import SpkTrainDataset
from svlab.checkpoint import load_checkpoint
from svlab.errors import ConfigError, TrainingError
from svlab.models import build_loss, build_model
from svlab.features import feature_dim

SOURCE = {"loss.type": "amsoftmax", "loss.margin": 0.2, "train.epochs": 1, "train.n_folder": "src"}


def digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def source(make_config, tmp_path_factory):
    work = tmp_path_factory.mktemp("finetune")
    cfg = make_config(work, SOURCE)
    result = train.train(cfg, log=quiet)
    return work, result["run_folder"] / "checkpoint_001.pth"


def finetune_cfg(make_config, work, source_path, extra=None):
    # only what the fine-tune changes; the data and everything else must come from the source
    return make_config(work, {"train.finetune_from": str(source_path), "train.n_folder": "ft", "train.epochs": 1,
                              "train.lr": 1e-4, "train.crop_frames": 100, "train.batchsize": 32,
                              "train.warmup_epochs": 0, "loss.margin": 0.4, **(extra or {})})


def test_finetune_starts_from_the_source_weights_exactly(source, make_config):
    work, src = source
    before = digest(src.parent)
    cfg = finetune_cfg(make_config, work, src)
    result = train.train(cfg, log=quiet)
    folder = result["run_folder"]
    assert folder.name == "ft" and folder != src.parent
    assert digest(src.parent) == before  # the source run is untouched
    state = load_checkpoint(folder / "checkpoint_001.pth")
    assert state["finetuned_from"]["checkpoint"] == str(src.resolve())
    assert state["finetuned_from"]["epoch"] == 1
    assert state["config"]["train"]["finetune_from"] == str(src)
    assert state["config"]["loss"]["margin"] == 0.4 and state["config"]["train"]["crop_frames"] == 100
    assert "finetune_from" in (folder / "config.yaml").read_text()

    # epoch 1 is one step over the whole corpus: its loss is the source network + head on those crops
    source_state = load_checkpoint(src)
    assert source_state["speakers"] == state["speakers"]
    model = build_model(source_state["config"]["model"], feature_dim(source_state["config"]["features"]))
    head = build_loss({**source_state["config"]["loss"], "margin": 0.4},
                      source_state["config"]["model"]["embedding_size"], len(source_state["speakers"]))
    model.load_state_dict(source_state["model_state"])
    head.load_state_dict(source_state["loss_state"])
    data = SpkTrainDataset(cfg, log=quiet)
    assert len(data) == 32
    data.set_epoch(1)
    x, y = SpkTrainDataset.collate_fn([data[i] for i in range(len(data))])
    model.train()
    with torch.no_grad():
        loss, acc = head(model(x), y)
    assert state["history"][0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert state["history"][0]["acc"] == pytest.approx(acc.item(), abs=1e-3)
    # ... and the margin is the fine-tune's: with the source's 0.2 the loss is lower
    head.margin = 0.2
    with torch.no_grad():
        assert head(model(x), y)[0].item() < loss.item() - 1e-3

    # evaluated like any other run
    out = work / "ft_eval"
    rc = EER.main(["--set", f"train.save_dir={work / 'runs'}", "--n_folder", "ft", "--cp_num", "1",
                   "--out", str(out), "--gpu", "-1", "--set", "test.bootstrap=0"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eer"] <= 1.0 and metrics["epoch"] == 1


def test_finetune_refuses_other_speakers(source, make_config, tiny_corpus, tmp_path):
    work, src = source
    lines = tiny_corpus.train_manifest.read_text(encoding="utf-8").splitlines()
    fewer = tmp_path / "fewer.txt"
    first = lines[0].split()[0]
    fewer.write_text("\n".join(ln for ln in lines if ln.split()[0] != first) + "\n", encoding="utf-8")
    cfg = finetune_cfg(make_config, work, src, {"data.train_manifest": str(fewer), "train.n_folder": "ft_bad"})
    with pytest.raises(TrainingError, match=f"trained on 8 speakers, this run's data has 7 .*{first}"):
        train.train(cfg, log=quiet)
    assert not (work / "runs" / "ft_bad").exists()


def test_finetune_refuses_a_network_the_source_does_not_have(source, make_config):
    work, src = source
    with pytest.raises(ConfigError, match=r"model\.channels: checkpoint 32 vs config 64.*drop the setting"):
        train.train(finetune_cfg(make_config, work, src, {"model.channels": 64}), log=quiet)
    with pytest.raises(ConfigError, match="loss.type' is softmax, but the fine-tune source .* amsoftmax head"):
        train.train(finetune_cfg(make_config, work, src, {"loss.type": "softmax"}), log=quiet)


def test_finetune_never_writes_into_the_source_run(source, make_config):
    work, src = source
    before = digest(src.parent)
    with pytest.raises(ConfigError, match="train.finetune_from.*own folder, e.g. --n_folder src_ft"):
        train.train(finetune_cfg(make_config, work, src, {"train.n_folder": "src"}), log=quiet)
    assert digest(src.parent) == before


def test_finetune_inherits_what_is_not_given(source, make_config):
    """Keys the fine-tune's config does not give are the source's (here: its loss type and scale)."""
    from svlab.checkpoint import finetune_config, run_location_keys
    from svlab.config import load_config
    from svlab.run_folder import next_command
    work, src = source
    cfg = load_config(None, {"train.finetune_from": str(src), "train.n_folder": "x", "loss.margin": 0.5})
    out, got = finetune_config(cfg, log=quiet)
    assert got.path == src and out["loss"]["type"] == "amsoftmax" and out["loss"]["margin"] == 0.5
    assert out["model"]["channels"] == 32 and out["data"]["train_manifest"] == got.state["config"]["data"][
        "train_manifest"]
    assert out["train"]["save_dir"] == str(work / "runs") and out["train"]["n_folder"] == "x"
    # the run folder lies in the source's save_dir, which the fine-tune's config does not give: the
    # command printed to evaluate it must say where (EER.py finds the folder before reading a checkpoint)
    assert run_location_keys(out) == {"train.save_dir": str(work / "runs")}
    assert f"--set train.save_dir={work / 'runs'}" in next_command("EER.py", out, "--cp_num", "1")
    own = load_config(None, {"train.finetune_from": str(src), "train.n_folder": "y",
                             "train.save_dir": str(work / "runs")})
    assert run_location_keys(finetune_config(own, log=quiet)[0]) == {}  # given: nothing to add


def test_train_cli_flag_sets_the_key(source):
    args = train.build_parser().parse_args(["--finetune_from", "a/b.pth", "--n_folder", "7"])
    cfg = train.config_from_args(args)
    assert cfg["train"]["finetune_from"] == "a/b.pth"
    assert cfg["_sources"]["train.finetune_from"].startswith("command line")


def test_recipe_changes_only_the_second_stage_settings():
    from svlab.config import PROJECT_ROOT, explicit_keys, load_config
    cfg = load_config(PROJECT_ROOT / "recipes" / "large_margin_finetune.yaml")
    assert explicit_keys(cfg) == {"loss.margin", "loss.margin_warmup_epochs", "train.epochs", "train.lr",
                                  "train.warmup_epochs"}
    assert cfg["loss"]["margin"] > load_config()["loss"]["margin"] and cfg["train"]["lr"] == 1e-4

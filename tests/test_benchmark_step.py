"""tools/benchmark.py times train.py's own training step.

``bench.training.lab_train_step`` is train.py's loop body rebuilt from the same svlab pieces; from
the same initial weights on the same batches it must reach exactly the weights that ``train.train``
saves (bit for bit: one thread, float32, the same operations in the same order).
"""
from __future__ import annotations

import math

import pytest
import torch

import train
from bench.training import amp_dtype, build_training, lab_train_step, real_batches
from conftest import quiet
from dataset import SpkTrainDataset
from svlab.checkpoint import epoch_checkpoint_path, load_checkpoint


@pytest.mark.parametrize("extra", [
    {"train.epochs": 1},
    # a margin head whose margin grows over the two epochs: the step's margin warm-up counts too
    {"train.epochs": 2, "loss.type": "aamsoftmax", "loss.margin_warmup_epochs": 2},
], ids=["softmax", "aamsoftmax_margin_warmup"])
def test_benchmark_step_reaches_train_py_weights(make_config, tmp_path, extra):
    cfg = make_config(tmp_path, extra)
    out = train.train(cfg, log=quiet)
    epochs = cfg["train"]["epochs"]
    saved = load_checkpoint(epoch_checkpoint_path(out["run_folder"], epochs))

    device = torch.device("cpu")
    dataset = SpkTrainDataset(cfg, log=quiet)
    steps_per_epoch = math.ceil(len(dataset) / cfg["train"]["batchsize"])
    t = build_training(cfg, len(dataset.speakers), steps_per_epoch, device)
    t.train()
    batches = real_batches(dataset, cfg, device)  # train.py's loader: same crops, same shuffle
    for _ in range(epochs * steps_per_epoch):
        x, y = next(batches)
        lab_train_step(t, x, y, amp_dtype(cfg, device))

    assert t.steps == epochs * steps_per_epoch
    for module, key in ((t.model, "model_state"), (t.criterion, "loss_state")):
        state = module.state_dict()
        assert state.keys() == saved[key].keys()
        for name, value in state.items():
            assert torch.equal(value, saved[key][name]), (key, name)
    assert getattr(t.criterion, "margin", 0.0) == pytest.approx(out["history"][-1]["margin"], abs=0)

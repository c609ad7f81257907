"""distributed.py: torchrun + DDP on 2 CPU (gloo) processes reproduces single-process training.

A tiny x-vector (``speaker_model.build_model``, channels 16) is trained for a few steps on fixed
random data, once with ``python -m torch.distributed.run --nproc_per_node=2`` at per-process batch
B/2 (``distributed.make_sampler`` + ``wrap_model``) and once in this process at batch B with the
same sampler (world size 1), so both see the same examples in the same steps.

Why the comparison is exact: DDP averages the two per-process mean-loss gradients, which equals the
gradient of the mean loss over the whole batch only if every example's loss is independent of the
rest of its batch. BatchNorm in training mode breaks that (each process normalises with statistics of
its own B/2 examples, and SyncBatchNorm needs CUDA), so the BatchNorm layers run in eval mode (fixed
statistics, still trained affine weights); everything else trains normally. What remains is float
rounding (summation order), hence the 1e-5-level tolerances. With SGD the difference stays at that
level for the parameters too; Adam divides by the gradient's magnitude and can turn rounding noise in
near-zero gradient entries into a full step, so for Adam only the loss curve is compared.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from svlab import distributed  # noqa: E402

WORKER = r'''
"""Tiny DDP training run (written by tests/test_distributed.py)."""
import argparse
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, PROJECT)
from svlab import distributed
from svlab import models as speaker_model

N_ITEMS, N_MFCC, FRAMES, N_CLASSES, GLOBAL_BATCH, STEPS = 32, 20, 40, 4, 8, 6


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ITEMS, N_MFCC, FRAMES, generator=g)
    y = torch.randint(0, N_CLASSES, (N_ITEMS,), generator=g)
    return TensorDataset(x, y)


def run(info, optimizer_name):
    """Train STEPS steps at GLOBAL_BATCH crops per step over all processes; returns the per-step
    global mean losses, this process's own losses and the final weights."""
    torch.manual_seed(0)
    model = speaker_model.build_model({"name": "xvector", "pooling": "gap", "embedding_size": 16,
                                       "channels": 16}, N_MFCC)
    head = speaker_model.build_loss({"type": "softmax", "scale": 30.0, "margin": 0.2}, 16, N_CLASSES)
    ddp_model, ddp_head = distributed.wrap_model(model, info), distributed.wrap_model(head, info)  # as train.py
    params = [*model.parameters(), *head.parameters()]
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=1e-3)
    data = problem()
    per_process = GLOBAL_BATCH // info.world_size
    losses, local, epoch = [], [], 0
    while len(losses) < STEPS:
        epoch += 1
        sampler = distributed.make_sampler(data, info, seed=3, epoch=epoch)
        for x, y in DataLoader(data, batch_size=per_process, sampler=sampler):
            model.train()
            head.train()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            loss, _ = ddp_head(ddp_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            local.append(loss.item())
            losses.append(distributed.all_reduce_mean(loss.item(), info))
            if len(losses) == STEPS:
                break
    state = {f"{name}.{k}": v.detach().clone() for name, m in (("model", model), ("head", head))
             for k, v in m.state_dict().items()}
    return {"losses": losses, "local": local, "state": state, "epochs": epoch}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    info = distributed.setup_distributed(use_cuda=False)
    assert info.distributed and info.world_size == 2, info
    results = {name: run(info, name) for name in ("sgd", "adam")}
    results["info"] = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
                       "is_main": info.is_main, "is_main_fn": distributed.is_main(), "device": str(info.device)}
    results["any_rank"] = distributed.any_rank(info.rank == 1, info)
    results["sum"] = distributed.all_reduce_sum([1.0, float(info.rank)], info)
    results["mean_tensor"] = distributed.all_reduce_mean(torch.tensor([float(info.rank), 2.0]), info)
    torch.save(results, f"{args.out}/rank{info.rank}.pt")
    distributed.cleanup()
'''


def load_worker(path: Path):
    spec = importlib.util.spec_from_file_location("ddp_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp_worker.py"
    script.write_text(WORKER.replace("sys.path.insert(0, PROJECT)", f"sys.path.insert(0, {str(PROJECT)!r})"),
                      encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "--out", str(tmp)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return load_worker(script), ranks


def test_setup_reads_torchrun_environment(ddp_run):
    _, ranks = ddp_run
    for r, res in enumerate(ranks):
        info = res["info"]
        assert info["rank"] == r and info["world_size"] == 2 and info["local_rank"] == r
        assert info["is_main"] is (r == 0) and info["is_main_fn"] is (r == 0)
        assert info["device"] == "cpu"
        assert res["any_rank"] is True  # only rank 1 raised the flag, both see it
        assert res["sum"] == [2.0, 1.0]
        assert torch.equal(res["mean_tensor"], torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_ddp_matches_single_process_at_global_batch(ddp_run, opt):
    worker, ranks = ddp_run
    torch.set_num_threads(1)
    single = worker.run(distributed.DistInfo(), opt)  # one process, batch GLOBAL_BATCH, same sampler order
    ddp = ranks[0][opt]
    assert len(ddp["losses"]) == len(single["losses"]) == worker.STEPS
    assert ddp["epochs"] == single["epochs"] == 2  # the sampler's set_epoch was exercised
    # the two processes really saw different halves of each batch ...
    assert ranks[0][opt]["local"][0] != pytest.approx(ranks[1][opt]["local"][0], rel=1e-3)
    # ... and their reduced loss curve is the single-process curve at the global batch
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4 if opt == "adam" else 1e-5)
    assert ranks[1][opt]["losses"] == ddp["losses"]
    # DDP keeps the replicas identical (same averaged gradients, same update)
    for k, v in ranks[0][opt]["state"].items():
        assert torch.equal(v, ranks[1][opt]["state"][k]), k
    if opt == "sgd":
        for k, v in single["state"].items():
            torch.testing.assert_close(ddp["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_single_process_helpers_are_identity(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.setup_distributed(use_cuda=False)
    assert info == distributed.DistInfo() and not info.distributed and info.is_main
    assert distributed.is_main()
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, info) is model
    assert distributed.all_reduce_mean(2.5, info) == 2.5
    assert distributed.all_reduce_sum([1, 2], info) == [1.0, 2.0]
    assert distributed.any_rank(False, info) is False
    distributed.barrier(info)
    with distributed.main_process_first(info):
        pass
    distributed.cleanup()
    sampler = distributed.make_sampler(list(range(10)), info, seed=0, epoch=3)
    assert sorted(sampler) == list(range(10)) and sampler.epoch == 3


def test_batch_and_learning_rate_rules():
    info = distributed.DistInfo(rank=1, world_size=4, local_rank=1, is_main=False)
    assert distributed.effective_batch(64, info) == 256
    assert distributed.scaled_lr(0.001, info, 64) == pytest.approx(0.004)
    assert distributed.scaled_lr(0.001, info, 64, base_batch=128) == pytest.approx(0.002)
    assert distributed.scaled_lr(0.001, info, 64, rule="sqrt") == pytest.approx(0.002)
    assert distributed.scaled_lr(0.001, info, 64, rule="none") == 0.001
    with pytest.raises(ValueError):
        distributed.scaled_lr(0.001, info, 64, rule="cubic")
    # 1000 items over 4 ranks: 250 each; batch 64 -> 4 steps per epoch and rank
    assert distributed.steps_per_epoch(1000, 64, info) == 4
    assert distributed.steps_per_epoch(1001, 64, info) == 4  # 251 padded items per rank
    assert distributed.steps_per_epoch(1000, 64, distributed.DistInfo()) == 16
    # the four ranks' samplers split an epoch into disjoint shares of equal size
    shares = [list(distributed.make_sampler(list(range(1000)), distributed.DistInfo(rank=r, world_size=4,
                                                                                    local_rank=r, is_main=r == 0),
                                            seed=0, epoch=1)) for r in range(4)]
    assert sorted(i for s in shares for i in s) == list(range(1000))

"""Multi-process data-parallel training helpers (``torchrun`` + ``DistributedDataParallel``).

    torchrun --standalone --nproc_per_node=4 train.py ...     # one process per GPU on one machine
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=4 train.py ...

``torchrun`` (``python -m torch.distributed.run``) starts the processes and gives each the
environment variables ``RANK`` (global index), ``WORLD_SIZE`` (number of processes), ``LOCAL_RANK``
(index on this machine, = the GPU it uses), ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`setup_distributed` reads them; started as a plain ``python train.py`` (no such variables) it
returns a single-process :class:`DistInfo` and initialises nothing, so a training script can call
these helpers unconditionally: every helper is a no-op (or the identity) with one process.

How data-parallel training works here
    Every process holds a full copy of the model, built with the same seed (DDP also broadcasts
    rank 0's weights when it wraps the model). :func:`make_sampler` gives each process a disjoint
    ``1/world_size`` share of a shuffled epoch (the same permutation everywhere: seed + epoch), each
    process runs forward/backward on its own per-process batch, and DDP averages the gradients over
    the processes during ``backward`` (all-reduce), so every process applies the same update and the
    copies stay identical.

Effective batch
    ``effective (global) batch = per-process batch x world_size``. In this project ``train.batchsize``
    (``--batchsize``) is the global batch: ``train.py`` gives each of the N processes
    ``batchsize / N`` crops per step (it must divide evenly), so one config means the same effective
    batch, the same steps per epoch and the same learning rate on 1 or N processes. The averaged
    gradient equals the single-process gradient of the whole batch (exactly, apart from float
    rounding, for a model without batch statistics; see BatchNorm below).
    :func:`effective_batch` and :func:`steps_per_epoch` take the per-process batch.

Learning rate: the linear scaling rule
    Only a larger *global* batch calls for another learning rate. A k times larger batch gives a
    gradient with 1/k of the variance and k times fewer steps per epoch; the linear scaling rule
    (Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017) keeps the
    training curve per epoch roughly unchanged by multiplying the learning rate by k:
    ``lr = base_lr * effective_batch / base_batch`` (:func:`scaled_lr`), together with a warm-up
    (``train.warmup_epochs``), since the large rate is unstable in the first steps. It holds for SGD
    up to batches of a few thousand; for Adam (this project) it is a starting point, often a little
    too aggressive: the square-root rule ``base_lr * sqrt(k)`` is the usual alternative. Example: the
    lab's ``--batchsize 64 --lr 0.001`` on 4 GPUs with 64 crops each is ``--batchsize 256 --lr 0.004``
    (linear) or ``--lr 0.002`` (square root).

BatchNorm
    The x-vector's frame layers use BatchNorm. Under DDP each process normalises with the statistics
    of its own per-process batch (``batchsize / N`` crops) and the running averages of rank 0 are broadcast
    to the others at every forward (``broadcast_buffers``), so checkpoints are identical on all ranks.
    ``wrap_model(..., sync_batchnorm=True)`` converts to ``SyncBatchNorm`` (statistics over the
    effective batch; CUDA only). Small per-process batches (below ~16) are where this matters.

Rules for a training script
    * only the main process (rank 0, :func:`is_main`) writes files (checkpoints, logs, plots), prints
      progress and builds caches first (:func:`main_process_first`);
    * decisions that stop or skip the loop must be taken by all ranks together (:func:`any_rank`),
      otherwise the others wait forever in the next all-reduce;
    * logged numbers are per-process until reduced (:func:`all_reduce_mean`, :func:`all_reduce_sum`);
    * checkpoints store the unwrapped ``model.state_dict()`` (no ``module.`` prefix), so they load the
      same with or without DDP and resume on any number of processes.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes (``local_rank`` on this machine),
    ``is_main`` for rank 0, and the ``device`` it computes on."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when several processes train together (a process group is initialised)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def setup_distributed(use_cuda: bool | None = None, backend: str | None = None,
                      timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    ``use_cuda``: None picks CUDA when available (GPU ``LOCAL_RANK``, backend ``nccl``), False forces
    the CPU (backend ``gloo``). ``backend`` overrides the choice. Without torchrun's variables (or with
    ``WORLD_SIZE=1``) nothing is initialised and the single-process ``DistInfo`` is returned (device
    ``cuda:0`` or ``cpu``). Call :func:`cleanup` at the end.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() if use_cuda is None else bool(use_cuda)
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but is not available")
    if world_size <= 1:
        return DistInfo(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, is_main=rank == 0, device=device)


def cleanup() -> None:
    """Leave the process group (no-op when none was initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others: e.g. generating the demo corpus or filling
    the feature cache once, which the other ranks then simply read."""
    if not info.is_main:
        barrier(info)
    try:
        yield
    finally:
        if info.is_main:
            barrier(info)


def wrap_model(model: nn.Module, info: DistInfo, sync_batchnorm: bool = False,
               find_unused_parameters: bool = False, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``info.device``); the model itself
    when single-process. Keep a reference to the unwrapped model for ``state_dict()``.

    Every module with trained parameters needs its wrapper: ``train.py`` wraps the embedding network
    and the loss head (whose class weights are trained too) separately and calls one after the other,
    so each averages its own gradients. ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm
    (CUDA only).
    """
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if sync_batchnorm:
        if info.device.type != "cuda":
            raise RuntimeError("SyncBatchNorm needs CUDA; train without sync_batchnorm on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [info.device.index])
        ddp_kwargs.setdefault("output_device", info.device.index)
    return DDP(model, find_unused_parameters=find_unused_parameters, **ddp_kwargs)


def make_sampler(dataset: Dataset, info: DistInfo, seed: int, epoch: int, shuffle: bool = True,
                 drop_last: bool = False) -> DistributedSampler:
    """This process's share of ``dataset`` for ``epoch``: a ``DistributedSampler`` (``shuffle`` with
    ``seed + epoch``, ``set_epoch`` already called). Pass it as ``DataLoader(..., sampler=...)`` (and
    no ``shuffle``). Rank r gets positions ``r, r + W, r + 2W, ...`` of the epoch's permutation, so
    batch k of all ranks together is exactly batch k of one process at a ``W`` times larger batch.
    Without ``drop_last`` the permutation is padded with its first items to a multiple of
    ``world_size`` (a few crops are seen twice per epoch); each rank then has ``ceil(N / W)`` items.
    """
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return sampler


def steps_per_epoch(n_items: int, per_process_batch: int, info: DistInfo, drop_last: bool = False) -> int:
    """Optimiser steps per epoch for each process (what the LR schedule must be built with)."""
    per_rank = n_items // info.world_size if drop_last else math.ceil(n_items / info.world_size)
    return math.ceil(per_rank / per_process_batch)


def effective_batch(per_process_batch: int, info: DistInfo) -> int:
    """Crops per optimiser step over all processes: ``per_process_batch * world_size``."""
    return per_process_batch * info.world_size


def scaled_lr(base_lr: float, info: DistInfo, per_process_batch: int, base_batch: int | None = None,
              rule: str = "linear") -> float:
    """Learning rate for the effective batch: ``linear`` (``base_lr * effective / base_batch``),
    ``sqrt`` (``base_lr * sqrt(effective / base_batch)``) or ``none``. ``base_batch`` is the batch
    ``base_lr`` was tuned for (default: ``per_process_batch``, i.e. scale by ``world_size``)."""
    k = effective_batch(per_process_batch, info) / (base_batch or per_process_batch)
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown LR scaling rule {rule!r}; choose linear, sqrt or none")


def _reduce(values: Sequence[float] | torch.Tensor, info: DistInfo, op) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1).clone()
    if info.device.type == "cuda":  # NCCL reduces device tensors only
        t = t.to(info.device)
    dist.all_reduce(t, op=op)
    return t.cpu()


def all_reduce_mean(value, info: DistInfo):
    """Mean of ``value`` over the processes (a float, a tensor or a list of floats; returned as the
    same kind). Identity with one process. Every process must call it (it is a collective)."""
    if not info.distributed:
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().to(torch.float64 if value.dtype != torch.float64 else value.dtype)
        out = _reduce(t, info, dist.ReduceOp.SUM) / info.world_size
        return out.reshape(value.shape).to(dtype=value.dtype, device=value.device)
    if isinstance(value, (list, tuple)):
        return [float(v) for v in _reduce(list(value), info, dist.ReduceOp.SUM) / info.world_size]
    return float(_reduce([float(value)], info, dist.ReduceOp.SUM)[0]) / info.world_size


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise sum of a list of floats over the processes (e.g. an epoch's ``[loss * n, acc * n,
    n]`` sums, whose ratio is then the exact mean over all crops)."""
    if not info.distributed:
        return [float(v) for v in values]
    return [float(v) for v in _reduce(list(values), info, dist.ReduceOp.SUM)]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every process if ``flag`` is true on any (e.g. a stop signal or a non-finite loss), so
    all ranks leave the loop at the same step. Identity with one process."""
    if not info.distributed:
        return bool(flag)
    return bool(_reduce([1.0 if flag else 0.0], info, dist.ReduceOp.MAX)[0] > 0)

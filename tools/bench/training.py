"""Training throughput: train.py's step (step 2.4) timed through the real input path and on
in-memory batches, and the same step with glibc's allocator setting, bfloat16 autocast and
torch.compile.

``lab_train_step`` is train.py's loop body, built from the same pieces in the same order
(``tests/test_benchmark_step.py`` checks that it reaches train.py's weights exactly), so the
benchmark times the step students run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from bench.kernels import analytic_step_flops, counted_step_flops, gemm_flops, gemm_seconds, matmul_peak, step_gemms
from bench.system import peak_rss_mb, quiet, run_bench_script, subprocess_env, summarize, sync
from dataset import SpkTrainDataset
from svlab import config as config_mod
from svlab import cpu_runtime
from svlab import models as speaker_model
from svlab.checkpoint import run_folder
from svlab.distributed import DistInfo
from svlab.features import feature_dim
from svlab.training import amp_dtype_for, autocast, check_loss, lr_lambda, warm_up_margin


# ------------------------------------------------------------------------------ the lab's step
@dataclass
class LabTraining:
    """What train.py builds for training: the embedding network, the loss head (``criterion``), Adam,
    the learning-rate schedule and the gradient scaler (active only for float16 autocast). ``steps``
    counts the steps taken: with ``steps_per_epoch`` it gives the epoch and step that the margin
    warm-up and the non-finite check use, as in train.py's loop."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_cfg: dict
    steps_per_epoch: int
    folder: Path  # the config's run folder, named in the message of a non-finite loss
    info: DistInfo = field(default_factory=DistInfo)
    steps: int = 0

    def train(self) -> None:
        self.model.train()
        self.criterion.train()


def build_training(cfg: dict, n_classes: int, steps_per_epoch: int, device: torch.device) -> LabTraining:
    """The model, loss, optimiser, schedule and scaler exactly as train.py builds them (same seed,
    same order, so the same initial weights)."""
    tcfg = cfg["train"]
    torch.manual_seed(tcfg["seed"])
    model = speaker_model.build_model(cfg["model"], feature_dim(cfg["features"])).to(device)
    criterion = speaker_model.build_loss(cfg["loss"], cfg["model"]["embedding_size"], n_classes).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *criterion.parameters()], lr=tcfg["lr"],
                                 weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(cfg, device) == torch.float16)
    return LabTraining(model, criterion, optimizer, scheduler, scaler, cfg["loss"], steps_per_epoch, run_folder(cfg),
                       DistInfo(device=device))


def lab_train_step(t: LabTraining, x: torch.Tensor, y: torch.Tensor,
                   amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step as train.py's loop body takes it: the batch to the device, the margin
    warm-up, forward and loss under autocast (when ``amp_dtype`` is given), the non-finite check
    before any weight changes, zero_grad, (scaled) backward, optimiser step, scaler update,
    scheduler step. Returns the detached ``(loss, acc)``."""
    device = next(t.model.parameters()).device
    epoch, step = divmod(t.steps, t.steps_per_epoch)
    epoch += 1
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    warm_up_margin(t.criterion, t.loss_cfg, epoch, step, t.steps_per_epoch)
    with autocast(device, amp_dtype):
        embeddings = t.model(x)
        loss, acc = t.criterion(embeddings, y)
    check_loss(loss, t.info, epoch, step + 1, t.folder)
    t.steps += 1
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return loss.detach(), acc.detach()


STEP_SOURCE = "bench.training.lab_train_step (train.py's loop body)"


def amp_dtype(cfg: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: fp32), as train.py chooses it."""
    return amp_dtype_for(cfg, device, log=quiet)


def real_batches(dataset: SpkTrainDataset, cfg: dict, device: torch.device):
    """Endless batches through the real input path: per epoch ``set_epoch`` and a new ``DataLoader``
    with train.py's seeded shuffle generator, ``collate_fn``, workers and pinning."""
    from torch.utils.data import DataLoader
    tcfg = cfg["train"]
    epoch = 0
    while True:
        epoch += 1
        dataset.set_epoch(epoch)
        order = torch.Generator().manual_seed(tcfg["seed"] * 100_003 + epoch)
        loader = DataLoader(dataset, batch_size=tcfg["batchsize"], shuffle=True, generator=order,
                            collate_fn=dataset.collate_fn, num_workers=tcfg["num_workers"],
                            pin_memory=device.type == "cuda")
        yield from loader


def reference_batches(batch: int, n_mfcc: int, frames: int, n_classes: int, device: torch.device):
    """Endless identical batches of random tensors already on the device (no data loading)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n_mfcc, frames, generator=g).to(device)
    y = torch.randint(0, n_classes, (batch,), generator=g).to(device)
    while True:
        yield x, y


def timed_steps(t: LabTraining, batches, steps: int, amp_dtype, device: torch.device) -> tuple[float, int]:
    """Run ``steps`` training steps, drawing each batch from ``batches`` inside the timed region.
    Returns ``(seconds, crops)``. Keeps the loop's per-step bookkeeping (``.item()`` syncs)."""
    sums = {"loss": 0.0, "acc": 0.0, "n": 0}
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss, acc = lab_train_step(t, x, y, amp_dtype)
        n = y.shape[0]
        sums["loss"] += loss.item() * n
        sums["acc"] += acc.item() * n
        sums["n"] += n
    sync(device)
    return time.perf_counter() - t0, sums["n"]


def rates(t: LabTraining, batches, runs: int, steps: int, amp_dtype, device: torch.device) -> list[float]:
    """Crops per second of ``runs`` timings of ``steps`` steps each."""
    out = []
    for _ in range(runs):
        dt, n = timed_steps(t, batches, steps, amp_dtype, device)
        out.append(n / dt)
    return out


def allocator_probe(keep: bool, batch: int, frames: int, n_classes: int, warmup: int, steps: int) -> dict:
    """Training steps of config.yaml's model on in-memory random batches (the reference loop) in this
    process, with glibc's default malloc settings or with ``cpu_runtime.keep_freed_memory()`` first.
    Meant for a fresh process (``measure_allocator``): once applied, the setting cannot be undone.
    Returns crops/s, minor page faults per step (``getrusage``) and the peak RSS (MiB)."""
    import resource
    cpu_runtime.warm_up_vector_math()
    if keep:
        applied, why = cpu_runtime.keep_freed_memory()
        if not applied:
            raise RuntimeError(why)
    cfg = config_mod.load_config()
    cfg["train"]["batchsize"] = batch
    device = torch.device("cpu")
    t = build_training(cfg, n_classes, 1000, device)
    t.train()
    batches = reference_batches(batch, feature_dim(cfg["features"]), frames, n_classes, device)
    timed_steps(t, batches, warmup, None, device)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds, crops = timed_steps(t, batches, steps, None, device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"crops_per_s": crops / seconds, "faults_per_step": faults / steps, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------ sections
def measure_training(bench) -> None:
    """Throughput through the real input path against the in-memory reference loop (interleaved),
    the input path alone, and the step's FLOPs (analytic and by ``FlopCounterMode``)."""
    cfg, device, result, s = bench.cfg, bench.device, bench.result, bench.s
    dataset = SpkTrainDataset(cfg, log=quiet)
    # as train.py does, after reading the features
    result["keep_freed_memory"] = cfg["train"]["keep_freed_memory"] and cpu_runtime.keep_freed_memory()[0]
    n_classes = len(dataset.speakers)
    batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], feature_dim(cfg["features"])
    steps_per_epoch = math.ceil(len(dataset) / batch)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t = build_training(cfg, n_classes, steps_per_epoch, device)
    t.train()
    amp = amp_dtype(cfg, device)
    result.update({
        "train_step_source": STEP_SOURCE, "batch_size": batch, "crop_frames": frames, "n_classes": n_classes,
        "train_utterances": len(dataset), "train_steps_per_run": s["train_steps"],
        "model": speaker_model.describe(cfg["model"], cfg["loss"]),
        "model_params": sum(p.numel() for p in t.model.parameters()),
        "amp_dtype": str(amp).replace("torch.", "") if amp is not None else None,
    })

    # FLOPs (shape-only, before any timing)
    flops = analytic_step_flops(t.model, t.criterion, batch, n_mfcc, frames, n_classes)
    counted = counted_step_flops(t.model, t.criterion, batch, n_mfcc, frames, n_classes)
    result.update(flops)
    result["step_flops_counted"] = counted
    result["step_flops_rel_diff"] = abs(flops["step_flops"] - counted) / counted

    real = real_batches(dataset, cfg, device)
    ref = reference_batches(batch, n_mfcc, frames, n_classes, device)
    timed_steps(t, real, s["warmup_steps"], amp, device)  # allocator, oneDNN/cuDNN plans, first loader
    timed_steps(t, ref, s["warmup_steps"], amp, device)
    train_rates, ref_rates = [], []
    for i in range(bench.runs):  # interleaved in A-B-B-A order, so load changes hit both loops alike
        for which in (("real", "ref") if i % 2 == 0 else ("ref", "real")):
            dt, n = timed_steps(t, real if which == "real" else ref, s["train_steps"], amp, device)
            (train_rates if which == "real" else ref_rates).append(n / dt)
    input_s = []
    for _ in range(bench.runs):  # the input path alone: crops, collate, a new loader each epoch
        t0 = time.perf_counter()
        for _ in range(s["train_steps"]):
            next(real)
        input_s.append((time.perf_counter() - t0) / s["train_steps"])
    bench.record("input_seconds_per_step", input_s)
    train_rate = bench.record("train_crops_per_s", train_rates)
    ref_rate = bench.record("reference_crops_per_s", ref_rates)
    result["train_vs_reference"] = train_rate / ref_rate
    paired = summarize([a / b for a, b in zip(train_rates, ref_rates)])
    bench.stats["train_vs_reference_paired"] = paired
    result["train_vs_reference_paired"] = paired["median"]
    per_crop = flops["step_flops"] / batch
    result["step_flops_per_s"] = per_crop * train_rate
    result["reference_flops_per_s"] = per_crop * ref_rate
    bench.stats["step_flops_per_s"] = summarize([per_crop * r for r in train_rates])
    bench.model = t.model  # reused (in eval mode) by the embedding section


def measure_allocator(bench) -> None:
    """glibc's default malloc against ``cpu_runtime.keep_freed_memory`` (``train.keep_freed_memory``):
    the reference loop in fresh processes, alternately with and without it (A-B, B-A, ...)."""
    if not cpu_runtime.has_tunable_malloc() or bench.device.type != "cpu":
        bench.result["allocator_speedup"] = None  # nothing to compare: not glibc, or a GPU run
        return
    batch, frames = bench.cfg["train"]["batchsize"], bench.cfg["train"]["crop_frames"]
    n_classes = bench.result.get("n_classes") or 32
    found = {True: [], False: []}
    for i in range(bench.cold_runs):
        for keep in ((False, True) if i % 2 == 0 else (True, False)):
            args = (keep, batch, frames, n_classes, bench.s["warmup_steps"], bench.s["train_steps"])
            script = ("import json\nfrom bench.training import allocator_probe\n"  # subprocess_env: tools/ importable
                      f"print('BENCH ' + json.dumps(allocator_probe(*{args!r})))\n")
            found[keep].append(run_bench_script(script, subprocess_env(bench.threads), "allocator probe"))
    for keep, name in ((False, "default"), (True, "keep")):
        bench.record(f"allocator_{name}_crops_per_s", [d["crops_per_s"] for d in found[keep]])
        bench.record(f"allocator_{name}_faults_per_step", [d["faults_per_step"] for d in found[keep]])
        peaks = [d["peak_rss_mb"] for d in found[keep] if d["peak_rss_mb"] is not None]
        if peaks:
            bench.record(f"allocator_{name}_peak_rss_mb", peaks)
    bench.record("allocator_speedup", [b["crops_per_s"] / a["crops_per_s"]
                                       for a, b in zip(found[False], found[True])])


def measure_bf16(bench) -> None:
    """CPU only: the reference loop under ``torch.autocast("cpu", bfloat16)`` (``train.amp: bf16``),
    interleaved with the float32 reference loop in this process (A-B-B-A), next to the bfloat16
    matmul peak and the step's own GEMMs in bfloat16. Skipped (keys null, ``bf16_native`` says why)
    on a GPU run or a CPU without native bfloat16, where it would only time an emulation."""
    native, what = cpu_runtime.native_bfloat16()
    result = bench.result
    result["bf16_native"] = what if native else None
    if bench.device.type != "cpu" or not native:
        result["bf16_skipped"] = "a GPU run" if bench.device.type != "cpu" else what
        return
    cfg, device, s = bench.cfg, bench.device, bench.s
    batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], feature_dim(cfg["features"])
    n_classes = result["n_classes"]
    t = build_training(cfg, n_classes, 1, device)
    t.train()
    ref = reference_batches(batch, n_mfcc, frames, n_classes, device)
    for amp in (None, torch.bfloat16):
        timed_steps(t, ref, s["warmup_steps"], amp, device)
    found = {None: [], torch.bfloat16: []}
    for i in range(bench.runs):
        for amp in ((None, torch.bfloat16) if i % 2 == 0 else (torch.bfloat16, None)):
            dt, n = timed_steps(t, ref, s["train_steps"], amp, device)
            found[amp].append(n / dt)
    bench.record("bf16_fp32_reference_crops_per_s", found[None])
    rate = bench.record("bf16_reference_crops_per_s", found[torch.bfloat16])
    bench.record("bf16_speedup", [b / a for a, b in zip(found[None], found[torch.bfloat16])])
    result["bf16_flops_per_s"] = result["step_flops"] / batch * rate
    by_size = matmul_peak(s["matmul_sizes"], bench.reps, device, torch.bfloat16)
    result["bf16_matmul_peak_flops_per_s"] = max(by_size.values())
    result["bf16_matmul_by_size"] = by_size
    gemms = step_gemms(cfg, n_classes)
    seconds = sum(gemm_seconds(g, device, bench.reps, torch.bfloat16) for g in gemms)
    result["bf16_gemm_seconds_per_step"] = seconds
    result["bf16_gemm_ceiling_flops_per_s"] = sum(gemm_flops(g) for g in gemms) / seconds


def measure_compiled(bench) -> None:
    """``--compile``: the reference loop (in-memory batches) with the embedding network wrapped in
    ``torch.compile``, as ``train.py --compile`` does; also under bfloat16 autocast where the CPU
    has it natively (``train.py --compile --amp bf16``)."""
    cfg, device, result, s = bench.cfg, bench.device, bench.result, bench.s
    batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], feature_dim(cfg["features"])
    n_classes = result["n_classes"]
    t = build_training(cfg, n_classes, 1, device)
    t.model = torch.compile(t.model)
    t.train()
    amp = amp_dtype(cfg, device)
    ref = reference_batches(batch, n_mfcc, frames, n_classes, device)
    t0 = time.perf_counter()
    timed_steps(t, ref, 1, amp, device)  # compiles
    result["compile_seconds"] = time.perf_counter() - t0
    timed_steps(t, ref, s["warmup_steps"], amp, device)
    rate = bench.record("compiled_reference_crops_per_s", rates(t, ref, bench.runs, s["train_steps"], amp, device))
    result["compiled_flops_per_s"] = result["step_flops"] / batch * rate
    if amp is None and result.get("bf16_reference_crops_per_s"):
        timed_steps(t, ref, 1 + s["warmup_steps"], torch.bfloat16, device)  # compiles
        rate = bench.record("bf16_compiled_reference_crops_per_s",
                            rates(t, ref, bench.runs, s["train_steps"], torch.bfloat16, device))
        result["bf16_compiled_flops_per_s"] = result["step_flops"] / batch * rate

"""Performance benchmark: features, training throughput, FLOPs, embedding, scoring, memory, start-up.

    python benchmark.py --json bench_results/cpu.json            # full run (a few minutes)
    python benchmark.py --quick --json /tmp/smoke.json           # smoke mode (tens of seconds)
    python benchmark.py --runs 7 --threads 4 --json out.json     # more repetitions, 4 torch threads
    python benchmark.py --gpu --json bench_results/gpu.json      # training/embedding on CUDA (autocast)

Everything runs on a small synthetic corpus generated into a temporary folder (``demo_corpus``), so
the numbers do not depend on the data you have. The model, loss and feature settings are those of
``config.yaml`` (the lab default: x-vector, GAP, softmax, 40 MFCCs); training is measured at batch 64
with 2-s crops (200 frames), 4 steps (one epoch of the 256-utterance corpus) per run after 2 warm-up
steps (``--quick``: batch 8, 2 steps). Every measurement is repeated ``--runs`` times (default 5; the ones that
start a fresh process, MFCC cold start and train.py's first epoch, 3 times unless ``--runs`` is given;
``--quick``: 2 and 1, on smaller sizes). The JSON holds the median of each measurement; ``stats``
holds its spread. Run it on an otherwise idle machine: the timings are only as quiet as the machine
(``loadavg_start``/``loadavg_end`` record how busy it was). A full run takes a few minutes.

JSON keys (numbers are medians over the runs unless noted; rates are per second of wall time)

==============================  =========================================================================
key                             meaning
==============================  =========================================================================
train_crops_per_s               training throughput through the real input path: ``SpkTrainDataset``
                                crops + ``DataLoader`` (shuffle, ``collate_fn``, as ``train.train``
                                builds it, a new loader each epoch) + forward + backward + Adam step +
                                LR-scheduler step + the per-step ``loss.item()``/``acc.item()`` of the
                                training loop. Crops (training examples) per second.
reference_crops_per_s           the same model, optimizer and step on random tensors already in memory
                                (no data loading); measured interleaved with the above, same process
train_vs_reference              ``train_crops_per_s / reference_crops_per_s`` (1.0 = the input path
                                costs nothing; 0.8 = data loading takes 20 % of a step)
input_seconds_per_step          the input path alone (no model): seconds to produce one batch of crops
                                through SpkTrainDataset + DataLoader (new loader each epoch)
train_vs_reference_paired       median of the per-run ratios (the two loops run back to back in each
                                run, A-B-B-A): more robust than the ratio of medians on a busy machine
step_flops                      floating-point operations of one training step at the benchmark batch,
                                counted analytically: every Conv1d/Linear (and a margin head's cosine
                                matmul) costs ``2 * MACs`` forward, ``2 * MACs`` for the weight gradient
                                and ``2 * MACs`` for the input gradient (not for the first layer, whose
                                input needs no gradient). Pointwise ops (BatchNorm, ReLU, pooling,
                                softmax, Adam) are not counted, as in ``FlopCounterMode``.
step_flops_counted              the same, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
                                forward + backward (on the meta device; for real on the CPU where a
                                module cannot run there, e.g. a margin head's autocast region);
                                ``step_flops_rel_diff`` = ``|step_flops - step_flops_counted| /
                                step_flops_counted`` (0 for every model/pooling/loss of the project)
step_flops_rule_of_three        the textbook estimate ``6 * MACs`` (forward + 2x backward everywhere)
step_flops_per_s                achieved FLOP/s of training: ``step_flops / batch * train_crops_per_s``
reference_flops_per_s           the same for the reference loop
matmul_peak_flops_per_s         measured matmul peak on this machine, same thread count: the best of
                                several ``torch.matmul`` timings of n x n matrices, ``2 n^3 / seconds``
                                (CPU: fp32, n = 2048 and 4096, --quick 512 and 1024; GPU: the autocast
                                dtype, n = 4096 and 8192)
flops_vs_peak                   ``step_flops_per_s / matmul_peak_flops_per_s``: how much of the
                                machine's dense-matmul speed training achieves
gemm_seconds_per_step           the step's own matrix products (``layer_gemms``: per Conv1d/Linear the
                                forward, weight-gradient and input-gradient product) timed as plain
                                ``torch.matmul`` calls on contiguous fp32 matrices of exactly those
                                shapes, summed (median per product over the runs)
gemm_ceiling_flops_per_s        ``step_flops / gemm_seconds_per_step``: what a step could reach if
                                everything else (BatchNorm, ReLU, pooling, copies, Adam) were free
gemm_ceiling_vs_peak            ``gemm_ceiling_flops_per_s / matmul_peak_flops_per_s``: the upper bound
                                of ``flops_vs_peak`` at these layer shapes (small ``k``/``n`` run below
                                the square-matmul peak)
reference_vs_gemm_ceiling       ``reference_flops_per_s / gemm_ceiling_flops_per_s``: how close the
                                step is to its own GEMMs
gemm_by_layer                   per product: shape, seconds and FLOP/s
nongemm_seconds_per_step        reference step time minus ``gemm_seconds_per_step``: what the step
                                spends outside its matrix products (BatchNorm, ReLU, pooling, copies,
                                Adam, and GEMMs running below their stand-alone speed)
memory_bandwidth_bytes_per_s    copying one fp32 buffer into another (256 MiB; --quick 32 MiB), bytes
                                read + written per second, median over the runs
activation_bytes_per_step       fp32 bytes of all Conv1d/Linear outputs of the embedding network in
                                one step (``activation_bytes``)
elementwise_floor_seconds       ``elementwise_passes`` (5) x ``activation_bytes_per_step`` /
                                ``memory_bandwidth_bytes_per_s``: the least time the step's elementwise
                                work (ReLU, BatchNorm forward and backward) can take even perfectly
                                fused, outside the GEMM kernels (see ``ELEMENTWISE_PASSES``)
step_bound_flops_per_s          ``step_flops / (gemm_seconds_per_step + elementwise_floor_seconds)``:
                                the fastest such a step can run on this machine
step_bound_vs_peak              ``step_bound_flops_per_s / matmul_peak_flops_per_s``: the highest
                                ``flops_vs_peak`` any fp32 implementation built on these GEMMs can reach
stock_elementwise_seconds       PyTorch's own ReLU + BatchNorm kernels, forward and backward in training
                                mode, timed on tensors shaped like every Conv1d output of the step
                                (``stock_elementwise_seconds``; median per layer, summed)
stock_bound_flops_per_s         ``step_flops / (gemm_seconds_per_step + stock_elementwise_seconds)`` and
stock_bound_vs_peak             its ratio to the peak: the best any implementation that keeps those
                                stock kernels can do, however fast its convolutions are
keep_freed_memory               whether ``cpu_runtime.keep_freed_memory`` was applied before the training
                                section (``train.keep_freed_memory``, as ``train.py`` does)
allocator_default_crops_per_s   the reference loop in a fresh process with glibc's default ``malloc``
allocator_keep_crops_per_s      ... and with ``cpu_runtime.keep_freed_memory()`` (pairs alternate A-B,
                                B-A; 3 pairs, --quick 1); ``allocator_speedup`` is the median of the
                                per-pair ratios kept / default; null where the C library is not glibc
allocator_default_faults_per_step  minor page faults per training step in those processes
allocator_keep_faults_per_step     (``getrusage``), and ``allocator_default_peak_rss_mb`` /
                                ``allocator_keep_peak_rss_mb`` their peak resident memory (MiB)
bf16_reference_crops_per_s      the reference loop under ``torch.autocast("cpu", dtype=torch.bfloat16)``
                                (``train.amp: bf16``), interleaved A-B-B-A with the fp32 reference loop
                                in one process (``bf16_fp32_reference_crops_per_s``); ``bf16_speedup`` is
                                the median of the per-run ratios bf16 / fp32. CPU runs on a CPU with
                                native bfloat16 only (``bf16_native``: AMX-BF16 or AVX512-BF16, else null
                                and ``bf16_skipped`` says why; the keys are then absent)
bf16_flops_per_s                ``step_flops`` per second in that loop; ``bf16_flops_vs_peak`` against
bf16_matmul_peak_flops_per_s    the bfloat16 matmul peak measured like ``matmul_peak_flops_per_s``,
                                ``bf16_flops_vs_fp32_peak`` against the fp32 one
bf16_gemm_seconds_per_step      the step's GEMMs (``layer_gemms``) as plain bfloat16 matmuls;
                                ``bf16_gemm_ceiling_flops_per_s`` and ``bf16_gemm_ceiling_vs_peak`` (its
                                ratio to the bf16 peak) as for fp32
compiled_reference_crops_per_s  (``--compile`` only) the reference loop with the network wrapped in
                                ``torch.compile`` (as ``train.py --compile``); ``compiled_flops_per_s``,
                                ``compiled_flops_vs_peak``, ``compiled_vs_reference`` (speed-up over the
                                eager reference) and ``compile_seconds`` (the first, compiling step)
bf16_compiled_reference_crops_per_s  (``--compile`` on a CPU with native bfloat16) the same compiled
                                network under bfloat16 autocast (``train.py --compile --amp bf16``);
                                ``bf16_compiled_vs_reference`` is its ratio to the eager fp32
                                ``reference_crops_per_s``, ``bf16_compiled_flops_vs_peak`` its FLOP/s
                                over ``bf16_matmul_peak_flops_per_s``
mfcc_utts_per_s                 warm feature extraction (``dataset.extract_features`` = ``load_audio``
                                + ``mfcc`` per file, one process), utterances per second
mfcc_x_realtime                 the same as seconds of audio processed per second of wall time
mfcc_parallel_utts_per_s        ``extract_features`` with its default worker pool (what ``train.py``
mfcc_parallel_x_realtime        does for 64 files or more, pool start-up included); null with fewer
                                files (--quick)
mfcc_cold_seconds               latency of the first ``mfcc(load_audio(...))`` call in a fresh process:
                                librosa import, numba JIT start-up (or cache load), one utterance
mfcc_cold_warm_call_seconds     the second call on the same file in that process (the warm cost)
mfcc_cold_process_seconds       wall time of that whole subprocess (interpreter, torch and numpy
                                imports, both calls)
mfcc_cold_nocache_seconds       the first call with an empty numba cache (``NUMBA_CACHE_DIR`` = a new
                                folder): the one-off cost of the very first run after installing
                                librosa (one sample; null in --quick)
embed_utts_per_s                embedding extraction through ``EER.embed_dataset`` on a
                                ``SpkTestDataset`` of whole 2-4 s utterances (equal-length batches,
                                i.e. mostly one utterance per forward, exactly as ``EER.py`` does)
embed_fixed_batch_utts_per_s    the model on one batch of ``test.batch_size`` 3-s (300-frame) inputs:
                                the speed-up batching could give
embed_x_realtime                ``embed_utts_per_s`` in seconds of audio per second
score_trials_per_s              ``EER.cosine_scores`` on random ``score_embeddings x 512`` embeddings
                                (10,000) and ``score_trials`` random pairs (1,000,000)
first_epoch_seconds             cold time to the first epoch: wall time from starting
                                ``python train.py --epochs 1`` (on the generated corpus, a fresh empty
                                feature cache, config.yaml's training settings: batch 64, 1-s crops) to
                                its
                                ``Train Stage: 1/`` line: interpreter + imports + MFCC extraction of the
                                training set + model build + one epoch
first_epoch_startup_seconds     ... of which until its first output line (imports, config)
first_epoch_features_seconds    ... of which reading the training data (as train.py reports it)
first_epoch_train_seconds       ... of which the epoch itself (as train.py reports it)
first_epoch_process_seconds     wall time of the whole train.py run (checkpoint, log and plot included)
peak_rss_mb                     peak resident memory of the benchmark process (VmHWM on Linux, else
                                ``getrusage``), MiB
first_epoch_peak_rss_mb         peak resident memory of the train.py process of the first-epoch run
                                (config.yaml's batch and crop; its MFCC worker processes not included),
                                read from ``/proc/<pid>/status`` VmHWM at its last output line; null
                                where there is no /proc, MiB
rss_after_section_mb            peak resident memory after each section (shows which one sets it)
stats                           per measurement: ``median``, ``min``, ``max``, ``q1``, ``q3``, ``iqr``,
                                ``n`` and the raw ``samples`` (rates per run)
==============================  =========================================================================

Also recorded: ``torch_version``, ``python_version``, ``librosa_version``, ``numpy_version``,
``threads`` (torch intra-op threads; subprocesses get ``OMP_NUM_THREADS`` = this), ``device``,
``device_name``, ``amp_dtype`` (``train.amp`` on this device; null: fp32), ``matmul_dtype``, ``cpu_model`` (``/proc/cpuinfo``), ``cpu_count``, ``platform``,
``loadavg_start``/``loadavg_end`` (1-minute load; a loaded machine gives slow, noisy numbers),
``quick``, ``runs``, ``batch_size``, ``crop_frames``, ``model`` (tag), ``model_params``,
``n_classes``, ``train_steps_per_run``, ``matmul_sizes``, ``matmul_by_size`` (best FLOP/s per
size), ``train_step_source`` (which step function was timed), ``errors`` (sections that failed).

``--gpu`` runs training, reference, matmul peak and embedding on CUDA with ``torch.autocast`` in
bfloat16 where supported (else float16 with a ``GradScaler``), exactly as ``train.py`` does on a GPU
(``train.amp: auto``);
MFCC, scoring and the FLOP count stay on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # progress bars would bury the table; tqdm reads this when torch imports it
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn as nn

PROJECT = Path(__file__).resolve().parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import cpu_runtime  # noqa: E402
import config as config_mod  # noqa: E402
import demo_corpus  # noqa: E402
import distributed  # noqa: E402
import speaker_model  # noqa: E402
import train as train_mod  # noqa: E402
from dataset import SpkTestDataset, SpkTrainDataset, extract_features, load_audio, mfcc  # noqa: E402

REQUIRED_KEYS = ("train_crops_per_s", "reference_crops_per_s", "train_vs_reference", "step_flops",
                 "step_flops_per_s", "matmul_peak_flops_per_s", "flops_vs_peak", "mfcc_x_realtime",
                 "embed_utts_per_s", "score_trials_per_s", "peak_rss_mb")

# Benchmark sizes. "full" is the default; "quick" is the smoke mode of the test suite.
SETTINGS = {
    "full": dict(corpus=dict(n_train_speakers=32, n_test_speakers=8, utts_per_speaker=8, test_utts_per_speaker=8,
                             min_seconds=2.0, max_seconds=4.0),
                 batch=64, crop_frames=200, train_steps=4, warmup_steps=2, matmul_sizes=(2048, 4096),
                 matmul_reps=5, score_embeddings=10_000, score_trials=1_000_000, cold_runs=3,
                 bandwidth_mib=256),
    "quick": dict(corpus=dict(n_train_speakers=8, n_test_speakers=4, utts_per_speaker=4, test_utts_per_speaker=4,
                              min_seconds=2.0, max_seconds=4.0),
                  batch=8, crop_frames=200, train_steps=2, warmup_steps=1, matmul_sizes=(512, 1024),
                  matmul_reps=3, score_embeddings=2_000, score_trials=100_000, cold_runs=1,
                  bandwidth_mib=32),
}
QUICK_RUNS = 2
# Passes over every frame-layer output (fp32) that even a perfectly fused Conv -> ReLU -> BatchNorm step
# cannot avoid outside its GEMMs: forward, ReLU + batch statistics in one read-write pass (2); backward,
# ReLU mask and BatchNorm gradient in one pass that reads the incoming gradient and the activation and
# writes the outgoing gradient (3). (The normalisation folded into the next layer's weights, the
# BatchNorm gradient's per-channel sums taken from the weight-gradient GEMM: both free.)
ELEMENTWISE_PASSES = 5
GPU_MATMUL_SIZES = (4096, 8192)
SUBPROCESS_TIMEOUT_S = 900


def _quiet(*args, **kwargs) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def summarize(samples: list[float]) -> dict:
    """Median and spread of a list of measurements."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "iqr": None, "n": 0, "samples": []}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "iqr": q3 - q1,
            "n": len(xs), "samples": [float(s) for s in samples]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (``/proc/self/status`` VmHWM on Linux, else
    ``getrusage``: bytes on macOS; the peak working set on Windows)."""
    hwm = vm_hwm_mb()
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        return _windows_peak_rss_mb()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _windows_peak_rss_mb() -> float | None:
    try:
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                    "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]
        c = Counters()
        c.cb = ctypes.sizeof(Counters)
        ctypes.windll.psapi.GetProcessMemoryInfo(ctypes.windll.kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb)
        return c.PeakWorkingSetSize / (1024.0 * 1024.0)
    except Exception:
        return None


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size ("high water mark") of a live process in MiB, from
    ``/proc/<pid>/status`` (Linux); None elsewhere or once the process is gone. Unlike ``getrusage``
    after ``fork``/``exec`` it counts only the program itself, not the parent's pages at fork time."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def subprocess_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "TQDM_DISABLE": "1"})
    env["PYTHONPATH"] = str(PROJECT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_bench_script(script: str, env: dict, what: str) -> dict:
    """Run ``python -c script`` in the project folder; return the JSON of its last ``BENCH {...}`` line.
    Raises with the end of its output if it fails or prints no such line."""
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{what} subprocess failed (exit {out.returncode}): {(out.stderr or out.stdout)[-800:]}")
    return json.loads(lines[-1][6:])


def amp_dtype(cfg: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: fp32), as ``train.train`` chooses it."""
    return train_mod.amp_dtype_for(cfg, device, log=_quiet)


def resolve_step_function():
    """The training step timed here is ``train.train_step``, the very function ``train.train`` runs."""
    return train_mod.train_step, "train.train_step"


def build_training(cfg: dict, n_classes: int, steps_per_epoch: int, device: torch.device):
    """``(net, optimizer, scheduler, scaler)`` built exactly as ``train.train`` builds them; ``net`` is
    a ``distributed.ModelWithHead`` whose ``.model`` and ``.head`` are the two modules."""
    tcfg = cfg["train"]
    torch.manual_seed(tcfg["seed"])
    model = speaker_model.build_model(cfg["model"], cfg["features"]["n_mfcc"]).to(device)
    head = speaker_model.build_loss(cfg["loss"], cfg["model"]["embedding_size"], n_classes).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_mod.lr_lambda(tcfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(cfg, device) == torch.float16)
    return distributed.ModelWithHead(model, head), optimizer, scheduler, scaler


def real_batches(dataset: SpkTrainDataset, cfg: dict, device: torch.device):
    """Endless batches through the real input path: per epoch ``set_epoch`` and a new ``DataLoader``
    with the seeded shuffle generator, ``collate_fn``, workers and pinning of ``train.train``."""
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


def timed_steps(step_fn, parts, batches, steps: int, amp_dtype, device: torch.device) -> tuple[float, int]:
    """Run ``steps`` training steps, drawing each batch from ``batches`` inside the timed region.
    Returns ``(seconds, crops)``. Keeps the loop's per-step bookkeeping (``.item()`` syncs)."""
    net, optimizer, scheduler, scaler = parts
    sums = {"loss": 0.0, "acc": 0.0, "n": 0}
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss, acc = step_fn(net, optimizer, scheduler, scaler, x, y, amp_dtype)
        n = y.shape[0]
        sums["loss"] += loss.item() * n
        sums["acc"] += acc.item() * n
        sums["n"] += n
    sync(device)
    return time.perf_counter() - t0, sums["n"]


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def layer_gemms(model: nn.Module, head: nn.Module, batch: int, n_mfcc: int, frames: int) -> list[dict]:
    """The matrix products of one training step, one entry per Conv1d/Conv2d/Linear (and a margin
    head's cosine matmul), from layer shapes.

    A forward pass of the embedding network on the meta device (shapes only, no arithmetic) records
    each layer's output shape. Each entry is ``{"layer", "m", "k", "n", "groups", "input_grad"}``: the
    forward product is ``groups`` times an ``(m, k) @ (k, n)`` matmul (``m`` output positions, ``k`` =
    input channels per group x kernel size, ``n`` output channels per group), whose MACs are
    ``groups * m * k * n``; ``input_grad`` says whether the backward pass also needs the input gradient
    (not for the first layer, which sees the data).
    """
    m = copy.deepcopy(model).to("meta").train()
    records = []

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            groups = module.groups
            k = (module.in_channels // groups) * math.prod(module.kernel_size)
            n = module.out_channels // groups
            positions = output.numel() // module.out_channels
        else:  # Linear
            groups, k, n = 1, module.in_features, module.out_features
            positions = output.numel() // module.out_features
        records.append({"layer": type(module).__name__, "m": positions, "k": k, "n": n, "groups": groups,
                        "input_grad": bool(inputs[0].requires_grad)})

    handles = [mod.register_forward_hook(hook) for mod in m.modules()
               if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    try:
        m(torch.empty(batch, n_mfcc, frames, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    linears = [mod for mod in head.modules() if isinstance(mod, nn.Linear)]
    if linears:
        for lin in linears:
            records.append({"layer": "head_linear", "m": batch, "k": lin.in_features, "n": lin.out_features,
                            "groups": 1, "input_grad": True})
    else:
        W = getattr(head, "W", None)
        if isinstance(W, torch.Tensor) and W.dim() == 2:  # cosine logits: (batch, emb) @ (emb, classes)
            records.append({"layer": "head_cosine_matmul", "m": batch, "k": W.shape[0], "n": W.shape[1],
                            "groups": 1, "input_grad": True})
    return records


def gemm_flops(g: dict) -> float:
    """Training-step FLOPs of one ``layer_gemms`` entry: 2 MACs forward, 2 for the weight gradient,
    2 for the input gradient where it is needed."""
    return 2.0 * g["groups"] * g["m"] * g["k"] * g["n"] * (3 if g["input_grad"] else 2)


def analytic_step_flops(model: nn.Module, head: nn.Module, batch: int, n_mfcc: int, frames: int,
                        n_classes: int) -> dict:
    """FLOPs of one training step (forward + backward) at ``batch``, from layer shapes
    (``layer_gemms``): forward 2 MACs, weight gradient 2 MACs, input gradient 2 MACs where that input
    needs a gradient (not for the first layer, which sees the data).
    """
    gemms = layer_gemms(model, head, batch, n_mfcc, frames)
    macs = sum(g["groups"] * g["m"] * g["k"] * g["n"] for g in gemms)
    flops = sum(gemm_flops(g) for g in gemms)
    return {"step_flops": float(flops), "step_macs_forward": float(macs), "step_flops_rule_of_three": float(6 * macs),
            "layers_counted": len(gemms)}


def gemm_seconds(g: dict, device: torch.device, reps: int, dtype: torch.dtype = torch.float32) -> float:
    """Median seconds of the plain matmuls one ``layer_gemms`` entry costs in a training step:
    forward ``(m, k) @ (k, n)``, weight gradient ``(k, m) @ (m, n)``, input gradient ``(m, n) @ (n, k)``
    (where needed), on contiguous ``dtype`` matrices, each times ``groups``; the median over ``reps``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(g["m"], g["k"], generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(g["k"], g["n"], generator=gen).to(device=device, dtype=dtype)
    d = torch.randn(g["m"], g["n"], generator=gen).to(device=device, dtype=dtype)
    products = [(a, w), (a.t(), d)] + ([(d, w.t())] if g["input_grad"] else [])
    total = 0.0
    for x, y in products:
        out = torch.empty(x.shape[0], y.shape[1], device=device, dtype=dtype)
        torch.matmul(x, y, out=out)
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            torch.matmul(x, y, out=out)
            sync(device)
            times.append(time.perf_counter() - t0)
        total += statistics.median(times) * g["groups"]
    return total


def counted_step_flops(model: nn.Module, head: nn.Module, batch: int, n_mfcc: int, frames: int,
                       n_classes: int) -> float:
    """FLOPs of one forward + backward by ``torch.utils.flop_counter.FlopCounterMode``: on the meta
    device (free), or for real on the CPU where a module cannot run on meta (e.g. autocast regions)."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(device: str) -> float:
        m = copy.deepcopy(model).to(device).train()
        h = copy.deepcopy(head).to(device).train()
        x = torch.zeros(batch, n_mfcc, frames, device=device)
        y = torch.arange(batch, device=device) % n_classes
        with FlopCounterMode(display=False) as counter:
            loss, _ = h(m(x), y)
            loss.backward()
        return float(counter.get_total_flops())
    try:
        return count("meta")
    except (RuntimeError, NotImplementedError):
        return count("cpu")


def matmul_peak(sizes, reps: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Best ``2 n^3 / s`` over ``reps`` timings of an n x n matmul for each n (after one warm-up)."""
    by_size = {}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)
        sync(device)
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        by_size[str(n)] = 2.0 * n ** 3 / best
        del a, b, out
    return by_size


def memory_bandwidth(mib: int, reps: int, device: torch.device) -> float:
    """Median bytes per second of copying one ``mib`` MiB fp32 buffer into another (both allocated and
    touched beforehand), counting the bytes read and the bytes written."""
    n = mib * 2 ** 20 // 4
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n * 4 / statistics.median(times)


def activation_bytes(gemms: list[dict]) -> int:
    """fp32 bytes of every output of the embedding network's Conv1d/Linear layers in one step (the
    ``layer_gemms`` entries without the loss head's): what its elementwise work has to stream."""
    return sum(4 * g["groups"] * g["m"] * g["n"] for g in gemms if not g["layer"].startswith("head"))


def stock_elementwise_seconds(gemms: list[dict], batch: int, device: torch.device, reps: int) -> float:
    """Seconds per training step of PyTorch's own ReLU and BatchNorm kernels (forward and backward, as
    ``TDNNLayer`` runs them) on tensors of the shape of every Conv1d output of the step: each layer's
    median over ``reps``, summed. Together with ``gemm_seconds_per_step`` it bounds any implementation
    that keeps these stock kernels (``stock_bound_vs_peak``)."""
    total = 0.0
    for g in gemms:
        if g["layer"] != "Conv1d":
            continue
        shape = (batch, g["n"] * g["groups"], g["m"] // batch)
        z = torch.randn(shape, device=device, requires_grad=True)
        grad = torch.randn(shape, device=device)
        weight = torch.ones(shape[1], device=device, requires_grad=True)
        bias = torch.zeros(shape[1], device=device, requires_grad=True)
        running = (torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device))
        times = []
        for i in range(reps + 1):  # the first run allocates
            sync(device)
            t0 = time.perf_counter()
            y = torch.nn.functional.batch_norm(torch.relu(z), *running, weight, bias, training=True)
            y.backward(grad)
            z.grad = weight.grad = bias.grad = None
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        total += statistics.median(times)
        del z, grad, y
    return total


def allocator_probe(keep: bool, batch: int, frames: int, n_classes: int, warmup: int, steps: int) -> dict:
    """Training steps of config.yaml's model on in-memory random batches (the reference loop) in this
    process, with glibc's default malloc settings or with ``cpu_runtime.keep_freed_memory()`` first.
    Meant for a fresh process (``Bench.bench_allocator``): once applied, the setting cannot be undone.
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
    parts = build_training(cfg, n_classes, 1000, device)
    parts[0].train()
    step_fn, _ = resolve_step_function()
    batches = reference_batches(batch, cfg["features"]["n_mfcc"], frames, n_classes, device)
    timed_steps(step_fn, parts, batches, warmup, None, device)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds, crops = timed_steps(step_fn, parts, batches, steps, None, device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"crops_per_s": crops / seconds, "faults_per_step": faults / steps, "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.quick = args.quick
        self.s = SETTINGS["quick" if args.quick else "full"]
        self.runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else 5)
        # fresh-process measurements (MFCC cold start, train.py first epoch) take seconds each: fewer
        # of them unless --runs asks for a number explicitly
        self.cold_runs = args.runs if args.runs is not None else self.s["cold_runs"]
        self.workdir = workdir
        self.threads = torch.get_num_threads()
        self.device = torch.device("cuda") if args.gpu else torch.device("cpu")
        self.result: dict = {}
        self.stats: dict = {}
        self.errors: dict = {}
        self.rss_by_section: dict = {}
        self.corpus = None
        self.cfg = None

    # ---- bookkeeping
    def record(self, key: str, samples: list[float]) -> float:
        st = summarize(samples)
        self.stats[key] = st
        self.result[key] = st["median"]
        return st["median"]

    def section(self, name: str, fn) -> None:
        print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one failed section must not lose the others
            import traceback
            traceback.print_exc()
            self.errors[name] = f"{type(e).__name__}: {e}"
        rss = peak_rss_mb()
        self.rss_by_section[name] = round(rss, 1) if rss is not None else None
        print(f"[benchmark] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    # ---- corpus and config
    def make_corpus(self) -> None:
        base = self.workdir / "corpus"
        root, files = base / "audio", base / "files"
        demo_corpus.generate(root, params=self.s["corpus"], files_dir=files, workers=None, log=_quiet)
        self.corpus = {"root": root, "train": files / "split_train_set.txt", "test": files / "test_set.txt",
                       "trials": files / "trials.txt"}
        self.cfg = config_mod.load_config(None, self.overrides(self.workdir / "feature_cache", self.workdir / "runs"))
        self.cfg["train"]["batchsize"] = self.s["batch"]
        self.cfg["train"]["crop_frames"] = self.s["crop_frames"]

    def overrides(self, cache_dir: Path, save_dir: Path) -> dict:
        c = self.corpus
        return {"data.root": str(c["root"]), "data.train_manifest": str(c["train"]), "test.root": str(c["root"]),
                "test.test_manifest": str(c["test"]), "test.trials": str(c["trials"]),
                "features.cache_dir": str(cache_dir), "train.save_dir": str(save_dir)}

    def audio_paths(self, manifest: Path) -> list[Path]:
        lines = [ln.split(maxsplit=1) for ln in manifest.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [self.corpus["root"] / rel for _, rel in lines]

    # ---- MFCC
    def bench_mfcc(self) -> None:
        import soundfile as sf
        feat_cfg = {**self.cfg["features"], "cache_dir": ""}
        paths = self.audio_paths(self.corpus["train"]) + self.audio_paths(self.corpus["test"])
        audio_s = sum(sf.info(str(p)).duration for p in paths)
        mfcc(load_audio(paths[0], feat_cfg["sample_rate"]), feat_cfg)  # warm-up: librosa import, JIT
        rates, xrt = [], []
        for _ in range(self.runs):
            t0 = time.perf_counter()
            feats, problems = extract_features(paths, feat_cfg, workers=1, desc="bench MFCC")
            dt = time.perf_counter() - t0
            if problems:
                raise RuntimeError(f"feature extraction failed: {problems[:3]}")
            rates.append(len(paths) / dt)
            xrt.append(audio_s / dt)
        self.record("mfcc_utts_per_s", rates)
        self.record("mfcc_x_realtime", xrt)
        self.result["mfcc_audio_seconds"] = round(audio_s, 3)
        self.result["mfcc_utterances"] = len(paths)
        workers = min(os.cpu_count() or 1, 8)
        if len(paths) >= 64 and workers > 1:  # extract_features' own threshold for its process pool
            rates, xrt = [], []
            for _ in range(self.runs):
                t0 = time.perf_counter()
                extract_features(paths, feat_cfg, desc="bench MFCC")
                dt = time.perf_counter() - t0
                rates.append(len(paths) / dt)
                xrt.append(audio_s / dt)
            self.record("mfcc_parallel_utts_per_s", rates)
            self.record("mfcc_parallel_x_realtime", xrt)
            self.result["mfcc_parallel_workers"] = workers
        else:
            self.result["mfcc_parallel_utts_per_s"] = self.result["mfcc_parallel_x_realtime"] = None

    def bench_mfcc_cold(self) -> None:
        path = self.audio_paths(self.corpus["train"])[0]
        feat_cfg = {k: v for k, v in self.cfg["features"].items() if k != "cache_dir"}
        script = (
            "import json, sys, time\n"
            "t0 = time.perf_counter()\n"
            "import dataset\n"
            "t1 = time.perf_counter()\n"
            f"cfg = json.loads({json.dumps(json.dumps(feat_cfg))})\n"
            f"path = {str(path)!r}\n"
            "dataset.mfcc(dataset.load_audio(path, cfg['sample_rate']), cfg)\n"
            "t2 = time.perf_counter()\n"
            "dataset.mfcc(dataset.load_audio(path, cfg['sample_rate']), cfg)\n"
            "t3 = time.perf_counter()\n"
            "print('BENCH ' + json.dumps({'import': t1 - t0, 'first': t2 - t1, 'second': t3 - t2}))\n"
        )
        n = self.cold_runs
        first, second, proc = [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            d = run_bench_script(script, subprocess_env(self.threads), "MFCC cold-start")
            wall = time.perf_counter() - t0
            first.append(d["first"])
            second.append(d["second"])
            proc.append(wall)
        self.record("mfcc_cold_seconds", first)
        self.record("mfcc_cold_warm_call_seconds", second)
        self.record("mfcc_cold_process_seconds", proc)
        if self.quick:  # ~15-20 s of numba compilation: full mode only
            self.result["mfcc_cold_nocache_seconds"] = None
            return
        # First run after installing: numba compiles librosa's kernels because its cache is empty.
        env = subprocess_env(self.threads)
        with tempfile.TemporaryDirectory(prefix="numba_cache_") as cache:
            env["NUMBA_CACHE_DIR"] = cache
            d = run_bench_script(script, env, "MFCC no-cache")
        self.record("mfcc_cold_nocache_seconds", [d["first"]])

    # ---- training throughput and FLOPs
    def bench_training(self) -> None:
        cfg, device = self.cfg, self.device
        dataset = SpkTrainDataset(cfg, log=_quiet)
        # as train.train does, after reading the features
        self.result["keep_freed_memory"] = cfg["train"]["keep_freed_memory"] and cpu_runtime.keep_freed_memory()[0]
        n_classes = len(dataset.speakers)
        batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], cfg["features"]["n_mfcc"]
        steps_per_epoch = math.ceil(len(dataset) / batch)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        parts = build_training(cfg, n_classes, steps_per_epoch, device)
        model, head = parts[0].model, parts[0].head
        parts[0].train()
        amp = amp_dtype(cfg, device)
        step_fn, source = resolve_step_function()
        self.result.update({
            "train_step_source": source, "batch_size": batch, "crop_frames": frames, "n_classes": n_classes,
            "train_utterances": len(dataset), "train_steps_per_run": self.s["train_steps"],
            "model": speaker_model.describe(cfg["model"], cfg["loss"]),
            "model_params": sum(p.numel() for p in model.parameters()),
            "amp_dtype": str(amp).replace("torch.", "") if amp is not None else None,
        })

        # FLOPs (shape-only, before any timing)
        flops = analytic_step_flops(model, head, batch, n_mfcc, frames, n_classes)
        counted = counted_step_flops(model, head, batch, n_mfcc, frames, n_classes)
        self.result.update(flops)
        self.result["step_flops_counted"] = counted
        self.result["step_flops_rel_diff"] = abs(flops["step_flops"] - counted) / counted

        real = real_batches(dataset, cfg, device)
        ref = reference_batches(batch, n_mfcc, frames, n_classes, device)
        warm = self.s["warmup_steps"]
        timed_steps(step_fn, parts, real, warm, amp, device)  # allocator, oneDNN/cuDNN plans, first loader
        timed_steps(step_fn, parts, ref, warm, amp, device)
        train_rates, ref_rates = [], []
        for i in range(self.runs):  # interleaved in A-B-B-A order, so load changes hit both loops alike
            for which in (("real", "ref") if i % 2 == 0 else ("ref", "real")):
                dt, n = timed_steps(step_fn, parts, real if which == "real" else ref, self.s["train_steps"],
                                    amp, device)
                (train_rates if which == "real" else ref_rates).append(n / dt)
        input_s = []
        for _ in range(self.runs):  # the input path alone: crops, collate, a new loader each epoch
            t0 = time.perf_counter()
            for _ in range(self.s["train_steps"]):
                next(real)
            input_s.append((time.perf_counter() - t0) / self.s["train_steps"])
        self.record("input_seconds_per_step", input_s)
        train_rate = self.record("train_crops_per_s", train_rates)
        ref_rate = self.record("reference_crops_per_s", ref_rates)
        self.result["train_vs_reference"] = train_rate / ref_rate
        paired = summarize([a / b for a, b in zip(train_rates, ref_rates)])
        self.stats["train_vs_reference_paired"] = paired
        self.result["train_vs_reference_paired"] = paired["median"]
        per_crop = flops["step_flops"] / batch
        self.result["step_flops_per_s"] = per_crop * train_rate
        self.result["reference_flops_per_s"] = per_crop * ref_rate
        self.stats["step_flops_per_s"] = summarize([per_crop * r for r in train_rates])
        self.model, self.head = model, head  # reused (in eval mode) by the embedding section
        del dataset, real

    def bench_gemms(self) -> None:
        """The step's own matrix products as plain matmuls: what the step would cost if everything but
        its GEMMs were free, at exactly its layer shapes."""
        cfg, device = self.cfg, self.device
        batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], cfg["features"]["n_mfcc"]
        model = speaker_model.build_model(cfg["model"], n_mfcc)
        head = speaker_model.build_loss(cfg["loss"], cfg["model"]["embedding_size"], self.result["n_classes"])
        gemms = layer_gemms(model, head, batch, n_mfcc, frames)
        reps = max(self.s["matmul_reps"], self.runs)
        per_layer = []
        for g in gemms:
            seconds = gemm_seconds(g, device, reps)
            per_layer.append({**g, "seconds": seconds, "flops_per_s": gemm_flops(g) / seconds})
        total = sum(r["seconds"] for r in per_layer)
        flops = sum(gemm_flops(g) for g in gemms)
        self.result["gemm_seconds_per_step"] = total
        self.result["gemm_ceiling_flops_per_s"] = flops / total
        self.result["gemm_by_layer"] = per_layer
        # The elementwise floor: what the step's BatchNorm/ReLU work costs at the least, at the
        # machine's measured memory bandwidth (see ELEMENTWISE_PASSES).
        bandwidth = self.record("memory_bandwidth_bytes_per_s",
                                [memory_bandwidth(self.s["bandwidth_mib"], reps, device) for _ in range(self.runs)])
        act = activation_bytes(gemms)
        floor = ELEMENTWISE_PASSES * act / bandwidth
        self.result.update({"activation_bytes_per_step": act, "elementwise_passes": ELEMENTWISE_PASSES,
                            "elementwise_floor_seconds": floor,
                            "step_bound_flops_per_s": flops / (total + floor)})
        stock = stock_elementwise_seconds(gemms, batch, device, reps)
        self.result["stock_elementwise_seconds"] = stock
        self.result["stock_bound_flops_per_s"] = flops / (total + stock)
        if self.result.get("reference_crops_per_s"):
            step_s = self.result["batch_size"] / self.result["reference_crops_per_s"]
            self.result["nongemm_seconds_per_step"] = step_s - total

    def bench_allocator(self) -> None:
        """glibc's default malloc against ``cpu_runtime.keep_freed_memory`` (``train.keep_freed_memory``):
        the reference loop in fresh processes, alternately with and without it (A-B, B-A, ...)."""
        if not cpu_runtime.has_tunable_malloc() or self.device.type != "cpu":
            self.result["allocator_speedup"] = None  # nothing to compare: not glibc, or a GPU run
            return
        batch, frames = self.cfg["train"]["batchsize"], self.cfg["train"]["crop_frames"]
        n_classes = self.result.get("n_classes") or 32
        found = {True: [], False: []}
        for i in range(self.cold_runs):
            for keep in ((False, True) if i % 2 == 0 else (True, False)):
                args = (keep, batch, frames, n_classes, self.s["warmup_steps"], self.s["train_steps"])
                script = ("import json, benchmark\n"
                          f"print('BENCH ' + json.dumps(benchmark.allocator_probe(*{args!r})))\n")
                found[keep].append(run_bench_script(script, subprocess_env(self.threads), "allocator probe"))
        for keep, name in ((False, "default"), (True, "keep")):
            self.record(f"allocator_{name}_crops_per_s", [d["crops_per_s"] for d in found[keep]])
            self.record(f"allocator_{name}_faults_per_step", [d["faults_per_step"] for d in found[keep]])
            peaks = [d["peak_rss_mb"] for d in found[keep] if d["peak_rss_mb"] is not None]
            if peaks:
                self.record(f"allocator_{name}_peak_rss_mb", peaks)
        self.record("allocator_speedup", [b["crops_per_s"] / a["crops_per_s"]
                                          for a, b in zip(found[False], found[True])])

    def bench_compiled(self) -> None:
        """``--compile``: the reference loop (in-memory batches) with the embedding network wrapped in
        ``torch.compile``, as ``train.py --compile`` does."""
        cfg, device = self.cfg, self.device
        batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], cfg["features"]["n_mfcc"]
        n_classes = self.result["n_classes"]
        parts = build_training(cfg, n_classes, 1, device)
        parts[0].model = torch.compile(parts[0].model)
        parts[0].train()
        amp = amp_dtype(cfg, device)
        step_fn, _ = resolve_step_function()
        ref = reference_batches(batch, n_mfcc, frames, n_classes, device)
        t0 = time.perf_counter()
        timed_steps(step_fn, parts, ref, 1, amp, device)  # compiles
        self.result["compile_seconds"] = time.perf_counter() - t0
        timed_steps(step_fn, parts, ref, self.s["warmup_steps"], amp, device)
        rates = []
        for _ in range(self.runs):
            dt, n = timed_steps(step_fn, parts, ref, self.s["train_steps"], amp, device)
            rates.append(n / dt)
        rate = self.record("compiled_reference_crops_per_s", rates)
        self.result["compiled_flops_per_s"] = self.result["step_flops"] / batch * rate
        if amp is None and self.result.get("bf16_reference_crops_per_s"):  # train.py --compile --amp bf16
            timed_steps(step_fn, parts, ref, 1 + self.s["warmup_steps"], torch.bfloat16, device)  # compiles
            rates = []
            for _ in range(self.runs):
                dt, n = timed_steps(step_fn, parts, ref, self.s["train_steps"], torch.bfloat16, device)
                rates.append(n / dt)
            rate = self.record("bf16_compiled_reference_crops_per_s", rates)
            self.result["bf16_compiled_flops_per_s"] = self.result["step_flops"] / batch * rate

    def bench_bf16(self) -> None:
        """CPU only: the reference loop under ``torch.autocast("cpu", bfloat16)`` (``train.amp: bf16``),
        interleaved with the float32 reference loop in this process (A-B-B-A), next to the bfloat16
        matmul peak and the step's own GEMMs in bfloat16. Skipped (keys null, ``bf16_native`` says why)
        on a GPU run or a CPU without native bfloat16, where it would only time an emulation."""
        native, what = cpu_runtime.native_bfloat16()
        self.result["bf16_native"] = what if native else None
        if self.device.type != "cpu" or not native:
            self.result["bf16_skipped"] = "a GPU run" if self.device.type != "cpu" else what
            return
        cfg, device = self.cfg, self.device
        batch, frames, n_mfcc = cfg["train"]["batchsize"], cfg["train"]["crop_frames"], cfg["features"]["n_mfcc"]
        n_classes = self.result["n_classes"]
        parts = build_training(cfg, n_classes, 1, device)
        parts[0].train()
        step_fn, _ = resolve_step_function()
        ref = reference_batches(batch, n_mfcc, frames, n_classes, device)
        for amp in (None, torch.bfloat16):
            timed_steps(step_fn, parts, ref, self.s["warmup_steps"], amp, device)
        rates = {None: [], torch.bfloat16: []}
        for i in range(self.runs):
            for amp in ((None, torch.bfloat16) if i % 2 == 0 else (torch.bfloat16, None)):
                dt, n = timed_steps(step_fn, parts, ref, self.s["train_steps"], amp, device)
                rates[amp].append(n / dt)
        self.record("bf16_fp32_reference_crops_per_s", rates[None])
        rate = self.record("bf16_reference_crops_per_s", rates[torch.bfloat16])
        self.record("bf16_speedup", [b / a for a, b in zip(rates[None], rates[torch.bfloat16])])
        self.result["bf16_flops_per_s"] = self.result["step_flops"] / batch * rate
        reps = max(self.s["matmul_reps"], self.runs)
        by_size = matmul_peak(self.s["matmul_sizes"], reps, device, torch.bfloat16)
        self.result["bf16_matmul_peak_flops_per_s"] = max(by_size.values())
        self.result["bf16_matmul_by_size"] = by_size
        model = speaker_model.build_model(cfg["model"], n_mfcc)
        head = speaker_model.build_loss(cfg["loss"], cfg["model"]["embedding_size"], n_classes)
        gemms = layer_gemms(model, head, batch, n_mfcc, frames)
        seconds = sum(gemm_seconds(g, device, reps, torch.bfloat16) for g in gemms)
        self.result["bf16_gemm_seconds_per_step"] = seconds
        self.result["bf16_gemm_ceiling_flops_per_s"] = sum(gemm_flops(g) for g in gemms) / seconds

    def bench_matmul(self) -> None:
        device = self.device
        if device.type == "cuda":
            dtype = amp_dtype(self.cfg, device) or torch.float32
            sizes = GPU_MATMUL_SIZES
        else:
            dtype, sizes = torch.float32, self.s["matmul_sizes"]
        reps = max(self.s["matmul_reps"], self.runs)
        by_size = matmul_peak(sizes, reps, device, dtype)
        self.result["matmul_peak_flops_per_s"] = max(by_size.values())
        self.result["matmul_by_size"] = by_size
        self.result["matmul_sizes"] = list(sizes)
        self.result["matmul_dtype"] = str(dtype).replace("torch.", "")

    # ---- embedding and scoring
    def bench_embedding(self) -> None:
        import EER
        device = self.device
        model = getattr(self, "model", None)
        if model is None:  # training section failed: a fresh model is as good for timing
            model = speaker_model.build_model(self.cfg["model"], self.cfg["features"]["n_mfcc"]).to(device)
        model.eval()
        ds = SpkTestDataset(self.cfg, log=_quiet)
        bs = self.cfg["test"]["batch_size"]
        frames = sum(f.shape[1] for f in ds.features)
        audio_s = frames * self.cfg["features"]["hop_length_ms"] / 1000.0
        EER.embed_dataset(model, ds, bs, device)  # warm-up
        rates = []
        for _ in range(self.runs):
            sync(device)
            t0 = time.perf_counter()
            emb = EER.embed_dataset(model, ds, bs, device)
            sync(device)
            rates.append(len(ds) / (time.perf_counter() - t0))
        assert emb.shape[0] == len(ds)
        rate = self.record("embed_utts_per_s", rates)
        self.result["embed_x_realtime"] = rate * audio_s / len(ds)
        self.result["embed_utterances"] = len(ds)
        self.result["embed_batches"] = len(ds.equal_length_batches(bs))
        x = torch.randn(bs, self.cfg["features"]["n_mfcc"], 300).to(device)
        rates = []
        with torch.no_grad():
            model(x)
            for _ in range(self.runs):
                sync(device)
                t0 = time.perf_counter()
                model(x).float().cpu()
                sync(device)
                rates.append(bs / (time.perf_counter() - t0))
        self.record("embed_fixed_batch_utts_per_s", rates)

    def bench_scoring(self) -> None:
        import EER
        rng = np.random.default_rng(0)
        n_emb, n_trials = self.s["score_embeddings"], self.s["score_trials"]
        emb = rng.standard_normal((n_emb, 512), dtype=np.float32)
        a = rng.integers(0, n_emb, n_trials)
        b = rng.integers(0, n_emb, n_trials)
        EER.cosine_scores(emb, a[:1000], b[:1000])  # warm-up
        rates = []
        for _ in range(self.runs):
            t0 = time.perf_counter()
            scores = EER.cosine_scores(emb, a, b)
            rates.append(n_trials / (time.perf_counter() - t0))
        assert scores.shape == (n_trials,)
        self.record("score_trials_per_s", rates)
        self.result["score_embeddings"] = n_emb
        self.result["score_trials"] = n_trials

    # ---- cold start of train.py
    def bench_first_epoch(self) -> None:
        first, startup, feats, epoch, total, peak = [], [], [], [], [], []
        for i in range(self.cold_runs):
            run_dir = self.workdir / f"first_epoch_{i}"
            ov = self.overrides(run_dir / "feature_cache", run_dir / "runs")  # fresh, empty feature cache
            cmd = [sys.executable, "-u", str(PROJECT / "train.py"), "--epochs", "1", "--n_folder", "bench",
                   "--gpu", "0" if self.device.type == "cuda" else "-1"]
            for k, v in ov.items():
                cmd += ["--set", f"{k}={v}"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=PROJECT, env=subprocess_env(self.threads), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            t_first_line = t_stage = rss = None
            feat_s = epoch_s = None
            tail = []
            try:
                for line in proc.stdout:
                    now = time.perf_counter() - t0
                    hwm = vm_hwm_mb(proc.pid)  # the process is alive while it prints
                    if hwm is not None:
                        rss = hwm if rss is None else max(rss, hwm)
                    tail = (tail + [line])[-40:]
                    if t_first_line is None and line.strip():
                        t_first_line = now
                    m = re.search(r"features ready in ([0-9.]+)\s*s", line)
                    if m:
                        feat_s = float(m.group(1))
                    if t_stage is None and "Train Stage: 1/" in line:
                        t_stage = now
                        m = re.search(r"([0-9.]+)s\)\s*$", line.strip())
                        epoch_s = float(m.group(1)) if m else None
                rc = proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            wall = time.perf_counter() - t0
            if rc != 0 or t_stage is None:
                raise RuntimeError(f"train.py exited with {rc} before/after 'Train Stage: 1/': {''.join(tail)[-1500:]}")
            first.append(t_stage)
            total.append(wall)
            if rss is not None:
                peak.append(rss)
            if t_first_line is not None:
                startup.append(t_first_line)
            if feat_s is not None:
                feats.append(feat_s)
            if epoch_s is not None:
                epoch.append(epoch_s)
            shutil.rmtree(run_dir, ignore_errors=True)
        self.record("first_epoch_seconds", first)
        self.record("first_epoch_process_seconds", total)
        self.record("first_epoch_startup_seconds", startup)
        self.record("first_epoch_features_seconds", feats)
        self.record("first_epoch_train_seconds", epoch)
        self.record("first_epoch_peak_rss_mb", peak)

    # ---- all
    def run(self) -> dict:
        args = self.args
        self.result.update({
            "quick": bool(self.quick), "runs": self.runs, "threads": self.threads, "device": str(self.device),
            "device_name": torch.cuda.get_device_name(0) if self.device.type == "cuda" else cpu_model(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "numpy_version": np.__version__, "librosa_version": _librosa_version(),
            "loadavg_start": loadavg(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        cpu_runtime.warm_up_vector_math()  # as train.py and EER.py do
        self.section("corpus", self.make_corpus)
        if self.corpus is None:
            raise RuntimeError(f"could not generate the benchmark corpus: {self.errors.get('corpus')}")
        self.section("mfcc", self.bench_mfcc)
        self.section("mfcc_cold", self.bench_mfcc_cold)
        self.section("training", self.bench_training)
        self.section("matmul", self.bench_matmul)
        self.section("gemms", self.bench_gemms)
        self.section("allocator", self.bench_allocator)
        self.section("bf16", self.bench_bf16)
        if args.compile:
            self.section("compiled", self.bench_compiled)
        self.section("embedding", self.bench_embedding)
        self.section("scoring", self.bench_scoring)
        if not args.skip_first_epoch:
            self.section("first_epoch", self.bench_first_epoch)
        r = self.result
        peak = r.get("matmul_peak_flops_per_s")
        if r.get("step_flops_per_s") and peak:
            r["flops_vs_peak"] = r["step_flops_per_s"] / peak
        if r.get("gemm_ceiling_flops_per_s") and peak:
            r["gemm_ceiling_vs_peak"] = r["gemm_ceiling_flops_per_s"] / peak
            r["step_bound_vs_peak"] = r["step_bound_flops_per_s"] / peak
            r["stock_bound_vs_peak"] = r["stock_bound_flops_per_s"] / peak
            if r.get("reference_flops_per_s"):
                r["reference_vs_gemm_ceiling"] = r["reference_flops_per_s"] / r["gemm_ceiling_flops_per_s"]
        if r.get("bf16_flops_per_s") and peak:
            r["bf16_flops_vs_fp32_peak"] = r["bf16_flops_per_s"] / peak
            r["bf16_flops_vs_peak"] = r["bf16_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"]
            r["bf16_gemm_ceiling_vs_peak"] = r["bf16_gemm_ceiling_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"]
        if r.get("compiled_flops_per_s") and peak:
            r["compiled_flops_vs_peak"] = r["compiled_flops_per_s"] / peak
            r["compiled_vs_reference"] = r["compiled_reference_crops_per_s"] / r["reference_crops_per_s"]
        if r.get("bf16_compiled_flops_per_s"):
            r["bf16_compiled_vs_reference"] = r["bf16_compiled_reference_crops_per_s"] / r["reference_crops_per_s"]
            r["bf16_compiled_flops_vs_peak"] = r["bf16_compiled_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"]
        rss = peak_rss_mb()
        r["peak_rss_mb"] = round(rss, 1) if rss is not None else None
        r["rss_after_section_mb"] = self.rss_by_section
        r["loadavg_end"] = loadavg()
        r["stats"] = self.stats
        r["errors"] = self.errors
        missing = [k for k in REQUIRED_KEYS if not _is_positive_number(r.get(k))]
        if missing:
            self.errors["missing"] = f"no value for {', '.join(missing)}"
        return r


def _librosa_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("librosa")
    except Exception:
        return None


def _is_positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
TABLE = [
    ("MFCC extraction, warm (1 process)", "mfcc_utts_per_s", "utt/s", 1.0),
    ("  x real time", "mfcc_x_realtime", "x", 1.0),
    ("MFCC extraction, worker pool", "mfcc_parallel_utts_per_s", "utt/s", 1.0),
    ("  x real time", "mfcc_parallel_x_realtime", "x", 1.0),
    ("MFCC first call, fresh process", "mfcc_cold_seconds", "s", 1.0),
    ("  second call", "mfcc_cold_warm_call_seconds", "s", 1.0),
    ("  with an empty numba cache", "mfcc_cold_nocache_seconds", "s", 1.0),
    ("Training, real input path", "train_crops_per_s", "crops/s", 1.0),
    ("Training, in-memory reference", "reference_crops_per_s", "crops/s", 1.0),
    ("  train / reference", "train_vs_reference", "", 1.0),
    ("  same, median of per-run ratios", "train_vs_reference_paired", "", 1.0),
    ("  input path alone, per batch", "input_seconds_per_step", "ms", 1e3),
    ("FLOPs per training step (analytic)", "step_flops", "GFLOP", 1e-9),
    ("  FlopCounterMode", "step_flops_counted", "GFLOP", 1e-9),
    ("Achieved (training)", "step_flops_per_s", "GFLOP/s", 1e-9),
    ("Matmul peak", "matmul_peak_flops_per_s", "GFLOP/s", 1e-9),
    ("  training / peak", "flops_vs_peak", "", 1.0),
    ("The step's GEMMs alone (plain matmuls)", "gemm_ceiling_flops_per_s", "GFLOP/s", 1e-9),
    ("  GEMMs / peak (the step's ceiling)", "gemm_ceiling_vs_peak", "", 1.0),
    ("  reference / GEMMs", "reference_vs_gemm_ceiling", "", 1.0),
    ("  reference step outside its GEMMs", "nongemm_seconds_per_step", "ms", 1e3),
    ("Memory bandwidth (copy, read + write)", "memory_bandwidth_bytes_per_s", "GB/s", 1e-9),
    ("  BatchNorm/ReLU floor per step", "elementwise_floor_seconds", "ms", 1e3),
    ("  bound: GEMMs + floor, / peak", "step_bound_vs_peak", "", 1.0),
    ("ReLU + BatchNorm, PyTorch's kernels", "stock_elementwise_seconds", "ms", 1e3),
    ("  bound: GEMMs + those, / peak", "stock_bound_vs_peak", "", 1.0),
    ("Reference, glibc malloc default", "allocator_default_crops_per_s", "crops/s", 1.0),
    ("Reference, keep_freed_memory", "allocator_keep_crops_per_s", "crops/s", 1.0),
    ("  speed-up (median of pairs)", "allocator_speedup", "x", 1.0),
    ("  page faults per step, default", "allocator_default_faults_per_step", "", 1.0),
    ("  page faults per step, kept", "allocator_keep_faults_per_step", "", 1.0),
    ("  peak RSS, default", "allocator_default_peak_rss_mb", "MiB", 1.0),
    ("  peak RSS, kept", "allocator_keep_peak_rss_mb", "MiB", 1.0),
    ("Reference, bf16 autocast (train.amp)", "bf16_reference_crops_per_s", "crops/s", 1.0),
    ("  fp32 reference, interleaved", "bf16_fp32_reference_crops_per_s", "crops/s", 1.0),
    ("  speed-up (median of pairs)", "bf16_speedup", "x", 1.0),
    ("  achieved", "bf16_flops_per_s", "GFLOP/s", 1e-9),
    ("  bf16 matmul peak", "bf16_matmul_peak_flops_per_s", "GFLOP/s", 1e-9),
    ("  achieved / bf16 peak", "bf16_flops_vs_peak", "", 1.0),
    ("  achieved / fp32 peak", "bf16_flops_vs_fp32_peak", "", 1.0),
    ("  the step's GEMMs in bf16 / bf16 peak", "bf16_gemm_ceiling_vs_peak", "", 1.0),
    ("Reference, torch.compile (--compile)", "compiled_reference_crops_per_s", "crops/s", 1.0),
    ("  achieved", "compiled_flops_per_s", "GFLOP/s", 1e-9),
    ("  compiled / peak", "compiled_flops_vs_peak", "", 1.0),
    ("  compiled / eager reference", "compiled_vs_reference", "", 1.0),
    ("  compile time (first step)", "compile_seconds", "s", 1.0),
    ("Reference, bf16 + torch.compile", "bf16_compiled_reference_crops_per_s", "crops/s", 1.0),
    ("  / fp32 eager reference", "bf16_compiled_vs_reference", "x", 1.0),
    ("  achieved / bf16 peak", "bf16_compiled_flops_vs_peak", "", 1.0),
    ("Embedding (EER.embed_dataset)", "embed_utts_per_s", "utt/s", 1.0),
    ("Embedding, one fixed batch", "embed_fixed_batch_utts_per_s", "utt/s", 1.0),
    ("Cosine scoring", "score_trials_per_s", "trials/s", 1.0),
    ("First epoch, cold (train.py)", "first_epoch_seconds", "s", 1.0),
    ("  start-up (imports)", "first_epoch_startup_seconds", "s", 1.0),
    ("  features", "first_epoch_features_seconds", "s", 1.0),
    ("  epoch", "first_epoch_train_seconds", "s", 1.0),
    ("Peak RSS (benchmark process)", "peak_rss_mb", "MiB", 1.0),
    ("Peak RSS (train.py, first epoch)", "first_epoch_peak_rss_mb", "MiB", 1.0),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    av = abs(v)
    if av >= 1e5:
        return f"{v:,.0f}"
    if av >= 100:
        return f"{v:.0f}"
    if av >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def format_table(r: dict) -> str:
    stats = r.get("stats", {})
    head = f"{'measurement':38s} {'median':>12s} {'min':>10s} {'max':>10s} {'n':>3s}  unit"
    lines = [head, "-" * len(head)]
    for label, key, unit, scale in TABLE:
        v = r.get(key)
        st = stats.get(key, {})
        lo, hi = st.get("min"), st.get("max")
        lines.append(f"{label:38s} {_fmt(v * scale if v is not None else None):>12s} "
                     f"{_fmt(lo * scale if lo is not None else None):>10s} "
                     f"{_fmt(hi * scale if hi is not None else None):>10s} {st.get('n', ''):>3}  {unit}")
    lines.append("")
    lines.append(f"{r.get('model')} | batch {r.get('batch_size')} x {r.get('crop_frames')} frames | "
                 f"device {r.get('device')} ({r.get('device_name')}) | {r.get('threads')} threads | "
                 f"torch {r.get('torch_version')} | load {r.get('loadavg_start')} -> {r.get('loadavg_end')}")
    lines.append(f"timed step: {r.get('train_step_source')}")
    if r.get("errors"):
        lines.append("ERRORS: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Benchmark features, training throughput, FLOPs, embedding, scoring, "
                                             "memory and start-up time on a generated corpus.")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="fast smoke mode (small sizes, 2 runs)")
    ap.add_argument("--runs", type=int, default=None, help="repetitions of every measurement (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads, also OMP_NUM_THREADS of subprocesses (default: torch's default)")
    ap.add_argument("--gpu", action="store_true", help="training, matmul peak and embedding on CUDA with autocast")
    ap.add_argument("--skip_first_epoch", action="store_true", help="leave out the train.py cold-start runs")
    ap.add_argument("--compile", action="store_true",
                    help="also time the reference loop with torch.compile (needs a C++ compiler on the CPU)")
    ap.add_argument("--keep", default=None, help="keep the generated corpus and runs in this folder (default: temp)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs is not None and args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu given but CUDA is not available (torch " + torch.__version__ + ")", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.keep:
        workdir = Path(args.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="speaker_bench_")
        workdir = Path(cleanup.name)
    try:
        result = Bench(args, workdir).run()
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    print(format_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
        print(f"results written to {out}")
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

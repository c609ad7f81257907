"""FLOPs of a training step and the machine's ceilings for it: the matmul peak, the step's own
matrix products (GEMMs) as plain matmuls, memory bandwidth, and PyTorch's ReLU + BatchNorm kernels.

``layer_gemms`` lists the step's products from layer shapes; ``analytic_step_flops`` counts them
and ``counted_step_flops`` cross-checks with ``FlopCounterMode``. The sections ``measure_matmul``
and ``measure_gemms`` turn them into the ``matmul_*``, ``gemm_*``, ``memory_bandwidth_*``,
``elementwise_*``, ``step_bound_*`` and ``stock_*`` keys.
"""
from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn as nn

from bench.system import quiet, sync
from svlab import models as speaker_model
from svlab.features import feature_dim
from svlab.training import amp_dtype_for

# Passes over every frame-layer output (fp32) that even a perfectly fused Conv -> ReLU -> BatchNorm step
# cannot avoid outside its GEMMs: forward, ReLU + batch statistics in one read-write pass (2); backward,
# ReLU mask and BatchNorm gradient in one pass that reads the incoming gradient and the activation and
# writes the outgoing gradient (3). (The normalisation folded into the next layer's weights, the
# BatchNorm gradient's per-channel sums taken from the weight-gradient GEMM: both free.)
ELEMENTWISE_PASSES = 5
GPU_MATMUL_SIZES = (4096, 8192)


# ---------------------------------------------------------------------------------------- FLOPs
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


# ------------------------------------------------------------------------------------- kernels
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


def step_gemms(cfg: dict, n_classes: int) -> list[dict]:
    """``layer_gemms`` of config ``cfg``'s model and loss head at its training batch and crop."""
    n_mfcc = feature_dim(cfg["features"])
    model = speaker_model.build_model(cfg["model"], n_mfcc)
    head = speaker_model.build_loss(cfg["loss"], cfg["model"]["embedding_size"], n_classes)
    return layer_gemms(model, head, cfg["train"]["batchsize"], n_mfcc, cfg["train"]["crop_frames"])


# ------------------------------------------------------------------------------------ sections
def measure_matmul(bench) -> None:
    """The dense-matmul peak at the thread count of the run: fp32 on the CPU, the autocast dtype of
    ``train.amp`` on a GPU."""
    device = bench.device
    if device.type == "cuda":
        dtype = amp_dtype_for(bench.cfg, device, log=quiet) or torch.float32
        sizes = GPU_MATMUL_SIZES
    else:
        dtype, sizes = torch.float32, bench.s["matmul_sizes"]
    by_size = matmul_peak(sizes, bench.reps, device, dtype)
    bench.result["matmul_peak_flops_per_s"] = max(by_size.values())
    bench.result["matmul_by_size"] = by_size
    bench.result["matmul_sizes"] = list(sizes)
    bench.result["matmul_dtype"] = str(dtype).replace("torch.", "")


def measure_gemms(bench) -> None:
    """The step's own matrix products as plain matmuls: what the step would cost if everything but
    its GEMMs were free, at exactly its layer shapes; then the elementwise floor at the measured
    memory bandwidth and PyTorch's own ReLU + BatchNorm kernels at the same shapes."""
    device, result, reps = bench.device, bench.result, bench.reps
    gemms = step_gemms(bench.cfg, result["n_classes"])
    per_layer = []
    for g in gemms:
        seconds = gemm_seconds(g, device, reps)
        per_layer.append({**g, "seconds": seconds, "flops_per_s": gemm_flops(g) / seconds})
    total = sum(r["seconds"] for r in per_layer)
    flops = sum(gemm_flops(g) for g in gemms)
    result["gemm_seconds_per_step"] = total
    result["gemm_ceiling_flops_per_s"] = flops / total
    result["gemm_by_layer"] = per_layer
    bandwidth = bench.record("memory_bandwidth_bytes_per_s",
                             [memory_bandwidth(bench.s["bandwidth_mib"], reps, device) for _ in range(bench.runs)])
    act = activation_bytes(gemms)
    floor = ELEMENTWISE_PASSES * act / bandwidth
    result.update({"activation_bytes_per_step": act, "elementwise_passes": ELEMENTWISE_PASSES,
                   "elementwise_floor_seconds": floor, "step_bound_flops_per_s": flops / (total + floor)})
    stock = stock_elementwise_seconds(gemms, bench.cfg["train"]["batchsize"], device, reps)
    result["stock_elementwise_seconds"] = stock
    result["stock_bound_flops_per_s"] = flops / (total + stock)
    if result.get("reference_crops_per_s"):
        step_s = result["batch_size"] / result["reference_crops_per_s"]
        result["nongemm_seconds_per_step"] = step_s - total

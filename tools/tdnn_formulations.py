"""Other ways to compute the x-vector's frame layers, timed against the lab's ``nn.Conv1d`` TDNN.

    python tools/tdnn_formulations.py --json bench_results/tdnn_formulations.json
    python tools/tdnn_formulations.py --compile      # also the torch.compile variants (compiling takes a while)
    python tools/tdnn_formulations.py --compile --amp bf16   # the same steps under bfloat16 autocast
    python tools/tdnn_formulations.py --compile --compile_mode max-autotune

The question it answers (docs/performance.md): is there a faster correct formulation of the
training step than ``xvector.Xvector`` with ``nn.Conv1d`` -> ReLU -> BatchNorm1d? Each candidate
computes exactly the same function with the same parameters (checked in float64 against the
Conv1d model: output and every parameter gradient), then full training steps (forward, backward,
Adam) of batch 64 x 200 frames are timed, formulations interleaved, and reported as the median step
time and its ratio to the Conv1d step of the same run.

Formulations
    conv1d             the lab's model as it is (``xvector.Xvector``)
    matmul             channels-last: the batch flattened to one (batch * frames, channels) matrix;
                       a layer with kernel k and dilation d is k accumulating matrix products of
                       frame-shifted row slices (``addmm_``, no im2col copy), frames that would mix two
                       utterances dropped afterwards; a custom autograd function whose backward is
                       again plain matrix products; BatchNorm on the 2-D matrix
    conv1d_compiled    ``torch.compile`` of the Conv1d model (``--compile``)
    matmul_compiled    ``torch.compile`` of the matmul formulation written in plain ops, each
                       BatchNorm folded into the next layer's weights (``--compile``)

``--amp bf16`` runs every step under ``torch.autocast("cpu", torch.bfloat16)`` as ``train.amp: bf16``
does (the float64 check is unchanged); ``--compile_mode`` is passed to ``torch.compile``.

Nothing here is used by training; docs/performance.md quotes its numbers, with the command that measured them.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab import cpu_runtime  # noqa: E402
from svlab.files import atomic_write, json_with_keys, refuse_overwrite  # noqa: E402
from svlab.guard import run_command  # noqa: E402
from pooling import GlobalAveragePooling  # noqa: E402
from xvector import FRAME_LAYERS, Xvector  # noqa: E402


class ShiftedMatmulTDNN(torch.autograd.Function):
    """One dilated TDNN convolution on channels-last frames, as ``kernel`` accumulating GEMMs.

    ``x``: ``(batch * frames, in_channels)`` (utterance after utterance); ``weight``: Conv1d's
    ``(out_channels, in_channels, kernel)``; returns ``(batch * (frames - context), out_channels)``.
    Row ``r`` of the product over the whole flattened sequence is frame ``r % frames`` of utterance
    ``r // frames``; rows whose receptive field crosses into the next utterance are computed and
    dropped (``context`` per utterance, 2-4 % of the work), which keeps every product one big GEMM.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)  # only under autocast
    def forward(ctx, x, weight, bias, batch: int, frames: int, dilation: int):
        out_ch, kernel = weight.shape[0], weight.shape[2]
        context = (kernel - 1) * dilation
        rows, out_frames = batch * frames - context, frames - context
        taps = weight.permute(2, 1, 0).contiguous()  # (kernel, in, out)
        y = torch.addmm(bias, x[:rows], taps[0])
        for j in range(1, kernel):
            y.addmm_(x[j * dilation:j * dilation + rows], taps[j])
        ctx.save_for_backward(x, taps)
        ctx.shape = (batch, frames, dilation, kernel, context, rows, out_frames)
        if context == 0:
            return y
        return y.as_strided((batch, out_frames, out_ch), (frames * out_ch, out_ch, 1)).reshape(-1, out_ch)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, taps = ctx.saved_tensors
        batch, frames, dilation, kernel, context, rows, out_frames = ctx.shape
        out_ch = grad.shape[1]
        full = grad.new_zeros(rows, out_ch)  # dropped rows get no gradient
        full.as_strided((batch, out_frames, out_ch), (frames * out_ch, out_ch, 1)).copy_(
            grad.view(batch, out_frames, out_ch))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.new_zeros(x.shape)
            for j in range(kernel):
                grad_x[j * dilation:j * dilation + rows].addmm_(full, taps[j].t())
        grad_w = torch.stack([x[j * dilation:j * dilation + rows].t() @ full for j in range(kernel)], dim=2)
        return grad_x, grad_w.transpose(0, 1), full.sum(0), None, None, None


def matmul_forward(net: Xvector, x: torch.Tensor) -> torch.Tensor:
    """``net``'s function with its parameters, through ``ShiftedMatmulTDNN`` (GAP pooling only)."""
    batch, channels, frames = x.shape
    h = x.transpose(1, 2).reshape(batch * frames, channels)
    for layer, (kernel, dilation) in zip(net.frame_layers, FRAME_LAYERS):
        h = ShiftedMatmulTDNN.apply(h, layer.conv.weight, layer.conv.bias, batch, frames, dilation)
        frames -= (kernel - 1) * dilation
        h = layer.norm(torch.relu(h))  # BatchNorm1d on (N, C): statistics over batch and frames
    return net.embedding(h.view(batch, frames, -1).mean(1))


def _shifted_sum(x, weight, bias, batch: int, frames: int, dilation: int):
    """``ShiftedMatmulTDNN`` in plain differentiable ops (for torch.compile to trace)."""
    out_ch, kernel = weight.shape[0], weight.shape[2]
    context = (kernel - 1) * dilation
    rows = batch * frames - context
    y = torch.addmm(bias, x[:rows], weight[:, :, 0].t())
    for j in range(1, kernel):
        y = torch.addmm(y, x[j * dilation:j * dilation + rows], weight[:, :, j].t())
    if context == 0:
        return y
    return F.pad(y, (0, 0, 0, context)).view(batch, frames, out_ch)[:, :frames - context].reshape(-1, out_ch)


def folded_forward(net: Xvector, x: torch.Tensor) -> torch.Tensor:
    """``net``'s training-mode function with each BatchNorm folded into the next layer: the next
    layer multiplies the ReLU output by ``diag(scale) W`` and adds ``W shift`` instead of reading a
    normalised copy. (Running statistics are not updated: a timing and equivalence probe.)"""
    batch, channels, frames = x.shape
    h = x.transpose(1, 2).reshape(batch * frames, channels)
    scale = shift = None
    for layer, (kernel, dilation) in zip(net.frame_layers, FRAME_LAYERS):
        weight, bias = layer.conv.weight, layer.conv.bias
        if scale is not None:
            bias = bias + (weight * shift[None, :, None]).sum(dim=(1, 2))
            weight = weight * scale[None, :, None]
        h = torch.relu(_shifted_sum(h, weight, bias, batch, frames, dilation))
        frames -= (kernel - 1) * dilation
        var, mean = torch.var_mean(h, dim=0, correction=0)
        scale = layer.norm.weight * torch.rsqrt(var + layer.norm.eps)
        shift = layer.norm.bias - mean * scale
    return net.embedding(h.view(batch, frames, -1).mean(1) * scale + shift)


FORMULATIONS = {
    "conv1d": lambda net, mode: net,
    "matmul": lambda net, mode: (lambda x: matmul_forward(net, x)),
    "conv1d_compiled": lambda net, mode: torch.compile(net, mode=mode),
    "matmul_compiled": lambda net, mode: torch.compile(lambda x: folded_forward(net, x), mode=mode),
}
EAGER_EQUIVALENT = {"matmul": matmul_forward, "matmul_compiled": folded_forward}


def max_relative_errors(name: str, batch: int = 4, frames: int = 60, n_mfcc: int = 20, channels: int = 32,
                        stat_channels: int = 48) -> dict:
    """float64: the largest |difference| / max |reference| of the output and of each parameter
    gradient, formulation ``name`` (eager version of it) against the Conv1d model, same weights."""
    torch.manual_seed(0)
    ref = Xvector(GlobalAveragePooling(stat_channels), n_mfcc, channels, stat_channels, 16).double().train()
    other = copy.deepcopy(ref)
    x = torch.randn(batch, n_mfcc, frames, dtype=torch.float64)
    target = torch.randn(batch, 16, dtype=torch.float64)
    out_ref = ref(x)
    out = EAGER_EQUIVALENT[name](other, x)
    ((out_ref - target) ** 2).sum().backward()
    ((out - target) ** 2).sum().backward()
    errors = {"output": ((out - out_ref).abs().max() / out_ref.abs().max()).item()}
    for (pname, p_ref), (_, p) in zip(ref.named_parameters(), other.named_parameters()):
        errors[pname] = ((p.grad - p_ref.grad).abs().max() / p_ref.grad.abs().max().clamp_min(1e-300)).item()
    return errors


def time_steps(names: list[str], batch: int, frames: int, n_mfcc: int, n_classes: int, runs: int,
               steps: int, amp_dtype: torch.dtype | None = None, compile_mode: str | None = None) -> dict:
    """Median seconds per training step of each formulation; formulations interleaved per run.

    ``amp_dtype``: run forward and loss under ``torch.autocast("cpu", amp_dtype)`` (None: float32).
    """
    torch.manual_seed(0)
    x = torch.randn(batch, n_mfcc, frames)
    y = torch.randint(0, n_classes, (batch,))
    setups = {}
    for name in names:
        torch.manual_seed(0)
        net = Xvector(GlobalAveragePooling(1500), in_channels=n_mfcc).train()
        head = nn.Linear(512, n_classes)
        optimizer = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-3)
        setups[name] = (FORMULATIONS[name](net, compile_mode), head, optimizer)

    def step(name):
        forward, head, optimizer = setups[name]
        with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = F.cross_entropy(head(forward(x)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    first = {}
    for name in names:  # compiles, allocates
        t0 = time.perf_counter()
        step(name)
        first[name] = time.perf_counter() - t0
        step(name)
    samples = {name: [] for name in names}
    for r in range(runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            samples[name].append((time.perf_counter() - t0) / steps)
    return {name: {"step_seconds": statistics.median(samples[name]), "samples": samples[name],
                   "first_step_seconds": first[name]} for name in names}


# What every earlier --json of this command holds: the only existing file --json may replace.
JSON_KEYS = ("float64_max_relative_error", "formulations", "torch_version")


def check_json_out(path: Path) -> None:
    """--json may replace only an earlier result of this command (``svlab.files.refuse_overwrite``)."""
    refuse_overwrite(path, flag="--json", command="tools/tdnn_formulations.py",
                     ours=lambda p: json_with_keys(p, JSON_KEYS),
                     recognised_by=f"a JSON object with {', '.join(JSON_KEYS)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time other formulations of the x-vector training step against "
                                             "the lab's Conv1d TDNN (same function, checked in float64).")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile variants")
    ap.add_argument("--runs", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per repetition (default 3)")
    ap.add_argument("--batch", type=int, default=64, help="crops per step (default 64)")
    ap.add_argument("--frames", type=int, default=200, help="frames per crop (default 200)")
    ap.add_argument("--amp", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 (default) or bf16: every step under bfloat16 autocast, as train.amp: bf16")
    ap.add_argument("--compile_mode", default=None,
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode for the compiled variants (default: PyTorch's)")
    args = ap.parse_args(argv)
    # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130
    return run_command(lambda: run(args), lambda: "interrupted; no --json file was written")


def run(args: argparse.Namespace) -> None:
    """Check the formulations, time them, print the table and write --json."""
    if args.json:
        check_json_out(Path(args.json))        # before the timings
    names = ["conv1d", "matmul"] + (["conv1d_compiled", "matmul_compiled"] if args.compile else [])
    cpu_runtime.warm_up_vector_math()  # as train.py does
    cpu_runtime.keep_freed_memory()  # as train.py does by default
    result = {"batch": args.batch, "frames": args.frames, "threads": torch.get_num_threads(),
              "torch_version": torch.__version__, "amp": args.amp, "compile_mode": args.compile_mode,
              "float64_max_relative_error": {}}
    for name in EAGER_EQUIVALENT:
        worst = max(max_relative_errors(name).values())
        result["float64_max_relative_error"][name] = worst
        print(f"{name}: same function as conv1d, largest relative difference in float64 {worst:.1e}")
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    timings = time_steps(names, args.batch, args.frames, 40, 200, args.runs, args.steps, amp_dtype,
                         args.compile_mode)
    base = timings["conv1d"]["step_seconds"]
    print(f"\n{'formulation':18s} {'step s':>8s} {'vs conv1d':>10s} {'first step s':>13s}")
    for name, t in timings.items():
        t["speedup_vs_conv1d"] = base / t["step_seconds"]
        print(f"{name:18s} {t['step_seconds']:8.3f} {t['speedup_vs_conv1d']:9.2f}x {t['first_step_seconds']:13.1f}")
    result["formulations"] = timings
    if args.json:
        text = json.dumps(result, indent=1) + "\n"
        check_json_out(Path(args.json))
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())

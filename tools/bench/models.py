"""Per-model speed (issue 21.5): the training step and embedding throughput of every network of the
project, in float32 and bfloat16, with its FLOPs against the machine's measured dense-kernel peak.

Each network of ``MODELS`` is built at its published setting (the x-vector as the lab hands it out
but with statistics pooling; ECAPA-TDNN C=512 with attentive statistics pooling; ResNet34 and CAM++
as WeSpeaker / 3D-Speaker build them, ``svlab/nets/``) on 80-dimensional fbank features (what the
toolkits train on), with an AAM-Softmax head over ``n_classes`` speakers. The training step is
``bench.training.lab_train_step`` (train.py's loop body) on in-memory random batches; the embedding
is the network in eval mode under ``torch.no_grad`` on one batch of ``embed_frames``-frame inputs.
Float32 and bfloat16 autocast (``train.amp: bf16``) alternate run by run (A-B, B-A) in one process,
so their ratio is fair on a busy machine. bfloat16 only where the CPU computes it natively (AMX-BF16
or AVX512-BF16, ``svlab.cpu_runtime.native_bfloat16``) or on a GPU, as in the ``bf16`` section:
emulated, a ResNet34 step takes about 8x as long as in fp32 (minutes per step at the full sizes), and
``models_bf16_skipped`` says why the ``bf16_*`` keys are absent. ``--quick`` builds narrow networks
(``QUICK_WIDTHS``): a smoke test, not the published models.

"The peak" is the best dense kernel measured, not one library's matmul: on AMD CPUs torch's fp32
``matmul`` (MKL) runs at less than half of what oneDNN's convolutions reach on the same cores. It is
the best of the square matmul (``bench.kernels.matmul_peak``, the ``matmul`` section's figure where
that ran) and of oneDNN's ``conv1d`` and ``conv2d`` at TDNN- and ResNet-like shapes (``CONV_SHAPES``).

JSON keys (``models_*`` at the top level, ``models`` a dict with one entry per network):

==================================  ===================================================================
key                                 meaning
==================================  ===================================================================
models_settings                     batch, crop, embedding batch and frames, steps, n_classes, features
models_peak_flops_per_s             fp32 dense peak: max of the three below; ``models_peak_kernel`` names it
models_matmul_peak_flops_per_s      fp32 square matmul, best over sizes and runs
models_conv1d_peak_flops_per_s      fp32 ``conv1d`` (best over ``CONV_SHAPES["conv1d"]``; FLOPs = 2 MACs)
models_conv2d_peak_flops_per_s      fp32 ``conv2d`` (best over ``CONV_SHAPES["conv2d"]``)
models_bf16_peak_flops_per_s        the same in bfloat16 (``models_bf16_peak_kernel``; ``models_bf16_*``
                                    for each kernel)
models_bf16_native                  the CPU's native bfloat16 instructions (``GPU`` on one), null where
                                    it has none; then ``models_bf16_skipped`` says why and no ``bf16``
                                    key is measured
models.<m>.model                    the model config used (``svlab.models.build_model``)
models.<m>.params                   parameters of the network (``svlab.models.parameter_count``)
models.<m>.forward_flops_per_audio_second  ``svlab.models.forward_flops`` at 100 frames (1 s of audio)
models.<m>.step_flops               FLOPs of one training step at ``batch`` x ``crop_frames`` (forward +
                                    backward, ``FlopCounterMode``: matmuls and convolutions only)
models.<m>.train_crops_per_s        fp32 training steps, crops per second (median over the runs)
models.<m>.train_flops_per_s        ``step_flops / batch * train_crops_per_s``
models.<m>.train_vs_peak            ``train_flops_per_s / models_peak_flops_per_s``
models.<m>.embed_flops              ``forward_flops`` of one ``embed_frames``-frame utterance
models.<m>.embed_utts_per_s         fp32 embedding, utterances per second; ``embed_x_realtime`` the same
                                    in seconds of audio per second (10 ms frames)
models.<m>.embed_flops_per_s        ``embed_flops * embed_utts_per_s``; ``embed_vs_peak`` over the peak
models.<m>.bf16_*                   the same five rates and ratios under bfloat16 autocast, ratios over
                                    ``models_bf16_peak_flops_per_s``; ``bf16_train_speedup`` and
                                    ``bf16_embed_speedup``: medians of the per-run bf16 / fp32 ratios
models.<m>.stats                    spread of each timed rate (``bench.system.summarize``)
==================================  ===================================================================
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from bench.kernels import counted_step_flops, matmul_peak
from bench.system import summarize, sync
from bench.training import build_training, reference_batches, timed_steps
from svlab import config as config_mod
from svlab import cpu_runtime
from svlab import models as speaker_model
from svlab.features import feature_dim
from svlab.training import autocast

# The networks at their published settings (docstrings of xvector.py, ecapa.py, svlab/nets/).
MODELS = {
    "xvector": {"name": "xvector", "pooling": "stats", "embedding_size": 512, "channels": 512, "stat_channels": 1500},
    "ecapa": {"name": "ecapa", "pooling": "asp", "embedding_size": 192, "channels": 512},
    "resnet34": {"name": "resnet34", "pooling": "stats", "embedding_size": 256, "base_channels": 32},
    "campplus": {"name": "campplus", "pooling": "stats", "embedding_size": 512, "base_channels": 32},
}
FEATURES = {"features.type": "fbank", "features.n_fbank": 80}
QUICK_WIDTHS = {"channels": 64, "stat_channels": 128, "embedding_size": 32, "base_channels": 8}

# (batch, in channels, out channels, kernel, length or (height, width)): a TDNN layer of 1.5-3 s, a
# ResNet34 stage-1 and stage-3 convolution over an 80-bin fbank of 2 s; the quick ones are small.
CONV_SHAPES = {
    "full": {"conv1d": [(32, 512, 512, 3, 300), (32, 1024, 1024, 1, 300)],
             "conv2d": [(16, 32, 32, 3, (80, 200)), (16, 128, 128, 3, (20, 50))]},
    "quick": {"conv1d": [(4, 128, 128, 3, 100)], "conv2d": [(2, 16, 16, 3, (20, 40))]},
}
SIZES = {
    "full": dict(batch=16, crop_frames=200, embed_batch=16, embed_frames=300, steps=1, warmup=1, n_classes=1000),
    "quick": dict(batch=2, crop_frames=50, embed_batch=2, embed_frames=100, steps=1, warmup=1, n_classes=10),
}


# ------------------------------------------------------------------------------------ the peak
def conv_flops(kind: str, shape: tuple) -> float:
    """FLOPs (2 per multiply-add) of one ``conv1d``/``conv2d`` of ``shape`` with 'same' padding."""
    batch, cin, cout, k, size = shape
    positions = size if kind == "conv1d" else math.prod(size)
    return 2.0 * batch * cout * positions * cin * k ** (1 if kind == "conv1d" else 2)


def conv_peak(kind: str, shapes: list[tuple], reps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of PyTorch's (oneDNN's, on the CPU) forward ``conv1d``/``conv2d`` over ``shapes``
    and ``reps`` timings each, after one warm-up call."""
    g = torch.Generator().manual_seed(0)
    conv = F.conv1d if kind == "conv1d" else F.conv2d
    best = 0.0
    for shape in shapes:
        batch, cin, cout, k, size = shape
        dims = (size,) if kind == "conv1d" else tuple(size)
        x = torch.randn(batch, cin, *dims, generator=g).to(device=device, dtype=dtype)
        w = torch.randn(cout, cin, *([k] * len(dims)), generator=g).to(device=device, dtype=dtype)
        conv(x, w, padding=k // 2)
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            conv(x, w, padding=k // 2)
            sync(device)
            best = max(best, conv_flops(kind, shape) / (time.perf_counter() - t0))
    return best


def dense_peaks(bench, dtype: torch.dtype, prefix: str) -> float:
    """Measure the matmul, conv1d and conv2d peaks in ``dtype`` into ``models_<prefix>*`` keys; returns
    the best of them (``models_<prefix>peak_flops_per_s``)."""
    result, which = bench.result, "quick" if bench.quick else "full"
    reused = result.get("matmul_peak_flops_per_s" if dtype == torch.float32 else "bf16_matmul_peak_flops_per_s")
    if reused and bench.device.type == "cpu":
        matmul = reused  # the matmul section's figure, same process and threads
    else:
        matmul = max(matmul_peak(bench.s["matmul_sizes"], bench.reps, bench.device, dtype).values())
    peaks = {"matmul": matmul}
    for kind, shapes in CONV_SHAPES[which].items():
        peaks[kind] = conv_peak(kind, shapes, bench.reps, bench.device, dtype)
    for kind, value in peaks.items():
        result[f"models_{prefix}{kind}_peak_flops_per_s"] = value
    best = max(peaks, key=peaks.get)
    result[f"models_{prefix}peak_flops_per_s"], result[f"models_{prefix}peak_kernel"] = peaks[best], best
    return peaks[best]


# ------------------------------------------------------------------------------------ per model
def model_config(name: str, size: dict, workdir, quick: bool = False) -> dict:
    """The full configuration of network ``name`` for this section (``MODELS``, ``FEATURES``;
    ``QUICK_WIDTHS`` when ``quick``)."""
    model = {**MODELS[name], **(QUICK_WIDTHS if quick else {})}
    overrides = {**{f"model.{k}": v for k, v in model.items()}, **FEATURES, "loss.type": "aamsoftmax",
                 "train.batchsize": size["batch"], "train.crop_frames": size["crop_frames"],
                 "train.save_dir": str(workdir / "model_runs")}
    return config_mod.load_config(None, overrides)


def embed_rate(model, x: torch.Tensor, amp, device: torch.device) -> float:
    """Utterances per second of one eval-mode forward of the batch ``x``."""
    with torch.no_grad(), autocast(device, amp):
        sync(device)
        t0 = time.perf_counter()
        model(x).float()
        sync(device)
    return x.shape[0] / (time.perf_counter() - t0)


def measure_model(bench, name: str, size: dict, precisions: list) -> dict:
    """One network's entry of ``models`` (see the module docstring)."""
    device, runs = bench.device, bench.runs
    cfg = model_config(name, size, bench.workdir, bench.quick)
    n_feat, batch, crop = feature_dim(cfg["features"]), size["batch"], size["crop_frames"]
    t = build_training(cfg, size["n_classes"], 1, device)
    per_second = speaker_model.forward_flops(cfg["model"], n_feat, 100)  # (FLOP counting on meta takes seconds)
    entry = {"model": dict(cfg["model"]), "params": sum(p.numel() for p in t.model.parameters()),
             "forward_flops_per_audio_second": per_second,
             "step_flops": counted_step_flops(t.model, t.criterion, batch, n_feat, crop, size["n_classes"]),
             "embed_flops": per_second if size["embed_frames"] == 100 else
             speaker_model.forward_flops(cfg["model"], n_feat, size["embed_frames"])}
    batches = reference_batches(batch, n_feat, crop, size["n_classes"], device)
    x = torch.randn(size["embed_batch"], n_feat, size["embed_frames"], generator=torch.Generator().manual_seed(2))
    x = x.to(device)
    train_rates: dict = {p: [] for p, _ in precisions}
    embed_rates: dict = {p: [] for p, _ in precisions}
    t.train()
    for _, amp in precisions:
        timed_steps(t, batches, size["warmup"], amp, device)
    for i in range(runs):
        order = precisions if i % 2 == 0 else precisions[::-1]
        for label, amp in order:
            t.train()
            seconds, crops = timed_steps(t, batches, size["steps"], amp, device)
            train_rates[label].append(crops / seconds)
    t.model.eval()
    for _, amp in precisions:
        embed_rate(t.model, x, amp, device)  # warm-up
    for i in range(runs):
        for label, amp in (precisions if i % 2 == 0 else precisions[::-1]):
            embed_rates[label].append(embed_rate(t.model, x, amp, device))
    stats = {}
    for label, _ in precisions:
        pre = "" if label == "fp32" else f"{label}_"
        peak = bench.result[f"models_{pre}peak_flops_per_s"]
        for what, found, flops in (("train", train_rates[label], entry["step_flops"] / batch),
                                   ("embed", embed_rates[label], entry["embed_flops"])):
            unit = "crops" if what == "train" else "utts"
            st = summarize(found)
            stats[f"{pre}{what}_{unit}_per_s"] = st
            entry[f"{pre}{what}_{unit}_per_s"] = st["median"]
            entry[f"{pre}{what}_flops_per_s"] = st["median"] * flops
            entry[f"{pre}{what}_vs_peak"] = st["median"] * flops / peak
        entry[f"{pre}embed_x_realtime"] = entry[f"{pre}embed_utts_per_s"] * size["embed_frames"] / 100.0
    if len(precisions) > 1:
        for what in ("train", "embed"):
            ratios = [b / a for a, b in zip(train_rates["fp32"] if what == "train" else embed_rates["fp32"],
                                            train_rates["bf16"] if what == "train" else embed_rates["bf16"])]
            entry[f"bf16_{what}_speedup"] = summarize(ratios)["median"]
    entry["stats"] = stats
    return entry


def measure_models(bench) -> None:
    """The ``models`` section: the peaks, then every network of ``bench.args.models`` (default all)."""
    names = selected_models(getattr(bench.args, "models", None))
    if not names:
        return
    size = SIZES["quick" if bench.quick else "full"]
    bench.result["models_settings"] = {**size, "features": "fbank 80", "loss": "aamsoftmax", "runs": bench.runs}
    precisions = [("fp32", None)]
    native, what = cpu_runtime.native_bfloat16() if bench.device.type == "cpu" else (True, "GPU")
    dense_peaks(bench, torch.float32, "")
    bench.result["models_bf16_native"] = what if native else None
    if native:
        dense_peaks(bench, torch.bfloat16, "bf16_")
        precisions.append(("bf16", torch.bfloat16))
    else:
        bench.result["models_bf16_skipped"] = what
    out = bench.result.setdefault("models", {})
    for name in names:
        out[name] = measure_model(bench, name, size, precisions)


def selected_models(text: str | None) -> list[str]:
    """``--models``: a comma-separated list of ``MODELS`` names, ``all`` (default) or ``none``."""
    if text is None or text == "all":
        return list(MODELS)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown network(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}, "
                         "all or none")
    return names


def format_models(r: dict) -> str:
    """The per-model table printed after the benchmark's main one."""
    models = r.get("models") or {}
    if not models:
        return ""
    g = 1e-9
    head = (f"{'network':9s} {'params':>7s} {'GFLOP/s':>7s} {'train':>8s} {'bf16':>8s} {'train/pk':>8s} "
            f"{'bf16/pk':>8s} {'embed':>8s} {'bf16':>8s} {'emb/pk':>7s} {'bf16/pk':>7s}")
    lines = ["", "per model (crops/s, utt/s; /pk: achieved FLOP/s over the best dense kernel of that precision)",
             head, "-" * len(head)]

    def v(e, k, fmt):
        width = int(fmt.split(".")[0])
        return format(e[k], fmt) if isinstance(e.get(k), (int, float)) else "-".rjust(width)
    for name, e in models.items():
        lines.append(f"{name:9s} {e['params'] / 1e6:6.2f}M {e['forward_flops_per_audio_second'] * g:7.2f} "
                     f"{v(e, 'train_crops_per_s', '8.1f')} {v(e, 'bf16_train_crops_per_s', '8.1f')} "
                     f"{v(e, 'train_vs_peak', '8.2f')} {v(e, 'bf16_train_vs_peak', '8.2f')} "
                     f"{v(e, 'embed_utts_per_s', '8.1f')} {v(e, 'bf16_embed_utts_per_s', '8.1f')} "
                     f"{v(e, 'embed_vs_peak', '7.2f')} {v(e, 'bf16_embed_vs_peak', '7.2f')}")
    peak = r.get("models_peak_flops_per_s")
    if peak:
        lines.append(f"fp32 peak {peak * g:.0f} GFLOP/s ({r.get('models_peak_kernel')}; matmul "
                     f"{r['models_matmul_peak_flops_per_s'] * g:.0f}, "
                     f"conv1d {r['models_conv1d_peak_flops_per_s'] * g:.0f}, "
                     f"conv2d {r['models_conv2d_peak_flops_per_s'] * g:.0f})"
                     + (f"; bf16 peak {r['models_bf16_peak_flops_per_s'] * g:.0f} GFLOP/s "
                        f"({r.get('models_bf16_peak_kernel')})" if r.get("models_bf16_peak_flops_per_s") else ""))
    return "\n".join(lines)

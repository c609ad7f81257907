"""ONNX export of a checkpoint's embedding network, for ``svlab.encoder`` and anyone with onnxruntime.

The graph maps ``features`` ``(batch, n_features, frames)`` float32 to ``embedding``
``(batch, embedding_size)``, batch and frames dynamic; every network (x-vector, ECAPA-TDNN, ResNet34,
CAM++) with every pooling (gap, stats, asp). The front end stays outside the graph: the features come
from ``svlab.features`` (numpy and librosa, torch-free), exactly as in training; an STFT and mel
filterbank inside the graph would be a second implementation that drifts from librosa's.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), the one that
exports all four networks with symbolic batch and frame sizes. The TorchScript exporter
(``dynamo=False``, deprecated) does not: for CAM++ with ``asp`` pooling its shape inference through
CAM++'s segment pooling (``repeat_interleave``) yields wrong static sizes, which it writes into the
Expand of the pooling's global context, and onnxruntime refuses every input ("invalid expand shape").
The price is export time (seconds per model, a few minutes for CAM++ on a loaded 2-core machine),
paid once. Every export is checked before it is written: onnxruntime against PyTorch on random
features of two lengths and two batch sizes (``PARITY_TOLERANCE`` on L2-normalised embeddings).

What the file records (``metadata_props``, keys ``svlab.encoder.META``): the format marker, the
feature settings (``svlab.features.feature_signature`` and ``min_seconds``), the model (name,
pooling, embedding size, tag, epoch), the cosine decision threshold and where it came from
(``svlab.encoder.checkpoint_decision``: the checkpoint's evaluation on its run's trial list), the LLR
calibration when there is one, and the checkpoint it came from (name, epoch, fingerprint).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from svlab.backend import checkpoint_fingerprint
from svlab.checkpoint import load_checkpoint
from svlab.encoder import (META, ONNX_FORMAT, Decision, checkpoint_decision, checkpoint_feature_settings, is_onnx,
                           l2_normalize)
from svlab.errors import CheckpointError
from svlab.features import FEATURE_KEYS, feature_dim
from svlab.files import atomic_write, refuse_overwrite
from svlab.models import model_from_checkpoint

OPSET = 18                 # the dynamo exporter's default opset in torch 2.13; onnxruntime 1.17+ runs it
EXAMPLE_FRAMES = 200       # the example input's frames (batch 2: a batch of 1 would be taken as fixed)
PARITY_TOLERANCE = 1e-4    # largest |difference| of L2-normalised embeddings accepted at export
PARITY_SHAPES = ((1, 137), (3, 411))   # (batch, frames) checked at export


def is_our_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file this module wrote (its format marker), e.g. an earlier export."""
    try:
        import onnx
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, unreadable: not ours
        return False
    return any(p.key == META["format"] and p.value == ONNX_FORMAT for p in model.metadata_props)


def _quiet():
    """The exporter's progress and registration notes (e.g. 'torchvision is not installed') off."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    return loggers, levels


def onnx_graph(model: torch.nn.Module, n_features: int):
    """The ONNX ``ModelProto`` of an embedding network, batch and frames dynamic (see the module docstring)."""
    example = torch.randn(2, n_features, EXAMPLE_FRAMES, generator=torch.Generator().manual_seed(0))
    # Dim.DYNAMIC, not named Dims with bounds: CAM++'s segment pooling derives sizes from the frame count
    # (padding to whole segments), which named Dims must spell out, else torch.export refuses them
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC}
    loggers, levels = _quiet()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=["features"], output_names=["embedding"],
                                        dynamic_shapes={"x": dims})
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    proto = program.model_proto
    for value, axes in ((proto.graph.input[0], {0: "batch", 2: "frames"}), (proto.graph.output[0], {0: "batch"})):
        for axis, name in axes.items():  # readable names instead of torch.export's s0, s1
            value.type.tensor_type.shape.dim[axis].dim_param = name
    return proto


def parity(model: torch.nn.Module, onnx_bytes: bytes, feats: list[np.ndarray], threads: int = 1) -> float:
    """Largest absolute difference of the L2-normalised embeddings of ``feats`` (arrays ``(batch,
    n_features, frames)``) between PyTorch and onnxruntime."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in feats:
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        worst = max(worst, float(np.abs(l2_normalize(ref) - l2_normalize(got)).max()))
    return worst


def metadata(checkpoint: Path, state: dict, feat_cfg: dict, decision: Decision) -> dict[str, str]:
    """The ``metadata_props`` of an export (see the module docstring)."""
    m = state["config"]["model"]
    feats = {k: feat_cfg[k] for k in FEATURE_KEYS}
    feats["min_seconds"] = float(feat_cfg.get("min_seconds") or 0.0)
    model = {"name": m["name"], "pooling": m["pooling"], "embedding_size": int(m["embedding_size"]),
             "tag": state.get("tag", ""), "epoch": state.get("epoch"), "n_features": feature_dim(feat_cfg)}
    return {
        META["format"]: ONNX_FORMAT,
        META["features"]: json.dumps(feats, sort_keys=True),
        META["model"]: json.dumps(model, sort_keys=True),
        META["embedding_size"]: str(model["embedding_size"]),
        META["threshold"]: "" if decision.threshold is None else repr(float(decision.threshold)),
        META["threshold_source"]: decision.source,
        META["calibration"]: json.dumps(decision.calibration) if decision.calibration else "",
        META["source"]: json.dumps({"checkpoint": Path(checkpoint).name, "epoch": state.get("epoch"),
                                    "fingerprint": checkpoint_fingerprint(checkpoint)}),
        META["exporter"]: f"torch.onnx.export(dynamo=True, opset {OPSET}), torch {torch.__version__.split('+')[0]}",
    }


def export(checkpoint: Path, out: Path, threshold: float | None = None, log=print) -> dict:
    """Export ``checkpoint`` (.pth) to ``out`` (.onnx), checked against PyTorch, written atomically;
    ``threshold``: a cosine threshold to store instead of the checkpoint's own. Returns the metadata
    plus ``parity`` (the largest difference found)."""
    checkpoint, out = Path(checkpoint), Path(out)
    refuse_overwrite(out, inputs=[("the checkpoint", checkpoint)], ours=is_our_onnx, command="tools/export.py",
                     recognised_by="an ONNX file with svlab metadata")
    if not is_onnx(out):
        raise CheckpointError(f"--out {out}: name the file .onnx (e.g. model.onnx)")
    state = load_checkpoint(checkpoint)
    feat_cfg = checkpoint_feature_settings(state)
    model = model_from_checkpoint(state)
    decision = (Decision(float(threshold), "given at export (--threshold)") if threshold is not None
                else checkpoint_decision(checkpoint, state))
    n = feature_dim(feat_cfg)
    log(f"exporting {checkpoint.name} ({state.get('tag', 'model')}, epoch {state['epoch']}) to ONNX ...")
    proto = onnx_graph(model, n)
    for key, value in metadata(checkpoint, state, feat_cfg, decision).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    rng = np.random.default_rng(0)
    worst = parity(model, data, [rng.standard_normal((b, n, t)).astype(np.float32) for b, t in PARITY_SHAPES])
    if not worst <= PARITY_TOLERANCE:
        raise CheckpointError(f"the ONNX export of {checkpoint.name} differs from PyTorch by {worst:.2e} (more than "
                              f"{PARITY_TOLERANCE:g}); nothing written. Please report it with the checkpoint's model "
                              "settings")
    refuse_overwrite(out, inputs=[("the checkpoint", checkpoint)], ours=is_our_onnx, command="tools/export.py",
                     recognised_by="an ONNX file with svlab metadata")
    atomic_write(out, lambda tmp: tmp.write_bytes(data))
    return {"parity": worst, "threshold": decision.threshold, "threshold_source": decision.source,
            "bytes": len(data)}

"""What the handout asks the report to show (items 2.5 and 3.2), rebuilt from a run folder's files.

``train_stage_lines``  the training log lines exactly as ``train.py`` printed them (from ``train_log.csv``).
``lab_line``           the lab's ``Epoch=30 EER= 3.25 Thres= 0.61234 (trials: ...)`` line of an evaluation.
``curves_figure``, ``evaluation_figures``  the report's figures, drawn at their printed size (fonts in
                       printed points, ``svlab.plots.PrintStyle``) in the report's language, as PNG bytes.
``verify_example``     one target and one non-target trial of the run's trial list scored with the
                       checkpoint and decided at the evaluation's EER threshold, as ``tools/verify.py`` does.
"""
from __future__ import annotations

import base64
import dataclasses
import struct
import tempfile
from pathlib import Path

import numpy as np

from svlab import plots
from svlab.errors import LabError, ReportError
from svlab.evaluation import PLOTS as PLOT_FILES, display_path
from svlab.report_text import EN

# train_log.csv columns drawn as curves (svlab.run_folder.LOG_FIELDS, svlab.validation.VAL_FIELDS), in order;
# a column not known here is drawn too (under its own name) unless it is a time or a setting
CURVES = ("loss", "acc", "val_eer_pct", "val_min_dcf")
NOT_CURVES = ("epoch", "lr", "margin", "seconds")
# printed width x height (mm) of each figure on A4 (180 mm between the margins); curves: per row of 2 panels
FIGURE_MM = {"curves": (176, 64), "roc": (86, 100), "det": (86, 100), "hist": (176, 80)}
LEGEND_COLS = {"hist": 2}
PRINT_TEXT = {"density": "density of trials"}  # English words shorter than the screen figure's, to fit at 9 pt


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# the lines the lab's commands printed
# --------------------------------------------------------------------------------------------------
def train_stage_lines(rows: list[dict], epochs: int | None) -> list[str]:
    """``Train Stage: 1/30 ===> Loss 2.1234 Acc 45.67%  (lr 1.00e-03, 12.3s)`` per row of ``train_log.csv``
    (with `` | val EER ...`` where the epoch was validated; ``epochs``: the run's planned number of epochs,
    else the last epoch logged)."""
    from svlab.validation import VAL_FIELDS, Validator
    last = max((int(v) for r in rows if (v := _float(r.get("epoch"))) is not None), default=0)
    total = epochs or last
    lines = []
    for r in rows:
        epoch, loss, acc = _float(r.get("epoch")), _float(r.get("loss")), _float(r.get("acc"))
        if epoch is None or loss is None or acc is None:
            continue
        validated = {k: v for k in VAL_FIELDS if (v := _float(r.get(k))) is not None}
        line = f"Train Stage: {int(epoch)}/{total} ===> Loss {loss:.4f} Acc {acc:.2f}%"
        if "val_eer_pct" in validated and "val_min_dcf" in validated:
            line += Validator.describe(validated)
        lr, seconds = _float(r.get("lr")), _float(r.get("seconds"))
        if lr is not None and seconds is not None:
            line += f"  (lr {lr:.2e}, {seconds:.1f}s)"
        lines.append(line)
    return lines


def lab_line(m: dict) -> str:
    """The line ``EER.py`` printed for the evaluation ``m`` (its ``metrics.json``)."""
    epoch = m.get("epoch") if m.get("epoch") is not None else "-"
    return (f"Epoch={epoch} EER= {float(m['eer']) * 100:.2f} Thres= {float(m['threshold']):.5f} "
            f"(trials: {display_path(m.get('trials', '?'))})")


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def png_size(data: bytes) -> tuple[int, int, float | None]:
    """``(width, height, dpi)`` of PNG bytes (dpi from the ``pHYs`` chunk, None without one)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    dpi, pos = None, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"pHYs":
            ppu_x, _, unit = struct.unpack(">IIB", data[pos + 8:pos + 17])
            dpi = ppu_x * 0.0254 if unit == 1 else None
            break
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return width, height, dpi


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def style_for(kind: str, w: dict, cjk: str | None) -> plots.PrintStyle:
    """The print style of a figure: its printed size, the report language's labels (English when there is
    no font for Chinese)."""
    width, height = FIGURE_MM[kind]
    chinese = bool(w["plot"]) and cjk is not None
    return plots.PrintStyle(width_mm=width, height_mm=height, fonts=(cjk,) if chinese else (),
                            text=w["plot"] if chinese else PRINT_TEXT, legend_cols=LEGEND_COLS.get(kind, 1))


def _draw(draw, kind: str) -> dict:
    """Run ``draw(path)`` into a temporary PNG; returns ``{"kind", "png", "info"}``."""
    with tempfile.TemporaryDirectory(prefix="svlab-report-") as tmp:
        path = Path(tmp) / f"{kind}.png"
        info = draw(path) or {}
        return {"kind": kind, "png": path.read_bytes(), "info": info}


def curves_figure(rows: list[dict], columns: list[str], w: dict, cjk: str | None) -> dict | None:
    """Loss, accuracy, the validation EER and minDCF (where validated) and any further numeric column of
    ``train_log.csv``, one panel each, two to a row, per epoch; None without rows."""
    epochs = [_float(r.get("epoch")) for r in rows]
    if not rows or any(e is None for e in epochs):
        return None
    t = w if bool(w["plot"]) and cjk is not None else EN  # no font for Chinese: the whole figure in English
    names = {c: (t[f"panel_{c}"], t[f"axis_{c}"]) for c in CURVES}
    extra = [c for c in columns if c not in CURVES and c not in NOT_CURVES and not c.endswith("seconds")]
    panels = []
    for col in [c for c in CURVES if c in columns] + extra:
        values = [_float(r.get(col)) for r in rows]
        if any(v is not None for v in values):
            title, axis = names.get(col, (col, col))
            panels.append((title, values, axis))
    if not panels:
        return None
    panels = panels[:6]
    base = style_for("curves", w, cjk)
    style = dataclasses.replace(base, height_mm=base.height_mm * -(-len(panels) // 2))
    return _draw(lambda p: plots.plot_log_curves(epochs, panels, p, style), "curves")


def read_scored_trials(eval_dir: Path, m: dict) -> tuple[np.ndarray, np.ndarray]:
    """Scores (``scores.txt``) and labels (from the evaluation's trial list) of an evaluation, in order."""
    from svlab.manifests import read_trials
    labels_of = {(t.enroll, t.test): t.label for t in read_trials(Path(m["trials"]))}
    scores, labels = [], []
    for n, line in enumerate((Path(eval_dir) / "scores.txt").read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if len(parts) != 3 or (parts[0], parts[1]) not in labels_of:
            raise ReportError(f"line {n} of scores.txt is not a trial of {display_path(m['trials'])}")
        scores.append(float(parts[2]))
        labels.append(labels_of[(parts[0], parts[1])])
    if not scores:
        raise ReportError("scores.txt is empty")
    return np.asarray(scores), np.asarray(labels)


def score_name(m: dict, w: dict, chinese: bool) -> str:
    name = {"plda": "PLDA log-likelihood ratio"}.get(m.get("scorer"), "cosine score")
    name = w["score_names"].get(name, name) if chinese else name
    return f"AS-norm {name}" if m.get("score_norm") == "asnorm" else name


def evaluation_figures(eval_dir: Path, m: dict, w: dict, cjk: str | None) -> tuple[list[dict], str | None]:
    """ROC (EER point), DET (EER and minDCF points) and score histogram of an evaluation, drawn for print
    from its scores; where its scores cannot be read, its own pictures. Returns ``(figures, why not drawn)``."""
    from svlab import metrics
    label = str(m.get("backend", "cosine"))
    try:
        scores, labels = read_scored_trials(eval_dir, m)
        curve = metrics.error_curve(scores, labels)
        eer, thr = float(m["eer"]), float(m["threshold"])
        dcf_thr = float(m.get("min_dcf_0.01_threshold", thr))
        far, frr = metrics.error_rates_at(scores, labels, dcf_thr)
        dcf = (far, frr, float(m["min_dcf_0.01"]), dcf_thr) if "min_dcf_0.01" in m else None
    except (LabError, OSError, ValueError, KeyError, TypeError) as e:
        return _own_pictures(eval_dir, m), str(e)
    chinese = bool(w["plot"]) and cjk is not None
    titles = w if chinese else EN  # no font for Chinese: the whole figure in English
    figures = [
        _draw(lambda p: plots.plot_roc(curve.fpr, curve.fnr, eer, thr, p, label=label, title=titles["roc"],
                                       style=style_for("roc", w, cjk)), "roc"),
        _draw(lambda p: plots.plot_det(curve.fpr, curve.fnr, eer, thr, p, dcf_point=dcf, label=label,
                                       title=titles["det"], style=style_for("det", w, cjk)), "det"),
        _draw(lambda p: plots.plot_score_hist(scores, labels, thr, p, label=label, title=titles["hist"],
                                              score_name=score_name(m, w, chinese),
                                              style=style_for("hist", w, cjk)), "hist"),
    ]
    for f in figures:
        f["file"] = Path(eval_dir) / (m.get("plots") or PLOT_FILES).get(f["kind"], PLOT_FILES[f["kind"]])
    return figures, None


def _own_pictures(eval_dir: Path, m: dict) -> list[dict]:
    out = []
    for kind, name in (m.get("plots") or PLOT_FILES).items():
        path = Path(eval_dir) / name
        if kind in FIGURE_MM and path.is_file():
            out.append({"kind": kind, "png": path.read_bytes(), "info": {}, "file": path})
    return out


# --------------------------------------------------------------------------------------------------
# the verification example
# --------------------------------------------------------------------------------------------------
def checkpoint_of(run_dir: Path, m: dict) -> Path:
    """The checkpoint an evaluation scored: its recorded path, else the file of that name in the run folder."""
    recorded = Path(str(m.get("checkpoint") or ""))
    for path in (recorded, Path(run_dir) / recorded.name):
        if recorded.name and path.is_file():
            return path
    raise ReportError(f"its checkpoint {display_path(recorded)} is not there any more")


def verify_example(run_dir: Path, metrics_path: Path, run_cfg: dict | None) -> dict:
    """The first target and the first non-target trial of the evaluation's trial list, embedded from their
    audio with the checkpoint, scored with the evaluation's scoring system and decided at its EER
    threshold (``score >= threshold``: accept). ``LabError`` (one line) when it cannot be done."""
    import torch

    from svlab.checkpoint import load_checkpoint
    from svlab.config import config_path_value
    from svlab.embedding import checkpoint_features, embed_files
    from svlab.evaluation import load_system
    from svlab.manifests import read_trials
    from svlab.models import model_from_checkpoint
    from svlab.scoring_system import score_trials

    if run_cfg is None:
        raise ReportError("the run folder's config.yaml cannot be read")
    import json
    try:
        recorded_m = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {metrics_path}: {e}") from None
    checkpoint = checkpoint_of(run_dir, recorded_m)
    opts, fb, m = load_system(metrics_path, checkpoint)  # refused if the checkpoint changed since
    trials = read_trials(Path(m["trials"]))
    picked = [next((t for t in trials if t.label == label), None) for label in (1, 0)]
    if None in picked:
        raise ReportError("the trial list lacks a target or a non-target trial")
    root = config_path_value(run_cfg, "test.root")
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, torch.device("cpu"))
    feat_cfg = checkpoint_features(run_cfg, state, log=lambda *a: None, cache=False)
    files = [root / name for t in picked for name in (t.enroll, t.test)]
    emb, _, _ = embed_files(model, files, feat_cfg, 4, "cpu", policy="error", log=lambda *a: None, desc="audio")
    scores = score_trials(fb, opts, emb, np.array([0, 2]), np.array([1, 3]))
    recorded = {}
    try:
        for line in (Path(metrics_path).parent / "scores.txt").read_text(encoding="utf-8").splitlines():
            a, b, s = line.split()
            recorded[(a, b)] = float(s)
    except (OSError, ValueError):
        pass
    threshold = float(m["threshold"])
    rows = [{"target": t.label == 1, "enroll": t.enroll, "test": t.test, "score": float(s),
             "recorded": recorded.get((t.enroll, t.test)), "accept": bool(s >= threshold)}
            for t, s in zip(picked, scores)]
    command = (f"python tools/verify.py {display_path(files[0])} {display_path(files[1])} "
               f"--checkpoint {display_path(checkpoint)}")
    return {"rows": rows, "threshold": threshold, "system": opts.label, "command": command,
            "checkpoint": checkpoint}

"""Figures for the lab report (matplotlib, Agg): training curves, ROC, DET and score histograms.

``plot_roc``   true-accept against false-accept rate, EER point marked.
``plot_det``   detection error trade-off: miss (false reject) against false-alarm rate on normal-deviate
               axes (``scipy.stats.norm.ppf``), so Gaussian score distributions give straight lines;
               ticks in %, EER and minDCF(0.01) operating points marked.
``plot_score_hist``  target / non-target score histograms with the EER threshold.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from svlab.files import atomic_write  # noqa: E402

# DET tick sets (percent), densest first: the densest whose labels do not crowd is used.
DET_TICK_SETS = (
    (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 90, 95, 98, 99),
    (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 90, 95, 99),
    (0.01, 0.1, 0.5, 1, 5, 10, 20, 40, 60, 80, 95, 99),
    (0.01, 0.1, 1, 5, 10, 20, 40, 60, 80, 95, 99),
    (0.01, 0.1, 1, 10, 40, 80, 99),
)
DET_TICKS_PCT = DET_TICK_SETS[0]
DET_MIN, DET_MAX = 1e-4, 0.99


def _save(fig, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_training_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o", ms=3)
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax2.plot(epochs, [h["acc"] for h in history], marker="o", ms=3, color="tab:green")
    ax2.set(xlabel="epoch", ylabel="training accuracy (%)", title="Accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_roc(fpr, fnr, eer: float, threshold: float, path: Path, label: str = "", title: str = "ROC") -> None:
    """ROC (true-accept rate against false-accept rate) with the EER point marked and labelled."""
    fpr, fnr = np.asarray(fpr), np.asarray(fnr)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(fpr * 100, (1.0 - fnr) * 100, lw=1.8, label=label or "ROC")
    ax.plot([0, 100], [100, 0], ls="--", lw=0.8, color="gray", label="FAR = FRR")
    ax.plot([eer * 100], [(1 - eer) * 100], "o", color="tab:red", ms=7,
            label=f"EER = {eer * 100:.2f}% (threshold {threshold:.4f})")
    ax.annotate(f"EER {eer * 100:.2f}%", (eer * 100, (1 - eer) * 100), textcoords="offset points",
                xytext=(10, -15), color="tab:red")
    ax.set(xlabel="false accept rate (%)", ylabel="true accept rate = 100 - false reject rate (%)",
           title=title, xlim=(0, 100), ylim=(0, 101))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def det_ticks(lo: float = DET_MIN, hi: float = DET_MAX, min_gap: float = 0.0) -> tuple[list[float], list[str]]:
    """Tick positions (normal deviates) and their labels in percent within ``[lo, hi]`` (fractions):
    the densest tick set whose neighbours are at least ``min_gap`` normal-deviate units apart."""
    from scipy.stats import norm
    for ticks in DET_TICK_SETS:
        pct = [p for p in ticks if lo * 100 - 1e-12 <= p <= hi * 100 + 1e-12]
        pos = [float(norm.ppf(p / 100)) for p in pct]
        if len(pos) < 2 or min(np.diff(pos)) >= min_gap:
            break
    return pos, [f"{p:g}%" for p in pct]


def plot_det(fpr, fnr, eer: float, eer_threshold: float, path: Path, dcf_point: tuple | None = None,
             label: str = "", title: str = "DET") -> dict:
    """DET curve on normal-deviate axes (both axes in %), EER and (optionally) minDCF points marked.

    ``dcf_point`` is ``(far, frr, min_dcf, threshold)`` of the minDCF(0.01) operating point. The axes run
    from the tick just below the smallest non-zero error rate (at least 0.01%, at most 0.1%) to 99%;
    rates of 0 (or 1) cannot be drawn on a probit scale and sit on the axis edge. Returns the axis range
    and tick labels used.
    """
    from scipy.stats import norm
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = np.asarray(fnr, dtype=np.float64)
    nonzero = np.concatenate([fpr[fpr > 0], fnr[fnr > 0]])
    smallest = float(nonzero.min()) if nonzero.size else 1e-3
    lo = max(DET_MIN, [p / 100 for p in DET_TICKS_PCT if p / 100 <= min(smallest, 1e-3)][-1]
             if smallest >= DET_MIN else DET_MIN)
    hi = DET_MAX
    lim = (float(norm.ppf(lo)), float(norm.ppf(hi)))

    def z(v):
        return norm.ppf(np.clip(np.asarray(v, dtype=np.float64), lo, hi))
    ticks, tick_labels = det_ticks(lo, hi, min_gap=(lim[1] - lim[0]) / 18)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(z(fpr), z(fnr), lw=1.8, label=label or "DET")
    ax.plot([z(eer)], [z(eer)], "o", color="tab:red", ms=7,
            label=f"EER = {eer * 100:.2f}% (threshold {eer_threshold:.4f})")
    if dcf_point is not None:
        far, frr, dcf, thr = dcf_point
        thr_text = "reject all" if not np.isfinite(thr) else f"threshold {thr:.4f}"
        ax.plot([z(far)], [z(frr)], "s", color="tab:green", ms=7, clip_on=False,
                label=f"minDCF(0.01) = {dcf:.4f} ({thr_text})")
    ax.plot(lim, lim, ls="--", lw=0.8, color="gray", label="FAR = FRR")
    ax.set_xticks(ticks, tick_labels)
    ax.set_yticks(ticks, tick_labels)
    ax.set(xlim=lim, ylim=lim, xlabel="false accept rate (%)", ylabel="false reject rate = miss rate (%)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)
    return {"xlim": lim, "ticks": tick_labels}


def plot_score_hist(scores, labels, threshold: float, path: Path, label: str = "", title: str = "Scores",
                    score_name: str = "score") -> None:
    """Histograms (densities) of target and non-target trial scores with the EER threshold line."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    tar, non = scores[labels == 1], scores[labels == 0]
    bins = np.histogram_bin_edges(scores, bins=min(60, max(10, int(np.sqrt(scores.size)))))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.hist(non, bins=bins, density=True, alpha=0.55, color="tab:blue",
            label=f"non-target (different speaker), n={non.size}")
    ax.hist(tar, bins=bins, density=True, alpha=0.55, color="tab:orange",
            label=f"target (same speaker), n={tar.size}")
    ax.axvline(threshold, color="tab:red", lw=1.5, ls="--", label=f"EER threshold {threshold:.4f}")
    ax.set(xlabel=f"{score_name} (accept when >= threshold)", ylabel="density (fraction of trials per unit score)",
           title=title)
    if label:
        ax.plot([], [], " ", label=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)

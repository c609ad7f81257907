"""Figures for the lab report (matplotlib, Agg): training curves, ROC, DET and score histograms.

``plot_roc``   true-accept against false-accept rate, EER point marked.
``plot_det``   detection error trade-off: miss (false reject) against false-alarm rate on normal-deviate
               axes (``scipy.stats.norm.ppf``), so Gaussian score distributions give straight lines;
               ticks in %, EER and minDCF(0.01) operating points marked.
``plot_score_hist``  target / non-target score histograms with the EER threshold.
``plot_log_curves``  the per-epoch columns of ``train_log.csv``, one panel each (the report's curves).

By default the figures are the evaluation's own pictures (sized for a screen). With ``style=PrintStyle(...)``
they are drawn for the printed report: at the size they are printed (``width_mm``; the report's page shows
them at exactly that width), so a font size in points is the printed size; legends sit below the axes;
labels can come in another language (``style.text``) with a CJK font (``cjk_font``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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


# The figures' words, in English; a PrintStyle's ``text`` replaces any of them (another language).
TEXT = {
    "far": "false accept rate (%)", "tar": "true accept rate = 100 - false reject rate (%)",
    "frr": "false reject rate = miss rate (%)", "far_eq_frr": "FAR = FRR",
    "eer_point": "EER = {eer:.2f}% (threshold {thr:.4f})", "eer_note": "EER {eer:.2f}%",
    "dcf_point": "minDCF(0.01) = {dcf:.4f} ({thr})", "threshold": "threshold {thr:.4f}", "reject_all": "reject all",
    "non_target": "non-target (different speaker), n={n}", "target": "target (same speaker), n={n}",
    "eer_threshold": "EER threshold {thr:.4f}", "score_axis": "{score_name} (accept when >= threshold)",
    "density": "density (fraction of trials per unit score)", "epoch": "epoch",
}


@dataclass(frozen=True)
class PrintStyle:
    """A figure for the printed report: ``width_mm`` x ``height_mm`` as printed, text sizes in printed
    points (``font_pt``: ticks, legend and notes, the smallest text; ``label_pt``: axis labels;
    ``title_pt``), ``fonts``: families tried first (a CJK font for Chinese), ``text``: words replacing
    ``TEXT``'s, ``legend_cols``: columns of the legend under the axes."""
    width_mm: float
    height_mm: float
    dpi: int = 150
    font_pt: float = 9.0
    label_pt: float = 9.5
    title_pt: float = 10.5
    fonts: tuple = ()
    text: dict = field(default_factory=dict)
    legend_cols: int = 1

    def rc(self) -> dict:
        return {"font.size": self.font_pt, "axes.labelsize": self.label_pt, "axes.titlesize": self.title_pt,
                "xtick.labelsize": self.font_pt, "ytick.labelsize": self.font_pt, "legend.fontsize": self.font_pt,
                "figure.titlesize": self.title_pt, "font.family": ["sans-serif"],
                "font.sans-serif": [*self.fonts, "DejaVu Sans"]}


def _text(style: PrintStyle | None) -> dict:
    return {**TEXT, **(style.text if style is not None else {})}


def _context(style: PrintStyle | None):
    return contextlib.nullcontext() if style is None else plt.rc_context(style.rc())


def _figure(style: PrintStyle | None, figsize: tuple, ncols: int = 1):
    if style is None:
        return plt.subplots(1, ncols, figsize=figsize)
    return plt.subplots(1, ncols, figsize=(style.width_mm / 25.4, style.height_mm / 25.4), layout="constrained")


def _legend(fig, ax, style: PrintStyle | None, **screen) -> None:
    """The screen figure's legend in the axes (``screen``: its keywords); the printed one under the axes."""
    if style is None:
        ax.legend(**screen)
    else:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=style.legend_cols,
                   frameon=False)


def smallest_text_pt(fig) -> float:
    """The smallest font size (points) of any visible, non-empty text in ``fig``."""
    from matplotlib.text import Text
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return float(min(sizes)) if sizes else 0.0


def printed_pt(font_pt: float, png_width_px: int, dpi: float, printed_width_mm: float) -> float:
    """The printed size of ``font_pt`` text of a figure saved ``png_width_px`` wide at ``dpi``, printed
    ``printed_width_mm`` wide: the picture is scaled by printed width / drawn width."""
    return font_pt * (printed_width_mm / 25.4) / (png_width_px / dpi)


def _save(fig, path: Path, style: PrintStyle | None = None) -> dict:
    """Write ``fig`` as PNG (screen: cropped to its content; print: exactly the style's size, so it prints
    at scale 1). Returns ``{"min_font_pt", "width_mm", "dpi"}`` for a print figure, else ``{}``."""
    if style is None:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        return {}
    info = {"min_font_pt": smallest_text_pt(fig), "width_mm": style.width_mm, "dpi": style.dpi}
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=style.dpi))
    plt.close(fig)
    return info


_CJK_FAMILIES = ("Noto Sans CJK SC", "Source Han Sans SC", "Noto Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                 "Microsoft YaHei", "SimHei", "PingFang SC", "Noto Sans CJK JP", "Noto Sans CJK TC")
_CJK_FILES = ("notosanscjk", "sourcehansans", "notosanssc", "wqy", "msyh", "simhei", "pingfang")
_cjk_found: list = []


def cjk_font() -> str | None:
    """A font family with Chinese glyphs that matplotlib can use (Noto Sans CJK SC first), or None.
    Fonts installed after matplotlib built its font list are added from the system font folders."""
    if _cjk_found:
        return _cjk_found[0]
    from matplotlib import font_manager as fm

    def known() -> str | None:
        names = {f.name for f in fm.fontManager.ttflist}
        return next((n for n in _CJK_FAMILIES if n in names), None)
    name = known()
    if name is None:
        for path in fm.findSystemFonts():
            if any(k in Path(path).name.lower() for k in _CJK_FILES):
                try:
                    fm.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        name = known()
    _cjk_found.append(name)
    return name


def plot_training_curves(history: list[dict], path: Path, title: str = "", best_epoch: int | None = None) -> list[str]:
    """Loss and accuracy per epoch, side by side, and a third panel with the validation EER and
    minDCF(0.01) (``svlab.validation``) when some epoch was validated, ``best_epoch`` marked.
    Returns the panels' titles."""
    epochs = [h["epoch"] for h in history]
    val = [h for h in history if "val_eer_pct" in h]
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(15 if val else 10, 4), layout="constrained")
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(epochs, [h["loss"] for h in history], marker="o", ms=3)
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax2.plot(epochs, [h["acc"] for h in history], marker="o", ms=3, color="tab:green")
    ax2.set(xlabel="epoch", ylabel="training accuracy (%)", title="Accuracy")
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    if val:
        ax3 = axes[2]
        ve = [h["epoch"] for h in val]
        ax3.plot(ve, [h["val_eer_pct"] for h in val], marker="o", ms=3, color="tab:red", label="EER (%)")
        best = next((h for h in val if h["epoch"] == best_epoch), None)
        if best is not None:
            ax3.plot([best["epoch"]], [best["val_eer_pct"]], "*", ms=12, color="tab:red",
                     label=f"best: epoch {best['epoch']}, {best['val_eer_pct']:.2f}%")
        ax3.set(xlabel="epoch", ylabel="validation EER (%)", title="Validation")
        twin = ax3.twinx()
        twin.plot(ve, [h.get("val_min_dcf", float("nan")) for h in val], marker="s", ms=3, ls="--",
                  color="tab:purple", label="minDCF(0.01)")
        twin.set_ylabel("validation minDCF(0.01)")
        handles = ax3.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax3.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return [ax.get_title() for ax in axes]


def plot_roc(fpr, fnr, eer: float, threshold: float, path: Path, label: str = "", title: str = "ROC",
             style: PrintStyle | None = None) -> dict:
    """ROC (true-accept rate against false-accept rate) with the EER point marked and labelled."""
    fpr, fnr, t = np.asarray(fpr), np.asarray(fnr), _text(style)
    with _context(style):
        fig, ax = _figure(style, (5.5, 5))
        ax.plot(fpr * 100, (1.0 - fnr) * 100, lw=1.8, label=label or "ROC")
        ax.plot([0, 100], [100, 0], ls="--", lw=0.8, color="gray", label=t["far_eq_frr"])
        ax.plot([eer * 100], [(1 - eer) * 100], "o", color="tab:red", ms=7,
                label=t["eer_point"].format(eer=eer * 100, thr=threshold))
        ax.annotate(t["eer_note"].format(eer=eer * 100), (eer * 100, (1 - eer) * 100), textcoords="offset points",
                    xytext=(10, -15), color="tab:red")
        ax.set(xlabel=t["far"], ylabel=t["tar"], title=title, xlim=(0, 100), ylim=(0, 101))
        ax.grid(alpha=0.3)
        _legend(fig, ax, style, loc="lower right", fontsize=8)
        return _save(fig, path, style)


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
             label: str = "", title: str = "DET", style: PrintStyle | None = None) -> dict:
    """DET curve on normal-deviate axes (both axes in %), EER and (optionally) minDCF points marked.

    ``dcf_point`` is ``(far, frr, min_dcf, threshold)`` of the minDCF(0.01) operating point. The axes run
    from the tick just below the smallest non-zero error rate (at least 0.01%, at most 0.1%) to 99%;
    rates of 0 (or 1) cannot be drawn on a probit scale and sit on the axis edge. Returns the axis range
    and tick labels used (and, for a print figure, what ``_save`` returns).
    """
    from scipy.stats import norm
    t = _text(style)
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
    if style is None:
        min_gap = (lim[1] - lim[0]) / 18
    else:  # x labels stand upright: neighbours need a line height (1.3 x font) on ~75% of the width
        min_gap = (lim[1] - lim[0]) * 1.3 * style.font_pt / (0.75 * style.width_mm / 25.4 * 72)
    ticks, tick_labels = det_ticks(lo, hi, min_gap=min_gap)
    with _context(style):
        fig, ax = _figure(style, (5.5, 5))
        ax.plot(z(fpr), z(fnr), lw=1.8, label=label or "DET")
        ax.plot([z(eer)], [z(eer)], "o", color="tab:red", ms=7,
                label=t["eer_point"].format(eer=eer * 100, thr=eer_threshold))
        if dcf_point is not None:
            far, frr, dcf, thr = dcf_point
            thr_text = t["reject_all"] if not np.isfinite(thr) else t["threshold"].format(thr=thr)
            ax.plot([z(far)], [z(frr)], "s", color="tab:green", ms=7, clip_on=False,
                    label=t["dcf_point"].format(dcf=dcf, thr=thr_text))
        ax.plot(lim, lim, ls="--", lw=0.8, color="gray", label=t["far_eq_frr"])
        ax.set_xticks(ticks, tick_labels, rotation=0 if style is None else 90)
        ax.set_yticks(ticks, tick_labels)
        ax.set(xlim=lim, ylim=lim, xlabel=t["far"], ylabel=t["frr"], title=title)
        ax.grid(alpha=0.3)
        _legend(fig, ax, style, loc="upper right", fontsize=8)
        return {"xlim": lim, "ticks": tick_labels, **_save(fig, path, style)}


def plot_score_hist(scores, labels, threshold: float, path: Path, label: str = "", title: str = "Scores",
                    score_name: str = "score", style: PrintStyle | None = None) -> dict:
    """Histograms (densities) of target and non-target trial scores with the EER threshold line."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    t = _text(style)
    tar, non = scores[labels == 1], scores[labels == 0]
    bins = np.histogram_bin_edges(scores, bins=min(60, max(10, int(np.sqrt(scores.size)))))
    with _context(style):
        fig, ax = _figure(style, (6.5, 4.2))
        ax.hist(non, bins=bins, density=True, alpha=0.55, color="tab:blue", label=t["non_target"].format(n=non.size))
        ax.hist(tar, bins=bins, density=True, alpha=0.55, color="tab:orange", label=t["target"].format(n=tar.size))
        ax.axvline(threshold, color="tab:red", lw=1.5, ls="--", label=t["eer_threshold"].format(thr=threshold))
        ax.set(xlabel=t["score_axis"].format(score_name=score_name), ylabel=t["density"], title=title)
        if label:
            ax.plot([], [], " ", label=label)
        ax.grid(alpha=0.3)
        _legend(fig, ax, style, fontsize=8)
        return _save(fig, path, style)


def plot_log_curves(epochs: list, panels: list[tuple[str, list, str]], path: Path, style: PrintStyle,
                    per_row: int = 2) -> dict:
    """One panel per ``(title, values per epoch, y label)``, ``per_row`` to a row (epochs without a value,
    e.g. not validated, are left out), for the printed report (``plot_training_curves`` draws the run
    folder's ``curves.png``)."""
    from matplotlib.ticker import MaxNLocator
    t = _text(style)
    rows = -(-len(panels) // per_row)
    with _context(style):
        fig, axes = plt.subplots(rows, per_row, squeeze=False, layout="constrained",
                                 figsize=(style.width_mm / 25.4, style.height_mm / 25.4))
        colors = ("tab:blue", "tab:green", "tab:purple", "tab:brown")
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_visible(False)
                continue
            title, values, ylabel = panels[i]
            xy = [(e, v) for e, v in zip(epochs, values) if v is not None and np.isfinite(v)]
            ax.plot([e for e, _ in xy], [v for _, v in xy], marker="o", ms=3, color=colors[i % len(colors)])
            ax.set(xlabel=t["epoch"], ylabel=ylabel, title=title)
            ax.grid(alpha=0.3)
            if epochs:  # every panel over all the epochs, whole numbers
                pad = max(0.5, 0.04 * (max(epochs) - min(epochs)))
                ax.set_xlim(min(epochs) - pad, max(epochs) + pad)
            if all(float(e).is_integer() for e in epochs):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _save(fig, path, style)

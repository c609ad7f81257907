"""Figures for the lab report: training curves and the ROC curve with its EER point (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from checkpoint import atomic_write  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(fpr, 1.0 - fnr, lw=1.8, label=label or "ROC")
    ax.plot([0, 1], [1, 0], ls="--", lw=0.8, color="gray", label="FAR = FRR")
    ax.plot([eer], [1 - eer], "o", color="tab:red", ms=7,
            label=f"EER = {eer * 100:.2f}% (threshold {threshold:.4f})")
    ax.annotate(f"EER {eer * 100:.2f}%", (eer, 1 - eer), textcoords="offset points", xytext=(10, -15),
                color="tab:red")
    ax.set(xlabel="false accept rate", ylabel="true accept rate (1 - false reject rate)", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)

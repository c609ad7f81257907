"""Verification metrics: EER with its threshold, minDCF, actual DCF, error rates at a threshold.

Convention everywhere: a trial is *accepted* (called "same speaker") when ``score >= threshold``.
``labels`` are 1 for target (same speaker) and 0 for non-target trials.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve


class MetricError(ValueError):
    """Scores/labels for which a metric is undefined (e.g. only one class)."""


@dataclass(frozen=True)
class ErrorCurve:
    """Operating points, one per distinct score threshold, threshold decreasing.

    ``fpr[i]`` / ``fnr[i]`` are the false-accept and false-reject rates when accepting
    ``score >= thresholds[i]``. The first point accepts nothing (threshold ``+inf``), the last
    accepts everything.
    """
    fpr: np.ndarray
    fnr: np.ndarray
    thresholds: np.ndarray


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise MetricError(f"{scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise MetricError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    if not np.isin(labels, (0, 1)).all():
        raise MetricError("labels must be 0 (non-target) or 1 (target)")
    n_tar = int((labels == 1).sum())
    if n_tar == 0 or n_tar == labels.size:
        kind = "no target (label 1)" if n_tar == 0 else "no non-target (label 0)"
        raise MetricError(f"the trial list has {kind} trials; EER/DCF need both classes")
    return scores, labels.astype(np.int64)


def error_curve(scores, labels) -> ErrorCurve:
    """False-accept / false-reject rates at every distinct threshold (sklearn's ROC)."""
    scores, labels = _check(scores, labels)
    fpr, tpr, thr = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    return ErrorCurve(fpr=fpr, fnr=1.0 - tpr, thresholds=thr)


def compute_eer(scores, labels) -> tuple[float, float]:
    """Equal error rate (fraction) and its threshold.

    The EER is where the false-reject and false-accept curves cross. Both are step functions of the
    threshold; between the last operating point with ``fnr > fpr`` and the first with ``fnr <= fpr``
    we interpolate linearly (the ROC convex segment), which is exact where the curves meet at a point
    and avoids the bias of picking the nearest ROC point. The threshold is interpolated the same way.
    """
    curve = error_curve(scores, labels)
    fpr, fnr, thr = curve.fpr, curve.fnr, curve.thresholds
    diff = fnr - fpr
    k = int(np.argmax(diff <= 0))  # first point where false rejects no longer exceed false accepts
    if diff[k] == 0 or k == 0:
        return float(fpr[k]), float(thr[k])
    d0, d1 = diff[k - 1], diff[k]
    t = d0 / (d0 - d1)
    eer = fpr[k - 1] + t * (fpr[k] - fpr[k - 1])
    if np.isinf(thr[k - 1]):
        threshold = thr[k]
    else:
        threshold = thr[k - 1] + t * (thr[k] - thr[k - 1])
    return float(eer), float(threshold)


def min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """Normalised minimum detection cost (NIST SRE / VoxSRC) and the threshold reaching it.

    DCF(t) = c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target), divided by
    min(c_miss * p_target, c_fa * (1 - p_target)), the cost of the best threshold-free decision.
    """
    if not 0.0 < p_target < 1.0:
        raise MetricError(f"p_target must be in (0, 1), got {p_target}")
    curve = error_curve(scores, labels)
    cost = c_miss * curve.fnr * p_target + c_fa * curve.fpr * (1.0 - p_target)
    norm = min(c_miss * p_target, c_fa * (1.0 - p_target))
    i = int(np.argmin(cost))
    return float(cost[i] / norm), float(curve.thresholds[i])


def error_rates_at(scores, labels, threshold: float) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) when accepting ``score >= threshold``."""
    scores, labels = _check(scores, labels)
    accept = scores >= threshold
    far = float(accept[labels == 0].mean())
    frr = float((~accept[labels == 1]).mean())
    return far, frr


def actual_dcf(scores, labels, threshold: float, p_target: float = 0.01,
               c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised DCF at a fixed threshold (how good a threshold chosen in advance really is)."""
    far, frr = error_rates_at(scores, labels, threshold)
    norm = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float((c_miss * frr * p_target + c_fa * far * (1.0 - p_target)) / norm)

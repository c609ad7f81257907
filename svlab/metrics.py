"""Verification metrics: EER with its threshold, minDCF, actual DCF, error rates at a threshold, Cllr.

Convention everywhere: a trial is *accepted* (called "same speaker") when ``score >= threshold``.
``labels`` are 1 for target (same speaker) and 0 for non-target trials.

``summary(scores, labels)`` gives everything the lab reports in one call (one sort of the scores):
EER and its threshold, minDCF at P_target = 0.01 and 0.001 with their thresholds, trial counts.
``rates_at_threshold(scores, labels, t)`` says what a chosen threshold really does (FAR/FRR and the
counts behind them). ``cllr`` / ``min_cllr`` measure how well log-likelihood-ratio scores are
calibrated (0 = perfect, 1 = no better than always answering "don't know").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

from svlab.errors import MetricError

DCF_TARGETS = (0.01, 0.001)


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
    if scores.size == 0:
        raise MetricError("no trials: the score list is empty")
    if not np.all(np.isfinite(scores)):
        raise MetricError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    if not np.isin(labels, (0, 1)).all():
        raise MetricError("labels must be 0 (non-target) or 1 (target)")
    n_tar = int((labels == 1).sum())
    if n_tar == 0 or n_tar == labels.size:
        kind = "no target (label 1)" if n_tar == 0 else "no non-target (label 0)"
        raise MetricError(f"the trial list has {kind} trials ({labels.size} trials in all); EER/DCF need "
                          "both same-speaker (1) and different-speaker (0) trials")
    return scores, labels.astype(np.int64)


def error_curve(scores, labels) -> ErrorCurve:
    """False-accept / false-reject rates at every distinct threshold (sklearn's ROC)."""
    scores, labels = _check(scores, labels)
    fpr, tpr, thr = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    return ErrorCurve(fpr=fpr, fnr=1.0 - tpr, thresholds=thr)


def _eer_from_curve(curve: ErrorCurve) -> tuple[float, float]:
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


def compute_eer(scores, labels) -> tuple[float, float]:
    """Equal error rate (fraction) and its threshold.

    The EER is where the false-reject and false-accept curves cross. Both are step functions of the
    threshold; between the last operating point with ``fnr > fpr`` and the first with ``fnr <= fpr``
    we interpolate linearly (the ROC convex segment), which is exact where the curves meet at a point
    and avoids the bias of picking the nearest ROC point. The threshold is interpolated the same way.
    """
    return _eer_from_curve(error_curve(scores, labels))


def _dcf_norm(p_target: float, c_miss: float, c_fa: float) -> float:
    if not 0.0 < p_target < 1.0:
        raise MetricError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise MetricError(f"costs must be positive, got c_miss={c_miss}, c_fa={c_fa}")
    return min(c_miss * p_target, c_fa * (1.0 - p_target))


def _min_dcf_from_curve(curve: ErrorCurve, p_target: float, c_miss: float = 1.0,
                        c_fa: float = 1.0) -> tuple[float, float]:
    norm = _dcf_norm(p_target, c_miss, c_fa)
    cost = c_miss * curve.fnr * p_target + c_fa * curve.fpr * (1.0 - p_target)
    i = int(np.argmin(cost))
    return float(cost[i] / norm), float(curve.thresholds[i])


def min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """Normalised minimum detection cost (NIST SRE / VoxSRC) and the threshold reaching it.

    DCF(t) = c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target), divided by
    min(c_miss * p_target, c_fa * (1 - p_target)), the cost of the best threshold-free decision.
    The threshold may be ``+inf`` (reject everything) when no finite threshold does better.
    """
    _dcf_norm(p_target, c_miss, c_fa)
    return _min_dcf_from_curve(error_curve(scores, labels), p_target, c_miss, c_fa)


def error_rates_at(scores, labels, threshold: float) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) when accepting ``score >= threshold``."""
    scores, labels = _check(scores, labels)
    accept = scores >= threshold
    far = float(accept[labels == 0].mean())
    frr = float((~accept[labels == 1]).mean())
    return far, frr


def rates_at_threshold(scores, labels, threshold: float) -> dict:
    """What a user-chosen threshold does: FAR/FRR (fractions) and the counts behind them.

    Keys: ``threshold``, ``far``, ``frr``, ``false_accepts``, ``false_rejects``, ``n_target``,
    ``n_nontarget``, ``accepted``.
    """
    scores, labels = _check(scores, labels)
    accept = scores >= threshold
    n_tar = int((labels == 1).sum())
    n_non = int(labels.size - n_tar)
    fa = int(accept[labels == 0].sum())
    fr = int((~accept[labels == 1]).sum())
    return {"threshold": float(threshold), "far": fa / n_non, "frr": fr / n_tar, "false_accepts": fa,
            "false_rejects": fr, "n_target": n_tar, "n_nontarget": n_non, "accepted": int(accept.sum())}


def actual_dcf(scores, labels, threshold: float, p_target: float = 0.01,
               c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised DCF at a fixed threshold (how good a threshold chosen in advance really is)."""
    norm = _dcf_norm(p_target, c_miss, c_fa)
    far, frr = error_rates_at(scores, labels, threshold)
    return float((c_miss * frr * p_target + c_fa * far * (1.0 - p_target)) / norm)


def bayes_threshold(p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The threshold on *calibrated* log-likelihood ratios that minimises the expected cost:
    ``log(c_fa * (1 - p_target) / (c_miss * p_target))`` (4.595 for p_target = 0.01)."""
    _dcf_norm(p_target, c_miss, c_fa)
    return float(np.log(c_fa * (1.0 - p_target) / (c_miss * p_target)))


def summary(scores, labels, p_targets=DCF_TARGETS) -> dict:
    """EER/threshold, minDCF and its threshold for each ``p_target``, trial counts (one ROC pass).

    Keys: ``eer``, ``threshold``, ``min_dcf_<p>``, ``min_dcf_<p>_threshold`` (``<p>`` as written,
    e.g. ``0.01``), ``n_target``, ``n_nontarget``.
    """
    curve = error_curve(scores, labels)
    labels = np.asarray(labels).ravel()
    eer, thr = _eer_from_curve(curve)
    out = {"eer": eer, "threshold": thr}
    for p in p_targets:
        dcf, dcf_thr = _min_dcf_from_curve(curve, p)
        out[f"min_dcf_{p:g}"] = dcf
        out[f"min_dcf_{p:g}_threshold"] = dcf_thr
    out["n_target"] = int((labels == 1).sum())
    out["n_nontarget"] = int((labels == 0).sum())
    return out


# --------------------------------------------------------------------------- calibration quality
def cllr(llr, labels) -> float:
    """Log-likelihood-ratio cost (bits, Brümmer & du Preez 2006) of natural-log LLR scores.

    0 for perfect, well-calibrated scores; 1 for the uninformative LLR = 0; larger when the scores
    are miscalibrated (over-confident or on the wrong scale).
    """
    llr, labels = _check(llr, labels)
    tar, non = llr[labels == 1], llr[labels == 0]
    c_tar = np.mean(np.logaddexp(0.0, -tar))   # log(1 + e^-llr), overflow-safe
    c_non = np.mean(np.logaddexp(0.0, non))
    return float((c_tar + c_non) / (2.0 * np.log(2.0)))


def min_cllr(scores, labels) -> float:
    """Cllr after the best monotone (PAV / isotonic) calibration of the scores: the discrimination
    part of Cllr. ``cllr - min_cllr`` is the calibration loss."""
    from sklearn.isotonic import IsotonicRegression
    scores, labels = _check(scores, labels)
    n_tar = int(labels.sum())
    n_non = labels.size - n_tar
    # Posterior of "target" at equal priors (weights 1/n_tar and 1/n_non), then back to an LLR.
    w = np.where(labels == 1, 0.5 / n_tar, 0.5 / n_non)
    post = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(scores, labels, sample_weight=w)
    with np.errstate(divide="ignore"):
        llr = np.log(post) - np.log1p(-post)
    tar, non = llr[labels == 1], llr[labels == 0]
    c_tar = np.mean(np.logaddexp(0.0, -tar))
    c_non = np.mean(np.logaddexp(0.0, non))
    return float((c_tar + c_non) / (2.0 * np.log(2.0)))

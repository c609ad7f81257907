"""Reference computations the tests check the fast code against: error rates by direct counting, the
EER by walking the (FAR, FRR) polyline and by the classic sklearn + brentq recipe, AS-norm by loops."""
from __future__ import annotations

import numpy as np


def brute_rates(scores, labels):
    """(thresholds, far, frr) at +inf and every distinct score, by direct counting."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    thresholds = [np.inf] + sorted(set(scores.tolist()), reverse=True)
    far, frr = [], []
    for t in thresholds:
        acc = scores >= t
        far.append(np.sum(acc & (labels == 0)) / np.sum(labels == 0))
        frr.append(np.sum(~acc & (labels == 1)) / np.sum(labels == 1))
    return np.array(thresholds), np.array(far), np.array(frr)


def brute_eer(scores, labels) -> float:
    """Intersection of the (FAR, FRR) polyline with FAR = FRR, walking the segments."""
    _, far, frr = brute_rates(scores, labels)
    for i in range(1, len(far)):
        d0, d1 = frr[i - 1] - far[i - 1], frr[i] - far[i]
        if d0 > 0 >= d1:
            t = d0 / (d0 - d1)
            return far[i - 1] + t * (far[i] - far[i - 1])
    raise AssertionError("no crossing")


def sklearn_brentq_eer(scores, labels) -> float:
    """The classic recipe: root of 1 - x - TPR(x) on sklearn's ROC, linearly interpolated."""
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    return brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-12)


def naive_asnorm(emb, cohort, a, b, top_n, score=None):
    score = score or (lambda x, y: float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    out = []
    for i, j in zip(a, b):
        s = score(emb[i], emb[j])
        stats = []
        for x in (emb[i], emb[j]):
            c = sorted((score(x, c) for c in cohort), reverse=True)[:top_n]
            stats.append((np.mean(c), max(np.std(c), 1e-6)))
        out.append(0.5 * ((s - stats[0][0]) / stats[0][1] + (s - stats[1][0]) / stats[1][1]))
    return np.array(out)

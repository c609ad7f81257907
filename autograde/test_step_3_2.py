"""Step 3.2 / 第 3.2 步: ``roc`` in ``EER.py``: the false-accept and false-reject rates (accepting
``score >= t``) for every threshold, and the EER point where FAR = FRR with its threshold.

Graded on scores with a known EER: a small exact case, and 1500 + 1500 Gaussian scores (targets
N(1, 1), non-targets N(-1, 1), EER about 15.9 %) against an EER computed here independently.
"""
import numpy as np

import EER
from grading import call, fail

STEP = "3.2"


def run_roc(scores: np.ndarray, labels: np.ndarray):
    result = call(STEP, "roc(scores, labels)", EER.roc, scores, labels)
    if not (isinstance(result, tuple) and len(result) == 4):
        fail(STEP, "roc should return four values: (far, frr, eer, threshold)",
             "roc 应返回四个值：(far, frr, eer, threshold)")
    far, frr = np.asarray(result[0], dtype=np.float64), np.asarray(result[1], dtype=np.float64)
    eer, threshold = float(result[2]), float(result[3])
    if far.shape != frr.shape or far.ndim != 1 or len(far) < 2:
        fail(STEP, f"far and frr should be two 1-D arrays of the same length; got shapes {far.shape} and {frr.shape}",
             f"far 与 frr 应为长度相同的一维数组；实际形状 {far.shape} 与 {frr.shape}")
    if max(far.max(), frr.max(), eer) > 1 or min(far.min(), frr.min(), eer) < 0:
        fail(STEP, "far, frr and eer are rates between 0 and 1, not percent", "far、frr 和 eer 是 0 到 1 之间的比率，不是百分数")
    return far, frr, eer, threshold


def reference_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """The crossing of FAR and FRR over the thresholds, interpolated linearly."""
    ts = np.sort(np.unique(scores))[::-1]
    far = np.array([(scores[labels == 0] >= t).mean() for t in ts])
    frr = np.array([(scores[labels == 1] < t).mean() for t in ts])
    k = int(np.argmax(frr - far <= 0))
    d0, d1 = frr[k - 1] - far[k - 1], frr[k] - far[k]
    return float(far[k - 1] + d0 / (d0 - d1) * (far[k] - far[k - 1]))


def distance_to_curve(far: np.ndarray, frr: np.ndarray, x: float) -> float:
    """Distance from the point (x, x) to the polyline through the ROC points, in their order."""
    p = np.array([x, x])
    a, b = np.stack([far[:-1], frr[:-1]], 1), np.stack([far[1:], frr[1:]], 1)
    ab = b - a
    t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-300), 0, 1)
    return float(np.linalg.norm(a + t[:, None] * ab - p, axis=1).min())


def test_eer_and_threshold_of_a_known_case():
    scores = np.array([0.9, 0.6, 0.8, 0.3, 0.7, 0.2, 0.35, 0.1])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])  # accepting score >= t, FAR = FRR = 25 % for t in (0.35, 0.6]
    _, _, eer, threshold = run_roc(scores, labels)
    if abs(eer - 0.25) > 1e-6:
        fail(STEP, f"targets 0.9 0.8 0.7 0.35, non-targets 0.6 0.3 0.2 0.1: expected EER 0.25, got {eer:g}",
             f"目标分数 0.9 0.8 0.7 0.35，非目标分数 0.6 0.3 0.2 0.1：EER 应为 0.25，实际为 {eer:g}")
    if not 0.35 < threshold <= 0.6:
        fail(STEP, "expected a threshold t in (0.35, 0.6], where FAR = FRR = 0.25 when accepting score >= t; "
             f"got {threshold:g}",
             f"阈值 t 应在 (0.35, 0.6] 内（接受 score >= t 时 FAR = FRR = 0.25）；实际为 {threshold:g}")


def test_the_eer_point_lies_on_the_roc_where_far_equals_frr():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([1, 0], 1500))
    scores = np.where(labels == 1, 1.0, -1.0) + rng.standard_normal(labels.size)
    far, frr, eer, threshold = run_roc(scores, labels)
    expected = reference_eer(scores, labels)
    if abs(eer - expected) > 0.002:
        fail(STEP, f"expected EER {expected:.4f} (where FAR = FRR), got {eer:.4f}",
             f"EER 应为 {expected:.4f}（FAR = FRR 处），实际为 {eer:.4f}")
    gap = distance_to_curve(far, frr, eer)
    if gap > 0.002:
        fail(STEP, f"the point (FAR, FRR) = ({eer:.4f}, {eer:.4f}) is {gap:.4f} away from the returned ROC (far, frr): "
             "return the rates at every threshold, in threshold order",
             f"点 (FAR, FRR) = ({eer:.4f}, {eer:.4f}) 离返回的 ROC (far, frr) 有 {gap:.4f}：请按阈值顺序返回每个阈值下的比率")
    far_t, frr_t = (scores[labels == 0] >= threshold).mean(), (scores[labels == 1] < threshold).mean()
    if abs(far_t - expected) > 0.005 or abs(frr_t - expected) > 0.005:
        fail(STEP, f"at the threshold {threshold:.4f} (accepting score >= t) FAR = {far_t:.4f} and FRR = {frr_t:.4f}; "
             f"expected both near the EER {expected:.4f}", f"阈值 {threshold:.4f}（接受 score >= t）处 FAR = {far_t:.4f}、"
             f"FRR = {frr_t:.4f}；两者都应接近 EER {expected:.4f}")

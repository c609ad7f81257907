"""metrics.py against independent computations (EER, minDCF, Cllr), EER.roc against metrics, and the
ROC / DET / score-histogram figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import EER
from scoring_reference import brute_eer, brute_rates, sklearn_brentq_eer
from svlab import metrics, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return Path(path).is_file() and Path(path).read_bytes()[:8] == PNG_MAGIC and Path(path).stat().st_size > 2000


# ==================================================================================================
# 1. metrics.py against independent computations
# ==================================================================================================
def _datasets():
    rng = np.random.default_rng(7)
    out = []
    for seed in range(4):
        r = np.random.default_rng(seed)
        lab = (r.random(300) < 0.3).astype(int)
        out.append((f"gauss{seed}", r.normal(lab * 1.2, 1.0), lab))
    lab = (rng.random(400) < 0.5).astype(int)
    out.append(("ties", np.round(rng.normal(lab * 0.8, 1.0), 1), lab))          # many tied scores
    out.append(("coarse-ties", rng.integers(0, 4, 400) + lab, lab))              # 5 distinct values
    lab = np.zeros(100, int)
    lab[37] = 1
    out.append(("single-target", rng.random(100), lab))
    lab = (rng.random(50) < 0.5).astype(int)
    out.append(("separated", np.where(lab == 1, 2.0 + rng.random(50), rng.random(50)), lab))
    out.append(("reversed", np.where(lab == 1, rng.random(50), 2.0 + rng.random(50)), lab))
    return out


@pytest.mark.parametrize("name,scores,labels", _datasets(), ids=[d[0] for d in _datasets()])
def test_eer_matches_independent_computations(name, scores, labels):
    eer, thr = metrics.compute_eer(scores, labels)
    assert eer == pytest.approx(brute_eer(scores, labels), abs=1e-9)
    assert eer == pytest.approx(sklearn_brentq_eer(scores, labels), abs=1e-6)
    # Bounds that hold for any definition between the two step curves.
    _, far, frr = brute_rates(scores, labels)
    assert np.max(np.minimum(far, frr)) - 1e-12 <= eer <= np.min(np.maximum(far, frr)) + 1e-12
    # The threshold is an operating point on the right side of the crossing.
    far_t, frr_t = metrics.error_rates_at(scores, labels, thr)
    assert min(far_t, frr_t) - 1e-12 <= eer <= max(far_t, frr_t) + 1e-12


@pytest.mark.parametrize("name,scores,labels", _datasets(), ids=[d[0] for d in _datasets()])
@pytest.mark.parametrize("p_target", [0.5, 0.01, 0.001])
def test_min_dcf_matches_bruteforce_sweep(name, scores, labels, p_target):
    thresholds, far, frr = brute_rates(scores, labels)
    cost = (frr * p_target + far * (1 - p_target)) / min(p_target, 1 - p_target)
    dcf, thr = metrics.min_dcf(scores, labels, p_target=p_target)
    assert dcf == pytest.approx(cost.min(), abs=1e-12)
    assert metrics.actual_dcf(scores, labels, thr, p_target=p_target) == pytest.approx(dcf, abs=1e-12)


def test_special_cases_exact_values():
    # Perfectly separated: EER 0, its threshold accepts every target and no non-target, minDCF 0.
    s, lab = np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    eer, thr = metrics.compute_eer(s, lab)
    assert eer == 0.0
    r = metrics.rates_at_threshold(s, lab, thr)
    assert (r["false_accepts"], r["false_rejects"]) == (0, 0)
    assert metrics.min_dcf(s, lab, 0.01)[0] == 0.0
    # All scores tied: no threshold separates anything.
    assert metrics.compute_eer(np.ones(6), [0, 1, 0, 1, 0, 0])[0] == pytest.approx(0.5)
    # Single target ranked above all but one of 10 non-targets: EER interpolates between 0.1 and 0.
    s = np.array([0.95] + list(np.linspace(0, 0.9, 9)) + [0.99])
    lab = np.array([1] + [0] * 10)
    assert metrics.compute_eer(s, lab)[0] == pytest.approx(brute_eer(s, lab))
    assert metrics.compute_eer(s, lab)[0] == pytest.approx(sklearn_brentq_eer(s, lab), abs=1e-6)


@pytest.mark.parametrize("labels,word", [([1, 1, 1], "no non-target"), ([0, 0], "no target")])
def test_one_class_trial_lists_raise_clear_errors(labels, word):
    s = np.linspace(0, 1, len(labels))
    for fn in (metrics.compute_eer, metrics.min_dcf, metrics.summary, metrics.error_curve, metrics.min_cllr):
        with pytest.raises(metrics.MetricError, match=word):
            fn(s, labels)
    with pytest.raises(metrics.MetricError, match="both"):
        metrics.rates_at_threshold(s, labels, 0.5)
    with pytest.raises(metrics.MetricError, match="empty"):
        metrics.compute_eer([], [])


def test_summary_and_rates_at_threshold():
    rng = np.random.default_rng(3)
    lab = (rng.random(500) < 0.2).astype(int)
    s = rng.normal(lab, 1.0)
    summ = metrics.summary(s, lab)
    assert (summ["eer"], summ["threshold"]) == metrics.compute_eer(s, lab)
    for p in (0.01, 0.001):
        assert (summ[f"min_dcf_{p}"], summ[f"min_dcf_{p}_threshold"]) == metrics.min_dcf(s, lab, p)
    assert (summ["n_target"], summ["n_nontarget"]) == (int(lab.sum()), int((lab == 0).sum()))
    r = metrics.rates_at_threshold(s, lab, 0.3)
    assert r["false_accepts"] == int(np.sum((s >= 0.3) & (lab == 0)))
    assert r["false_rejects"] == int(np.sum((s < 0.3) & (lab == 1)))
    assert (r["far"], r["frr"]) == pytest.approx(metrics.error_rates_at(s, lab, 0.3))
    assert metrics.bayes_threshold(0.01) == pytest.approx(np.log(99))


def test_cllr_and_min_cllr():
    rng = np.random.default_rng(0)
    lab = (rng.random(2000) < 0.5).astype(int)
    assert metrics.cllr(np.zeros(lab.size), lab) == pytest.approx(1.0)       # "don't know" costs 1 bit
    assert metrics.cllr(np.where(lab == 1, 30.0, -30.0), lab) < 1e-9        # confident and right
    # Well-calibrated Gaussian LLRs: scores N(+-mu, 2mu) are exact LLRs; then cllr ~ min_cllr.
    mu = 2.0
    llr = rng.normal(np.where(lab == 1, mu, -mu), np.sqrt(2 * mu))
    c, mc = metrics.cllr(llr, lab), metrics.min_cllr(llr, lab)
    assert mc <= c + 1e-9 and c - mc < 0.05
    # Miscalibrated (scaled x5, shifted): cllr grows, min_cllr does not (monotone invariance).
    bad = 5 * llr + 3
    assert metrics.cllr(bad, lab) > c + 0.3
    assert metrics.min_cllr(bad, lab) == pytest.approx(mc, abs=1e-9)


# ==================================================================================================
# 2. plots
# ==================================================================================================
def test_det_hist_roc_figures(tmp_path):
    from scipy.stats import norm
    rng = np.random.default_rng(1)
    lab = (rng.random(2000) < 0.1).astype(int)
    s = rng.normal(lab * 2.0, 1.0)
    curve = metrics.error_curve(s, lab)
    summ = metrics.summary(s, lab)
    far, frr = metrics.error_rates_at(s, lab, summ["min_dcf_0.01_threshold"])
    info = plots.plot_det(curve.fpr, curve.fnr, summ["eer"], summ["threshold"], tmp_path / "det.png",
                          dcf_point=(far, frr, summ["min_dcf_0.01"], summ["min_dcf_0.01_threshold"]),
                          label="ckpt x on trials.txt", title="DET")
    plots.plot_score_hist(s, lab, summ["threshold"], tmp_path / "hist.png", label="x", title="hist")
    plots.plot_roc(curve.fpr, curve.fnr, summ["eer"], summ["threshold"], tmp_path / "roc.png")
    for name in ("det.png", "hist.png", "roc.png"):
        assert _is_png(tmp_path / name), name
    assert all(t.endswith("%") for t in info["ticks"]) and "1%" in info["ticks"] and "10%" in info["ticks"]
    pos, labels = plots.det_ticks(0.001, 0.5)
    assert pos == pytest.approx([norm.ppf(float(t[:-1]) / 100) for t in labels])


# ==================================================================================================
# 3. EER.roc (lab step 3.2) gives metrics.compute_eer's EER and threshold
# ==================================================================================================
@pytest.mark.parametrize("name,scores,labels", _datasets(), ids=[d[0] for d in _datasets()])
def test_lab_roc_equals_compute_eer(name, scores, labels):
    far, frr, eer, threshold = EER.roc(scores, labels)
    assert (eer, threshold) == metrics.compute_eer(scores, labels)
    curve = metrics.error_curve(scores, labels)
    np.testing.assert_array_equal(far, curve.fpr)
    np.testing.assert_array_equal(frr, curve.fnr)


@pytest.mark.parametrize("seed", range(5))
def test_lab_roc_equals_compute_eer_on_random_float32_scores(seed):
    rng = np.random.default_rng(100 + seed)
    labels = (rng.random(3000) < 0.1).astype(np.int64)
    scores = rng.normal(labels * 1.5, 1.0).astype(np.float32)   # what cosine_score returns
    _, _, eer, threshold = EER.roc(scores, labels)
    assert (eer, threshold) == metrics.compute_eer(scores, labels)
    assert (eer, threshold) == (metrics.summary(scores, labels)["eer"], metrics.summary(scores, labels)["threshold"])

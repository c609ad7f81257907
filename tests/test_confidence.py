"""Confidence intervals by a bootstrap over test speakers (svlab/confidence.py, issue 19 item 5).

- each replicate's EER / minDCF is exactly what ``svlab.metrics`` gives on the replicate's trial list
  built by hand (a speaker drawn k times = k distinct speakers with the same recordings);
- on synthetic scores with speaker effects and a known (analytic) population EER, the 95 % interval
  covers it in at least 90 % of 100 test sets of 25 speakers, and narrows as speakers are added;
- the same seed gives the same interval, whatever the order of the trials;
- EER.py writes the intervals to metrics.json and prints them on the minDCF line, the lab's line unchanged;
  ``test.bootstrap`` is 0 (off) or at least 100.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy.stats import norm

from conftest import quiet
from svlab import confidence, config, metrics
from svlab.errors import ConfigError, MetricError
from svlab.manifests import Trial, Utterance

LAB_LINE = re.compile(r"^Epoch=(\d+|-) EER= \d+\.\d\d Thres= -?\d+\.\d{5} \(trials: \S.*\)$")

# Synthetic scores: target trial of speaker s, utterances i, j: MU + u_s + e_i + e_j + noise; non-target
# trial of speakers a, b: v_a + v_b + e_i + e_j + noise (u, v: speaker effects, e: utterance effects).
MU, TAU_T, TAU_N, SIGMA_U, SIGMA = 2.5, 0.5, 0.25, 0.3, 0.8


def population_eer() -> float:
    """EER of the score distributions over infinitely many speakers: two Gaussians, FAR = FRR at
    t = MU * s_n / (s_t + s_n)."""
    s_t = np.sqrt(TAU_T ** 2 + 2 * SIGMA_U ** 2 + SIGMA ** 2)
    s_n = np.sqrt(2 * TAU_N ** 2 + 2 * SIGMA_U ** 2 + SIGMA ** 2)
    return float(norm.cdf(-MU / (s_t + s_n)))


def draw_test_set(rng, n_speakers: int, utts: int):
    """All pairs of ``utts`` utterances of each of ``n_speakers`` speakers: (scores, labels, spk_a, spk_b)."""
    spk = np.repeat(np.arange(n_speakers), utts)
    i, j = np.triu_indices(len(spk), 1)
    a, b = spk[i], spk[j]
    labels = (a == b).astype(np.int64)
    u, v = rng.normal(0, TAU_T, n_speakers), rng.normal(0, TAU_N, n_speakers)
    e = rng.normal(0, SIGMA_U, len(spk))
    scores = np.where(labels == 1, MU + u[a], v[a] + v[b]) + e[i] + e[j] + rng.normal(0, SIGMA, len(a))
    return scores, labels, a, b


def replicate_by_hand(scores, labels, a, b, counts):
    """The replicate's trial list built literally: speaker s drawn counts[s] times becomes copies
    (s, 0) .. (s, counts[s] - 1); a trial of the original list is kept for every pair of copies of its two
    speakers that are two different speakers, or one speaker for a trial within one speaker."""
    keep_scores, keep_labels = [], []
    for score, label, sa, sb in zip(scores, labels, a, b):
        for ca in range(counts[sa]):
            for cb in range(counts[sb]):
                same_copy = (sa, ca) == (sb, cb)
                if (sa == sb and same_copy) or sa != sb:
                    keep_scores.append(score)
                    keep_labels.append(label)
    return np.array(keep_scores), np.array(keep_labels)


# ==================================================================================================
# Exactness: the vectorised replicates are the metrics of the resampled trial lists
# ==================================================================================================
def test_unit_weights_give_the_point_estimates_exactly():
    rng = np.random.default_rng(3)
    scores, labels, _, _ = draw_test_set(rng, 12, 5)
    scores = np.round(scores, 1)                 # many ties: one operating point per distinct score
    eer, dcf = confidence.weighted_metrics(confidence.SortedTrials.of(scores, labels), np.ones(len(scores)))
    ref = metrics.summary(scores, labels)
    assert eer[0] == ref["eer"]
    assert dcf[0.01][0] == ref["min_dcf_0.01"] and dcf[0.001][0] == ref["min_dcf_0.001"]


def test_each_replicate_equals_the_metrics_of_its_trial_list_built_by_hand():
    rng = np.random.default_rng(4)
    scores, labels, a, b = draw_test_set(rng, 6, 4)
    scores = np.round(scores, 1)
    names = [f"spk{k}" for k in range(6)]           # sorted like the numbers: counts[:, k] is speaker k
    boot = confidence.speaker_bootstrap(scores, labels, [names[k] for k in a], [names[k] for k in b],
                                        replicates=12, seed=5)
    assert boot.speakers == names and boot.counts.shape == (12, 6) and (boot.counts.sum(axis=1) == 6).all()
    checked = 0
    for r, counts in enumerate(boot.counts):
        s, lab = replicate_by_hand(scores, labels, a, b, counts)
        if lab.min() == lab.max():
            continue                                 # no EER: such replicates are left out (boot.dropped)
        ref = metrics.summary(s, lab)
        assert boot.eer[checked] == pytest.approx(ref["eer"], abs=1e-12)
        assert boot.min_dcf[0.01][checked] == pytest.approx(ref["min_dcf_0.01"], abs=1e-12)
        assert boot.min_dcf[0.001][checked] == pytest.approx(ref["min_dcf_0.001"], abs=1e-12)
        checked += 1
    assert checked == len(boot.eer) == 12 - boot.dropped and checked >= 10


def test_trials_between_two_speakers_count_draws_a_times_draws_b():
    # one target trial of speaker A (score 3), one of B (score 2.5), one non-target A-B trial (score 2.8):
    # drawing A twice and B never leaves A's target trial twice and no non-target trial (no EER); A twice
    # and B once gives the A-B trial twice: EER 0 only if every target scores above every non-target
    trials = confidence.SortedTrials.of([3.0, 2.5, 2.8], [1, 1, 0])
    weights = np.array([[2, 2, 1], [0, 1, 1], [0, 2, 1]])[trials.order]   # columns: (c_A, c_B) = (2,0) (2,1) (1,1)
    eer, _ = confidence.weighted_metrics(trials, weights)
    assert np.isnan(eer[0])
    assert eer[1] == metrics.compute_eer([3, 3, 2.5, 2.8, 2.8], [1, 1, 1, 0, 0])[0]
    assert eer[2] == metrics.compute_eer([3, 2.5, 2.8], [1, 1, 0])[0] > 0


# ==================================================================================================
# Coverage and width on synthetic scores with a known EER
# ==================================================================================================
def test_a_large_sample_has_the_analytic_eer():
    scores, labels, _, _ = draw_test_set(np.random.default_rng(0), 400, 3)   # 400 speakers, 718,200 trials
    assert metrics.compute_eer(scores, labels)[0] == pytest.approx(population_eer(), abs=0.004)


def test_the_interval_covers_the_true_eer_in_at_least_90_percent_of_test_sets():
    true_eer, covered, widths = population_eer(), 0, []
    for k in range(100):                    # 100 test sets of 25 speakers x 3 utterances (2,775 trials)
        scores, labels, a, b = draw_test_set(np.random.default_rng(1000 + k), 25, 3)
        lo, hi = confidence.speaker_bootstrap(scores, labels, a, b, replicates=300, seed=k).eer_interval()
        covered += lo <= true_eer <= hi
        widths.append(hi - lo)
    assert covered >= 90, f"the 95% interval covered the true EER in {covered} of 100 test sets"
    assert 0.03 < np.mean(widths) < 0.15   # not trivially wide: a few points of EER around 10.6 %


def test_the_interval_narrows_as_speakers_are_added():
    mean_width = {}
    for n_speakers in (10, 20, 40):
        w = []
        for k in range(5):
            scores, labels, a, b = draw_test_set(np.random.default_rng(50 + k), n_speakers, 3)
            boot = confidence.speaker_bootstrap(scores, labels, a, b, replicates=300)
            lo, hi = boot.eer_interval()
            d_lo, d_hi = boot.min_dcf_interval(0.01)
            assert lo <= hi and d_lo <= d_hi
            w.append(hi - lo)
        mean_width[n_speakers] = np.mean(w)
    assert mean_width[10] > mean_width[20] > mean_width[40]
    assert mean_width[40] < 0.7 * mean_width[10]     # about 1 / sqrt(speakers): 0.5 expected


# ==================================================================================================
# Reproducibility
# ==================================================================================================
def test_same_seed_same_interval_whatever_the_order_of_the_trials():
    scores, labels, a, b = draw_test_set(np.random.default_rng(7), 15, 4)
    names = np.array([f"s{k:02d}" for k in range(15)])
    one = confidence.speaker_bootstrap(scores, labels, names[a], names[b], replicates=200, seed=11)
    two = confidence.speaker_bootstrap(scores, labels, names[a], names[b], replicates=200, seed=11)
    p = np.random.default_rng(0).permutation(len(scores))
    shuffled = confidence.speaker_bootstrap(scores[p], labels[p], names[a][p], names[b][p], replicates=200, seed=11)
    other = confidence.speaker_bootstrap(scores, labels, names[a], names[b], replicates=200, seed=12)
    assert np.array_equal(one.eer, two.eer) and np.array_equal(one.eer, shuffled.eer)
    assert np.array_equal(one.min_dcf[0.01], shuffled.min_dcf[0.01])
    assert one.eer_interval() == shuffled.eer_interval()
    assert not np.array_equal(one.eer, other.eer)


def test_a_paired_interval_of_two_systems_on_the_same_speakers_is_narrower_than_either():
    scores, labels, a, b = draw_test_set(np.random.default_rng(8), 25, 4)
    better = scores + 0.4 * labels + np.random.default_rng(9).normal(0, 0.2, len(scores))  # same hard speakers
    one = confidence.speaker_bootstrap(better, labels, a, b, replicates=300, seed=1)
    two = confidence.speaker_bootstrap(scores, labels, a, b, replicates=300, seed=1)
    lo, hi = confidence.paired_interval(one, two)
    (lo1, hi1), (lo2, hi2) = one.eer_interval(), two.eer_interval()
    assert hi < 0 and hi - lo < 0.7 * min(hi1 - lo1, hi2 - lo2) and lo2 < hi1   # overlapping, yet clearly better
    d_lo, d_hi = confidence.paired_interval(one, two, 0.01)
    assert d_lo <= d_hi
    with pytest.raises(MetricError, match="same seed"):
        confidence.paired_interval(one, confidence.speaker_bootstrap(scores, labels, a, b, replicates=300, seed=2))


# ==================================================================================================
# metrics.json fields, the printed line, the configuration
# ==================================================================================================
def _trials_and_manifest(speakers_of_utts: dict, pairs):
    utts = [Utterance(spk, rel, n + 1) for n, (rel, spk) in enumerate(speakers_of_utts.items())]
    trials = [Trial(e, t, int(speakers_of_utts[e] == speakers_of_utts[t]), n + 1) for n, (e, t) in enumerate(pairs)]
    return trials, utts


def test_interval_fields_say_what_was_resampled_or_why_there_is_no_interval():
    utts = {f"{s}/{u}.wav": s for s in ("A", "B", "C") for u in range(3)}
    pairs = [(x, y) for i, x in enumerate(utts) for y in list(utts)[i + 1:]]
    trials, manifest = _trials_and_manifest(utts, pairs)
    labels = np.array([t.label for t in trials])
    scores = labels + np.random.default_rng(0).normal(0, 0.8, len(labels))
    out = confidence.interval_fields(trials, manifest, scores, labels, 200)
    assert out["ci_speakers"] == 3 and "200 replicates (seed 0, " in out["ci_method"]
    assert re.search(r"\d+ without both kinds of trials left out", out["ci_method"])  # all 3 draws one speaker
    assert "3 test speakers drawn with replacement" in out["ci_method"]
    for key in ("eer_ci95", "min_dcf_0.01_ci95", "min_dcf_0.001_ci95"):
        lo, hi = out[key]
        assert 0 <= lo <= hi <= (1 if key == "eer_ci95" else 1e9)
    line = confidence.intervals_line(out)
    assert re.fullmatch(r"95% CI over 3 speakers: EER \d+\.\d\d-\d+\.\d\d %, minDCF\(0\.01\) \d\.\d{4}-\d\.\d{4} \| ",
                        line), line
    off = confidence.interval_fields(trials, manifest, scores, labels, 0)
    assert off["eer_ci95"] is None and off["ci_method"] == confidence.OFF and confidence.intervals_line(off) == ""
    # one speaker on both sides of every trial (its target trials and mislabelled ones): no bootstrap
    one = {f"A/{u}.wav": "A" for u in range(4)}
    trials1, manifest1 = _trials_and_manifest(one, [(x, y) for x in one for y in one if x < y])
    labels1 = np.array([1, 1, 1, 0, 0, 0])
    none = confidence.interval_fields(trials1, manifest1, np.arange(6.0), labels1, 200)
    assert none["eer_ci95"] is None and "needs 2 or more" in none["ci_method"]
    assert confidence.intervals_line(none).startswith("95% CI: none (the trials have 1 speaker")


def test_eer_py_writes_the_intervals_and_keeps_the_lab_line(make_config, tmp_path):
    import EER
    lines: list[str] = []
    result = EER.evaluate(make_config(tmp_path), None, tmp_path / "base", log=lines.append, baseline=True)
    m = json.loads((tmp_path / "base" / "metrics.json").read_text(encoding="utf-8"))
    assert m["eer_ci95"] == result["eer_ci95"] and len(m["eer_ci95"]) == 2
    assert m["eer_ci95"][0] <= m["eer_ci95"][1] and m["min_dcf_0.01_ci95"][0] <= m["min_dcf_0.01_ci95"][1]
    assert "1000 replicates" in m["ci_method"] and m["ci_speakers"] >= 2
    assert LAB_LINE.match(lines[0]), lines                     # the handout's line, unchanged
    assert lines[1].startswith("minDCF(0.01)= ") and f"95% CI over {m['ci_speakers']} speakers: EER " in lines[1]
    lines.clear()
    EER.evaluate(make_config(tmp_path, {"test.bootstrap": 0}), None, tmp_path / "off", log=lines.append, baseline=True)
    m = json.loads((tmp_path / "off" / "metrics.json").read_text(encoding="utf-8"))
    assert m["eer_ci95"] is None and m["ci_method"] == confidence.OFF and "95% CI" not in "\n".join(lines)


@pytest.mark.parametrize("value", [-1, 1, 99])
def test_bootstrap_replicates_are_zero_or_at_least_100(value):
    with pytest.raises(ConfigError, match=r"key 'test.bootstrap' is -?\d+; give 0 \(no confidence intervals\) or at "
                                          r"least 100 replicates"):
        config.load_config(None, {"test.bootstrap": value})
    assert config.load_config(None, {"test.bootstrap": 0})["test"]["bootstrap"] == 0

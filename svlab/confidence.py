"""Confidence intervals for the EER and minDCF: a bootstrap over test speakers.

Why speakers. The trials of a test list are not independent draws: every trial of speaker A shares A's
voice, recordings and channel, and a test list of 25 speakers is closer to 25 observations than to
31,125. Resampling trials gives intervals about three times too narrow (docs/evaluation.md); resampling
speakers gives the spread one would see with another set of test speakers of the same kind.

What is resampled (``speaker_bootstrap``). The units are the speakers of the trial list (the
speakers of both sides of every trial, from the test manifest). One replicate draws as many speakers
as there are, uniformly with replacement; ``c_s`` is how often speaker ``s`` was drawn. A speaker
drawn ``k`` times enters the replicate as ``k`` distinct speakers with the same recordings, and the
replicate's trial list is what the original design gives for that set of speakers:

- a trial whose two sides are one speaker ``s`` (a target trial) counts ``c_s`` times;
- a trial between speakers ``a`` and ``b`` (a non-target trial) counts ``c_a * c_b`` times (each copy of
  ``a`` against each copy of ``b``: the "two-sided" scheme); it is absent when either was not drawn.

Non-target trials between two copies of one speaker cannot be formed and do not appear. The EER and
minDCF of every replicate are those of its (weighted) trial list, computed exactly as
``svlab.metrics`` does (same interpolation of the EER, same operating points); the interval is the
2.5th to 97.5th percentile of the replicates (percentile bootstrap). A replicate with no target or no
non-target trial has no EER and is left out (counted in ``dropped``; with two or more speakers that
have both kinds of trials this practically never happens).

Speed. The scores are sorted once; each replicate is a column of integer trial weights whose
cumulative sums give the false-accept and false-reject counts at every threshold, a block of
replicates at a time (no ROC per replicate). The draws use ``numpy.random.default_rng(seed)``, so an interval is the same
on every run (seed 0 by default). Measured cost in ``docs/evaluation.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from svlab.errors import MetricError
from svlab.metrics import DCF_TARGETS, _check

SEED = 0
LEVEL = 0.95
OFF = "none (test.bootstrap is 0)"
BLOCK_ELEMENTS = 1 << 22  # replicates x trials handled at once (a few arrays of 32 MiB)


@dataclass(frozen=True)
class SortedTrials:
    """Trials sorted by decreasing score once, for any number of weightings (``weighted_metrics``).

    An operating point accepts every trial with ``score >= t`` for one distinct score ``t``, after a first
    one that accepts nothing (as in sklearn's ROC); ``*_upto[g]``: how many target / non-target trials
    operating point ``g`` accepts."""
    order: np.ndarray            # trial indices, score decreasing
    target_rows: np.ndarray      # positions (in sorted order) of the target trials
    nontarget_rows: np.ndarray
    target_upto: np.ndarray      # (n_points,) target trials accepted at each operating point
    nontarget_upto: np.ndarray

    @classmethod
    def of(cls, scores, labels) -> "SortedTrials":
        scores, labels = _check(scores, labels)
        order = np.argsort(-scores, kind="stable")
        s, is_target = scores[order], labels[order] == 1
        ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])   # last position of each group of equal scores
        tar_upto = np.r_[0, np.cumsum(is_target)[ends]]
        return cls(order, np.flatnonzero(is_target), np.flatnonzero(~is_target), tar_upto,
                   np.r_[0, ends + 1] - tar_upto)


def _accepted(w: np.ndarray, upto: np.ndarray) -> np.ndarray:
    """``(n_points, n_columns)``: the weight of the first ``upto[g]`` rows of ``w``, for each column."""
    cum = np.cumsum(w, axis=0, dtype=w.dtype)    # integer weights stay integers: exact, and half the memory
    out = cum[np.maximum(upto - 1, 0)].astype(np.float64)
    out[upto == 0] = 0.0
    return out


def _metrics(trials: SortedTrials, w_tar: np.ndarray, w_non: np.ndarray,
             p_targets) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """EER and minDCF per column, from the weights of the target and the non-target trials (sorted order)."""
    tar, non = _accepted(w_tar, trials.target_upto), _accepted(w_non, trials.nontarget_upto)
    n_tar, n_non = tar[-1], non[-1]
    ok = (n_tar > 0) & (n_non > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fpr = non / n_non
        fnr = 1.0 - tar / n_tar      # the formulas of sklearn's ROC, for identical rounding
    diff = fnr - fpr
    k = np.maximum(np.argmax(diff <= 0, axis=0), 1)   # first point where false rejects no longer exceed false
    cols = np.arange(diff.shape[1])                     # accepts (never point 0, where diff = 1)
    d0, d1 = diff[k - 1, cols], diff[k, cols]
    f0, f1 = fpr[k - 1, cols], fpr[k, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        eer = np.where(d1 == 0, f1, f0 + d0 / (d0 - d1) * (f1 - f0))
    eer = np.where(ok, eer, np.nan)
    dcf = {}
    for p in p_targets:
        cost = fnr * p + fpr * (1.0 - p)      # the order of svlab.metrics, for identical rounding
        dcf[p] = np.where(ok, cost.min(axis=0) / min(p, 1.0 - p), np.nan)
    return eer, dcf


def weighted_metrics(trials: SortedTrials, weights: np.ndarray,
                     p_targets=DCF_TARGETS) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """EER and minDCF of each column of ``weights`` (``(n_trials, n_columns)`` or ``(n_trials,)``, rows in
    ``trials.order``; trial ``i`` counts ``weights[i, r]`` times in column ``r``). Equals ``svlab.metrics``
    on the trial list with every trial repeated that many times. Columns without target or non-target
    weight give NaN."""
    w = np.asarray(weights)
    w = w.astype(np.int64 if np.issubdtype(w.dtype, np.integer) else np.float64)
    if w.ndim == 1:
        w = w[:, None]
    return _metrics(trials, w[trials.target_rows], w[trials.nontarget_rows], p_targets)


def percentile_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of the finite ``values`` (percentile bootstrap interval)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise MetricError("no bootstrap replicate has both target and non-target trials")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(v, [tail, 100.0 - tail])
    return float(lo), float(hi)


@dataclass
class Bootstrap:
    """The replicates of a speaker bootstrap (see the module docstring for what is resampled)."""
    eer: np.ndarray                          # (kept replicates,) EER of each replicate (fraction)
    min_dcf: dict[float, np.ndarray]         # p_target -> minDCF of each kept replicate
    n_speakers: int
    replicates: int                          # drawn
    seed: int
    dropped: int = 0                         # replicates without target or non-target trials
    speakers: list[str] = field(default_factory=list)   # sorted names: column s of counts
    counts: np.ndarray | None = None         # (replicates, speakers): draws of each speaker in each replicate

    def eer_interval(self, level: float = LEVEL) -> tuple[float, float]:
        return percentile_interval(self.eer, level)

    def min_dcf_interval(self, p_target: float = 0.01, level: float = LEVEL) -> tuple[float, float]:
        return percentile_interval(self.min_dcf[p_target], level)

    def method(self) -> str:
        """One line for ``metrics.json`` (``ci_method``): what was resampled, how often, with which seed."""
        dropped = f", {self.dropped} without both kinds of trials left out" if self.dropped else ""
        return (f"speaker bootstrap: {self.replicates} replicates (seed {self.seed}{dropped}) of the "
                f"{self.n_speakers} test speakers drawn with replacement; a target trial counts once per draw of "
                "its speaker, a non-target trial draws(a) x draws(b) times; 95% percentile interval")


def paired_interval(one: Bootstrap, other: Bootstrap, what: str = "eer", level: float = LEVEL) -> tuple[float, float]:
    """Interval of the difference ``one - other`` of two systems scored on the same trial list, from their
    bootstraps with the same seed and replicates (``what``: ``eer`` or a p_target such as 0.01 for minDCF):
    the same speakers are drawn for both, so what the two share (hard speakers) cancels out. Narrower than
    comparing two intervals; the difference is significant where it excludes 0."""
    if one.speakers != other.speakers or one.counts is None or other.counts is None \
            or not np.array_equal(one.counts, other.counts) or one.eer.shape != other.eer.shape:
        raise MetricError("a paired interval needs two bootstraps of the same trial list's speakers with the same "
                          "seed and number of replicates")
    a, b = (one.eer, other.eer) if what == "eer" else (one.min_dcf[what], other.min_dcf[what])
    return percentile_interval(a - b, level)


def speaker_index(enroll_speakers, test_speakers) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(a, b, names)``: speaker numbers of each trial's two sides (names sorted, so the numbering and
    hence the draws do not depend on the order of the trials)."""
    enroll_speakers, test_speakers = list(enroll_speakers), list(test_speakers)
    names = sorted(set(enroll_speakers) | set(test_speakers))
    number = {s: i for i, s in enumerate(names)}
    a = np.fromiter((number[s] for s in enroll_speakers), dtype=np.int64, count=len(enroll_speakers))
    b = np.fromiter((number[s] for s in test_speakers), dtype=np.int64, count=len(test_speakers))
    return a, b, names


def speaker_bootstrap(scores, labels, enroll_speakers, test_speakers, replicates: int = 1000, seed: int = SEED,
                      p_targets=DCF_TARGETS) -> Bootstrap:
    """Bootstrap over the speakers of the trials (module docstring): ``enroll_speakers[i]`` /
    ``test_speakers[i]`` are the speakers of trial ``i``'s two sides. Needs at least two speakers."""
    scores, labels = _check(scores, labels)
    a, b, names = speaker_index(enroll_speakers, test_speakers)
    if len(a) != len(scores):
        raise MetricError(f"{len(scores)} scores but speakers for {len(a)} trials")
    n_spk = len(names)
    if n_spk < 2:
        raise MetricError(f"a speaker bootstrap needs at least 2 speakers; the trials have {n_spk}")
    if replicates < 1:
        raise MetricError(f"replicates must be positive, got {replicates}")
    trials = SortedTrials.of(scores, labels)
    a, b = a[trials.order], b[trials.order]
    b = np.where(a == b, n_spk, b)             # row n_spk holds 1: a trial within one speaker counts c_a times
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_spk, size=(replicates, n_spk))
    # counts[s, r]: draws of speaker s in replicate r; products of counts are at most n_spk ** 2, so the
    # weights of a replicate sum to at most n_trials * n_spk ** 2: int32 when that fits (exact, and fast)
    small = len(scores) * (n_spk + 1) ** 2 < 2 ** 31
    counts = np.zeros((n_spk + 1, replicates), dtype=np.int32 if small else np.int64)
    np.add.at(counts, (draws, np.arange(replicates)[:, None]), 1)
    counts[n_spk] = 1
    sides = [(a[rows], b[rows]) for rows in (trials.target_rows, trials.nontarget_rows)]
    eer = np.empty(replicates)
    dcf = {p: np.empty(replicates) for p in p_targets}
    block = max(1, BLOCK_ELEMENTS // len(scores))
    for s in range(0, replicates, block):
        c = counts[:, s:s + block]
        (ta, tb), (na, nb) = sides
        e, d = _metrics(trials, c[ta] * c[tb], c[na] * c[nb], p_targets)
        eer[s:s + block] = e
        for p in p_targets:
            dcf[p][s:s + block] = d[p]
    kept = np.isfinite(eer)
    return Bootstrap(eer[kept], {p: v[kept] for p, v in dcf.items()}, n_spk, replicates, seed,
                     int((~kept).sum()), names, counts[:n_spk].T.copy())


# --------------------------------------------------------------------------------------------------
# For EER.py: the metrics.json fields and the printed interval
# --------------------------------------------------------------------------------------------------
def interval_fields(trials, utterances, scores, labels, replicates: int, seed: int = SEED,
                    p_targets=DCF_TARGETS) -> dict:
    """``metrics.json`` fields of an evaluation: ``eer_ci95`` and ``min_dcf_<p>_ci95`` (``[low, high]``,
    fractions like ``eer``; None when there is no interval) and ``ci_method`` (what was resampled, or why
    there is no interval). ``trials``: ``Trial``s (``enroll``, ``test``), ``utterances``: the test
    manifest's ``Utterance``s (``speaker``, ``relpath``), which give each trial side's speaker;
    ``replicates`` 0 turns the bootstrap off (``test.bootstrap``). With an interval, ``ci_speakers``: how many
    speakers were resampled."""
    out = {"eer_ci95": None, **{f"min_dcf_{p:g}_ci95": None for p in p_targets}}
    if replicates <= 0:
        return {**out, "ci_method": OFF}
    speaker = {}
    for u in utterances:
        speaker.setdefault(u.relpath, u.speaker)
    enroll = [speaker[t.enroll] for t in trials]
    test = [speaker[t.test] for t in trials]
    n_spk = len(set(enroll) | set(test))
    if n_spk < 2:
        return {**out, "ci_method": f"none (the trials have {n_spk} speaker; a speaker bootstrap needs 2 or more)"}
    boot = speaker_bootstrap(scores, labels, enroll, test, replicates, seed, p_targets)
    if boot.eer.size == 0:
        return {**out, "ci_method": f"none (no replicate of the {n_spk} speakers had both target and non-target "
                                    "trials)"}
    out["eer_ci95"] = list(boot.eer_interval())
    for p in p_targets:
        out[f"min_dcf_{p:g}_ci95"] = list(boot.min_dcf_interval(p))
    out["ci_method"], out["ci_speakers"] = boot.method(), n_spk
    return out


def interval_text(ci, percent: bool = False, digits: int = 4) -> str:
    """``3.80-6.10`` for an interval ``[low, high]`` (``percent``: fractions shown as percent with 2 decimals,
    as the EER is printed; else ``digits`` decimals), '' for None."""
    if not ci:
        return ""
    scale, d = (100.0, 2) if percent else (1.0, digits)
    return f"{scale * float(ci[0]):.{d}f}-{scale * float(ci[1]):.{d}f}"


def intervals_line(result: dict) -> str:
    """The intervals of an evaluation for its printed minDCF line (the lab's ``Epoch=.. EER= .. Thres= ..``
    line stays as the handout shows it): ``95% CI over 25 speakers: EER 3.80-6.10 %, minDCF(0.01)
    0.3312-0.4710 | ``; why there is none when the bootstrap was on but could not run; '' when it was off."""
    method = result.get("ci_method")
    if not result.get("eer_ci95"):
        return f"95% CI: {method} | " if method and method != OFF else ""
    dcf = interval_text(result.get("min_dcf_0.01_ci95"))
    return (f"95% CI over {result.get('ci_speakers', '?')} speakers: EER {interval_text(result['eer_ci95'], True)} %"
            f"{f', minDCF(0.01) {dcf}' if dcf else ''} | ")

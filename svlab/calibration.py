"""Score calibration: an affine map from raw scores to log-likelihood ratios, fitted on trials among
training speakers held apart from the back-end (``split_calibration_speakers``,
``make_trials_from_labels``). Accept a trial when its calibrated LLR reaches
``svlab.metrics.bayes_threshold(p_target)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from svlab.errors import BackendError


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------

def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


class ScoreCalibrator:
    """Affine map from raw scores to log-likelihood ratios: ``llr = a * score + b``.

    Fitted by prior-weighted logistic regression (Brümmer's linear calibration, as in the BOSARIS
    toolkit): targets get total weight ``prior`` and non-targets ``1 - prior``, whatever their counts,
    so the fitted log-odds are posterior log-odds at that prior; subtracting ``logit(prior)`` gives an
    LLR that does not depend on the class proportions of the calibration trials. The two parameters
    are found by Newton's method on standardised scores with a tiny L2 penalty (1e-6 on the
    standardised slope) that only matters when the classes are perfectly separable.
    """

    def __init__(self, a: float = 1.0, b: float = 0.0, prior: float = 0.5):
        self.a, self.b, self.prior = float(a), float(b), float(prior)
        self.n_target = 0
        self.n_nontarget = 0
        self.fitted = False

    def fit(self, scores, labels, prior: float = 0.5) -> "ScoreCalibrator":
        """scores: ``(n,)`` raw scores; labels: ``(n,)`` 1 = target, 0 = non-target; returns ``self``.

        prior: the effective target prior the regression is weighted to (any value in (0, 1) gives
        the same LLR when the scores are well described by an affine LLR; 0.5 is the usual choice,
        a small value such as 0.01 emphasises the low false-accept region).
        """
        s = np.asarray(scores, dtype=np.float64).ravel()
        y = np.asarray(labels).ravel()
        if s.shape != y.shape:
            raise BackendError(f"{s.size} calibration scores but {y.size} labels")
        if not np.all(np.isfinite(s)):
            raise BackendError("calibration scores contain NaN or infinite values")
        if not np.isin(y, (0, 1)).all():
            raise BackendError("calibration labels must be 0 (non-target) or 1 (target)")
        if not 0.0 < prior < 1.0:
            raise BackendError(f"calibration prior must be in (0, 1), got {prior}")
        y = y.astype(np.float64)
        n_tar, n_non = int(y.sum()), int((1 - y).sum())
        if n_tar == 0 or n_non == 0:
            raise BackendError(f"calibration needs target and non-target trials, got {n_tar} target and "
                               f"{n_non} non-target")
        w = np.where(y == 1, prior / n_tar, (1.0 - prior) / n_non)
        loc, scale = float(s.mean()), float(s.std())
        scale = scale if scale > 0 else 1.0
        z = (s - loc) / scale
        theta = np.array([0.0, _logit(prior)])  # slope, intercept on standardised scores
        lam = 1e-6
        Xd = np.stack([z, np.ones_like(z)], axis=1)
        for _ in range(100):
            eta = Xd @ theta
            pr = 0.5 * (1.0 + np.tanh(0.5 * eta))  # stable sigmoid
            grad = Xd.T @ (w * (pr - y)) + np.array([lam * theta[0], 0.0])
            H = (Xd * (w * pr * (1 - pr))[:, None]).T @ Xd + np.diag([lam, 1e-12])
            step = np.linalg.solve(H, grad)
            theta = theta - step
            if np.max(np.abs(step)) < 1e-10:
                break
        slope, icept = theta
        self.a = float(slope / scale)
        self.b = float(icept - slope * loc / scale - _logit(prior))
        self.prior, self.n_target, self.n_nontarget, self.fitted = float(prior), n_tar, n_non, True
        return self

    def transform(self, scores) -> np.ndarray:
        """Raw scores ``(n,)`` -> calibrated log-likelihood ratios ``(n,)`` float64."""
        return self.a * np.asarray(scores, dtype=np.float64) + self.b

    def state(self) -> dict:
        """Plain dict of numbers: ``a``, ``b``, ``prior``, ``n_target``, ``n_nontarget``."""
        return {"a": self.a, "b": self.b, "prior": self.prior,
                "n_target": int(self.n_target), "n_nontarget": int(self.n_nontarget)}

    @classmethod
    def from_state(cls, d: dict) -> "ScoreCalibrator":
        """Rebuild from :meth:`state` (values may be 0-d arrays)."""
        try:
            c = cls(float(d["a"]), float(d["b"]), float(d["prior"]))
        except KeyError as e:
            raise BackendError(f"calibration state lacks {e}; the back-end file is incomplete, retrain it") from None
        c.n_target, c.n_nontarget = int(d.get("n_target", 0)), int(d.get("n_nontarget", 0))
        c.fitted = True
        return c


# --------------------------------------------------------------------------------------------------
# Calibration data from training speakers
# --------------------------------------------------------------------------------------------------

def split_calibration_speakers(speakers: Sequence[str], fraction: float = 0.2,
                               seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split of training speakers into (fit_speakers, held_out_speakers).

    speakers: speaker ids (duplicates allowed, e.g. one per utterance; order does not matter: the
    unique ids are sorted before a ``seed``-ed permutation). ``round(fraction * n)`` speakers, at
    least 2, are held out for calibration; at least 2 remain for fitting. Both lists come back sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise BackendError(f"calibration fraction must be in (0, 1), got {fraction}")
    uniq = sorted({str(s) for s in speakers})
    n = len(uniq)
    n_held = max(2, int(round(fraction * n)))
    if n - n_held < 2:
        raise BackendError(f"{n} training speakers are too few to hold {n_held} out for calibration and "
                           "keep 2 for the back-end (need at least 4)")
    perm = np.random.default_rng(seed).permutation(n)
    held = sorted(uniq[i] for i in perm[:n_held])
    fit = sorted(uniq[i] for i in perm[n_held:])
    return fit, held


def make_trials_from_labels(labels: Sequence, max_trials: int = 100_000,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced same/different-speaker trials among utterances with speaker ``labels`` (length ``n``).

    Returns ``(idx_a, idx_b, target)``, each ``(m,)``: int64 row indices into the utterances and int64
    labels (1 = same speaker). Equal numbers of target and non-target trials,
    ``m / 2 = min(max_trials // 2, number of same-speaker pairs, number of different-speaker pairs)``;
    pairs are distinct unordered pairs of different utterances (``idx_a < idx_b``), sampled uniformly
    without replacement, shuffled, and reproducible for a given ``seed``.
    """
    lab = np.asarray(list(labels))
    _, y = np.unique(lab, return_inverse=True)
    y = y.ravel().astype(np.int64)
    n = y.size
    counts = np.bincount(y) if n else np.zeros(0, dtype=np.int64)
    n_same = int(np.sum(counts * (counts - 1) // 2))
    n_diff = n * (n - 1) // 2 - n_same
    half = min(int(max_trials) // 2, n_same, n_diff)
    if half < 1:
        raise BackendError(f"cannot build calibration trials from {n} utterances of {counts.size} speakers "
                           f"({n_same} same-speaker and {n_diff} different-speaker pairs)")
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def sample_same(m: int) -> np.ndarray:
        if n_same <= 4 * m:  # enumerate all, pick m
            pairs = [(order[s + i], order[s + j]) for s, c in zip(starts, counts)
                     for i in range(c) for j in range(i + 1, c)]
            pairs = np.array(pairs, dtype=np.int64)
            return pairs[rng.choice(len(pairs), m, replace=False)]
        w = counts * (counts - 1) / 2.0
        w = w / w.sum()
        return _sample_unique(m, lambda k: _draw_same(rng, k, w, counts, starts, order))

    def sample_diff(m: int) -> np.ndarray:
        if n_diff <= 4 * m:
            ia, ib = np.triu_indices(n, 1)
            keep = y[ia] != y[ib]
            pairs = np.stack([ia[keep], ib[keep]], axis=1).astype(np.int64)
            return pairs[rng.choice(len(pairs), m, replace=False)]

        def draw(k: int) -> np.ndarray:
            a, b = rng.integers(0, n, k), rng.integers(0, n, k)
            ok = y[a] != y[b]
            return np.stack([a[ok], b[ok]], axis=1)
        return _sample_unique(m, draw)

    tar, non = sample_same(half), sample_diff(half)
    pairs = np.concatenate([tar, non])
    pairs.sort(axis=1)
    target = np.concatenate([np.ones(half, np.int64), np.zeros(half, np.int64)])
    perm = rng.permutation(pairs.shape[0])
    return pairs[perm, 0].copy(), pairs[perm, 1].copy(), target[perm]


def _draw_same(rng, k, w, counts, starts, order) -> np.ndarray:
    spk = rng.choice(counts.size, k, p=w)
    c = counts[spk]
    i = (rng.random(k) * c).astype(np.int64)
    j = (rng.random(k) * (c - 1)).astype(np.int64)
    j = j + (j >= i)  # a different utterance of the same speaker, uniformly
    return np.stack([order[starts[spk] + i], order[starts[spk] + j]], axis=1)


def _sample_unique(m: int, draw) -> np.ndarray:
    """``m`` distinct unordered pairs from repeated calls of ``draw(k) -> (k', 2)``, in draw order
    (sampling pairs uniformly with rejection of repeats = uniform sampling without replacement)."""
    got = np.zeros((0, 2), dtype=np.int64)
    while got.shape[0] < m:
        new = np.sort(draw(max(2 * (m - got.shape[0]), 64)), axis=1)
        allp = np.concatenate([got, new])
        _, first = np.unique(allp, axis=0, return_index=True)
        got = allp[np.sort(first)]
    return got[:m]

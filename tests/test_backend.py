"""Tests for svlab/backend.py and svlab/calibration.py: PLDA estimation and scoring, calibration,
back-end files, trial sampling."""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from svlab import metrics
from svlab.backend import PLDA, checkpoint_fingerprint, load_backend, read_backend_meta, save_backend
from svlab.calibration import ScoreCalibrator, make_trials_from_labels, split_calibration_speakers
from svlab.errors import BackendError


def random_spd(rng, d, scale=1.0, cond=5.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return scale * (q * np.linspace(1.0, cond, d)) @ q.T


def simulate(rng, B, W, n_spk, n_utt, mean=None):
    """Embeddings of the two-covariance model: x = m + s + e, s ~ N(0, B), e ~ N(0, W)."""
    d = B.shape[0]
    mean = np.zeros(d) if mean is None else mean
    s = rng.multivariate_normal(np.zeros(d), B, n_spk)
    e = rng.multivariate_normal(np.zeros(d), W, n_spk * n_utt)
    X = mean + np.repeat(s, n_utt, axis=0) + e
    labels = np.repeat([f"spk{i:04d}" for i in range(n_spk)], n_utt)
    return X, labels


def rel_fro(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def gauss_model():
    rng = np.random.default_rng(1)
    d = 6
    B = random_spd(rng, d, scale=1.0, cond=4.0)
    W = random_spd(rng, d, scale=0.25, cond=3.0)
    mean = rng.normal(0, 3, d)
    X, labels = simulate(rng, B, W, 300, 20, mean)
    return {"B": B, "W": W, "mean": mean, "X": X, "labels": labels, "rng": rng}


def eval_trials(rng, B, W, mean, n_spk=200, n_utt=4):
    X, labels = simulate(rng, B, W, n_spk, n_utt, mean)
    ia, ib, tgt = make_trials_from_labels(labels, max_trials=4000, seed=3)
    return X[ia], X[ib], tgt


# 1. Estimation on synthetic Gaussian speakers ---------------------------------------------------

def test_plda_recovers_generating_covariances(gauss_model):
    g = gauss_model
    plda = PLDA().fit(g["X"], g["labels"], lda_dim=None, length_norm=False)
    assert plda.dim == 6 and plda.input_dim == 6
    assert rel_fro(plda.within, g["W"]) < 0.05       # 5700 degrees of freedom: tight
    assert rel_fro(plda.between, g["B"]) < 0.2       # 300 speakers
    np.testing.assert_allclose(plda.train_mean + plda.mu, g["mean"], atol=0.3)
    # simultaneous diagonalisation
    np.testing.assert_allclose(plda.V.T @ plda.within @ plda.V, np.eye(6), atol=1e-8)
    np.testing.assert_allclose(plda.V.T @ plda.between @ plda.V, np.diag(plda.psi), atol=1e-8)

    xa, xb, tgt = eval_trials(np.random.default_rng(7), g["B"], g["W"], g["mean"])
    llr = plda.score(xa, xb)
    assert llr[tgt == 1].mean() > llr[tgt == 0].mean() + 2.0
    eer, _ = metrics.compute_eer(llr, tgt)
    assert eer < 0.15
    # the estimated model scores like the true one
    oracle = PLDA.from_params(g["mean"], g["B"], g["W"]).score(xa, xb)
    assert np.corrcoef(llr, oracle)[0, 1] > 0.99
    assert abs(metrics.compute_eer(oracle, tgt)[0] - eer) < 0.02


def test_plda_fit_errors():
    X = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(BackendError, match="at least 2 training speakers"):
        PLDA().fit(X, ["a"] * 5)
    with pytest.raises(BackendError, match="2 or more utterances"):
        PLDA().fit(X, list("abcde"))
    with pytest.raises(BackendError, match="labels"):
        PLDA().fit(X, ["a", "b"])
    with pytest.raises(BackendError, match="not fitted"):
        PLDA().score(X, X)


# 2. Closed form against scipy --------------------------------------------------------------------

def direct_llr(y1, y2, mu, B, W):
    T = B + W
    joint = multivariate_normal(np.concatenate([mu, mu]), np.block([[T, B], [B, T]]))
    marg = multivariate_normal(mu, T)
    return joint.logpdf(np.concatenate([y1, y2])) - marg.logpdf(y1) - marg.logpdf(y2)


@pytest.mark.parametrize("length_norm", [False, True])
def test_closed_form_llr_matches_scipy(gauss_model, length_norm):
    g = gauss_model
    plda = PLDA().fit(g["X"], g["labels"], length_norm=length_norm)
    rng = np.random.default_rng(5)
    a = g["X"][rng.integers(0, len(g["X"]), 40)]
    b = g["X"][rng.integers(0, len(g["X"]), 40)]
    b[:10] = a[:10] + rng.normal(0, 0.1, (10, 6))  # some near-identical pairs: large positive LLR
    fast = plda.score(a, b)
    ya, yb = plda.transform(a), plda.transform(b)
    ref = np.array([direct_llr(ya[i], yb[i], plda.mu, plda.between, plda.within) for i in range(40)])
    np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
    if length_norm:
        np.testing.assert_allclose(np.linalg.norm(ya, axis=1), np.sqrt(6))
    # chunking, score_matrix, score_pairs and symmetry agree with the pairwise form
    np.testing.assert_allclose(plda.score(a, b, chunk=7), fast, rtol=1e-12)
    M = plda.score_matrix(a[:5], b[:8])
    full = plda.score(np.repeat(a[:5], 8, axis=0), np.tile(b[:8], (5, 1))).reshape(5, 8)
    np.testing.assert_allclose(M, full, rtol=1e-10, atol=1e-10)
    emb = np.vstack([a, b])
    np.testing.assert_allclose(plda.score_pairs(emb, np.arange(40), np.arange(40, 80), chunk=9), fast, rtol=1e-12)
    np.testing.assert_allclose(plda.score(b, a), fast, rtol=1e-10)


def test_score_rejects_wrong_dimension(gauss_model):
    plda = PLDA().fit(gauss_model["X"], gauss_model["labels"])
    with pytest.raises(BackendError, match="dimension 5 but the back-end was trained on dimension 6"):
        plda.score(np.zeros((2, 5)), np.zeros((2, 5)))


# 3. Calibration ----------------------------------------------------------------------------------

def true_llr(x, mu0, mu1, s):
    return ((mu1 - mu0) * x - 0.5 * (mu1 ** 2 - mu0 ** 2)) / s ** 2


@pytest.mark.parametrize("n_tar,n_non", [(20000, 20000), (2000, 40000), (40000, 2000)])
def test_calibrator_recovers_true_llr(n_tar, n_non):
    rng = np.random.default_rng(11)
    mu0, mu1, s = 0.0, 2.0, 1.0
    x = np.concatenate([rng.normal(mu1, s, n_tar), rng.normal(mu0, s, n_non)])
    y = np.concatenate([np.ones(n_tar, int), np.zeros(n_non, int)])
    raw = 0.37 * x - 5.0  # an uncalibrated system: arbitrary scale and offset
    cal = ScoreCalibrator().fit(raw, y)
    grid = np.linspace(mu0 - 2 * s, mu1 + 2 * s, 50)
    err = np.abs(cal.transform(0.37 * grid - 5.0) - true_llr(grid, mu0, mu1, s))
    assert err.max() < 0.15, err.max()
    assert abs(cal.a * 0.37 - 2.0) < 0.08
    # without the prior correction the offset would be wrong by log(n_tar / n_non)
    if n_tar != n_non:
        assert abs(np.log(n_tar / n_non)) > 2.5
    # the fitted LLR does not depend on the prior the regression was weighted to
    cal01 = ScoreCalibrator().fit(raw, y, prior=0.1)
    np.testing.assert_allclose(cal01.transform(0.37 * grid - 5.0), cal.transform(0.37 * grid - 5.0), atol=0.2)


def test_bayes_threshold_and_actual_dcf():
    assert metrics.bayes_threshold(0.5) == 0.0
    assert metrics.bayes_threshold(0.01) == pytest.approx(np.log(99))
    assert metrics.bayes_threshold(0.5, c_miss=10, c_fa=1) == pytest.approx(-np.log(10))
    with pytest.raises(metrics.MetricError):
        metrics.bayes_threshold(1.0)
    # calibrated LLRs thresholded at the Bayes threshold reach (nearly) the minimum DCF
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(2.0, 1.0, 30000), rng.normal(0.0, 1.0, 30000)])
    y = np.concatenate([np.ones(30000, int), np.zeros(30000, int)])
    llr = ScoreCalibrator().fit(3.0 * x + 1.0, y).transform(3.0 * x + 1.0)
    for p in (0.5, 0.1):
        act = metrics.actual_dcf(llr, y, metrics.bayes_threshold(p), p_target=p)
        mn, _ = metrics.min_dcf(llr, y, p_target=p)
        assert act - mn < 0.02


def test_calibrator_errors_and_state():
    with pytest.raises(BackendError, match="target and non-target"):
        ScoreCalibrator().fit([1.0, 2.0], [1, 1])
    with pytest.raises(BackendError, match="prior"):
        ScoreCalibrator().fit([1.0, 2.0], [1, 0], prior=0.0)
    # perfectly separable data: finite, steep, monotone
    cal = ScoreCalibrator().fit([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    assert np.isfinite(cal.a) and cal.a > 0 and np.isfinite(cal.b)
    back = ScoreCalibrator.from_state({k: np.asarray(v) for k, v in cal.state().items()})
    np.testing.assert_array_equal(back.transform([0.3, 1.7]), cal.transform([0.3, 1.7]))


# 4. Back-end files -------------------------------------------------------------------------------

def test_backend_file_round_trip_and_fingerprint(tmp_path, gauss_model):
    g = gauss_model
    ckpt_a, ckpt_b = tmp_path / "a.pth", tmp_path / "b.pth"
    ckpt_a.write_bytes(os.urandom(3 << 20))
    ckpt_b.write_bytes(ckpt_a.read_bytes()[:-1] + b"\x00")
    fa, fb = checkpoint_fingerprint(ckpt_a), checkpoint_fingerprint(ckpt_b)
    assert fa != fb and len(fa) == 40
    shutil.copy(ckpt_a, tmp_path / "copy.pth")  # new name and mtime, same content
    assert checkpoint_fingerprint(tmp_path / "copy.pth") == fa

    plda = PLDA().fit(g["X"], g["labels"], lda_dim=4, length_norm=True)
    cal = ScoreCalibrator(a=1.3, b=-0.4)
    path = tmp_path / "run" / "backend.npz"
    save_backend(path, plda, cal, fa, {"lda_dim": 4, "note": "x"})
    assert not [p for p in path.parent.iterdir() if p.name != "backend.npz"]  # no temp files left
    with np.load(path, allow_pickle=False) as z:
        assert "meta" in z.files and "plda.V" in z.files
    assert read_backend_meta(path)["fingerprint"] == fa

    p2, c2, extra = load_backend(path, fa)
    assert extra == {"lda_dim": 4, "note": "x"}
    xa, xb = g["X"][:300], g["X"][300:600]
    np.testing.assert_array_equal(p2.score(xa, xb), plda.score(xa, xb))
    np.testing.assert_array_equal(c2.transform([1.0, 2.0]), cal.transform([1.0, 2.0]))
    assert p2.length_norm and p2.lda_dim == 4

    with pytest.raises(BackendError) as e:
        load_backend(path, fb)
    msg = str(e.value)
    assert fa in msg and fb in msg and "--retrain_backend" in msg and "\n" not in msg

    # partial back-ends, missing and damaged files
    save_backend(path, None, cal, fa, {})
    p3, c3, _ = load_backend(path, None)
    assert p3 is None and c3.a == 1.3
    with pytest.raises(BackendError, match="not found"):
        load_backend(tmp_path / "nope.npz", fa)
    path.write_bytes(b"garbage")
    with pytest.raises(BackendError, match="not a readable back-end file"):
        load_backend(path, fa)


def test_save_backend_failure_keeps_old_file(tmp_path):
    path = tmp_path / "backend.npz"
    save_backend(path, None, ScoreCalibrator(a=2.0), "f1", {})
    with pytest.raises(BackendError, match="JSON"):
        save_backend(path, None, ScoreCalibrator(a=3.0), "f1", {"bad": object()})
    assert load_backend(path, "f1")[1].a == 2.0


# 5. LDA path ------------------------------------------------------------------------------------

def test_lda_path_separates_speakers():
    rng = np.random.default_rng(4)
    d, k = 20, 5
    # speaker information in a 5-dim subspace, nuisance everywhere
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, :k]
    B = basis @ random_spd(rng, k, 4.0, 3.0) @ basis.T + 1e-3 * np.eye(d)
    W = random_spd(rng, d, 0.5, 4.0)
    X, labels = simulate(rng, B, W, 150, 10)
    for length_norm in (False, True):
        plda = PLDA().fit(X, labels, lda_dim=k, length_norm=length_norm)
        assert plda.dim == k and plda.input_dim == d and plda.lda_dim == k
        xa, xb, tgt = eval_trials(np.random.default_rng(9), B, W, np.zeros(d), n_spk=150)
        llr = plda.score(xa, xb)
        assert metrics.compute_eer(llr, tgt)[0] < 0.15
        back = PLDA.from_state(plda.state())
        np.testing.assert_array_equal(back.score(xa, xb), llr)
    with pytest.raises(BackendError, match="lda_dim=21 is out of range"):
        PLDA().fit(X, labels, lda_dim=21)


# Speaker split and trial sampling ---------------------------------------------------------------

def test_split_calibration_speakers():
    spk = [f"s{i:03d}" for i in range(50)]
    fit, held = split_calibration_speakers(spk, 0.2, seed=0)
    assert len(held) == 10 and len(fit) == 40
    assert set(fit).isdisjoint(held) and set(fit) | set(held) == set(spk)
    assert split_calibration_speakers(list(reversed(spk)) * 3, 0.2, 0) == (fit, held)
    assert split_calibration_speakers(spk, 0.2, seed=1) != (fit, held)
    with pytest.raises(BackendError, match="too few"):
        split_calibration_speakers(["a", "b", "c"], 0.2)


@pytest.mark.parametrize("n_spk,n_utt,max_trials", [(30, 8, 1000), (3, 2, 1000), (200, 50, 20000)])
def test_make_trials_from_labels(n_spk, n_utt, max_trials):
    labels = np.repeat(np.arange(n_spk), n_utt).astype(str)
    labels = np.random.default_rng(0).permutation(labels)
    ia, ib, tgt = make_trials_from_labels(labels, max_trials=max_trials, seed=1)
    assert ia.shape == ib.shape == tgt.shape and ia.size <= max_trials
    assert tgt.sum() * 2 == tgt.size  # balanced
    assert np.all(ia < ib)
    assert np.all((labels[ia] == labels[ib]) == (tgt == 1))
    assert len({(a, b) for a, b in zip(ia, ib)}) == ia.size  # no repeated pair
    again = make_trials_from_labels(labels, max_trials=max_trials, seed=1)
    for x, y in zip((ia, ib, tgt), again):
        np.testing.assert_array_equal(x, y)
    if n_spk == 3:  # 3 same-speaker pairs available: all used
        assert tgt.sum() == 3


def fit_backend(embeddings, speakers: Sequence, lda_dim: int | None = None, length_norm: bool = True,
                calibration_fraction: float = 0.2, max_trials: int = 100_000, prior: float = 0.5,
                seed: int = 0) -> tuple[PLDA, ScoreCalibrator, dict]:
    """PLDA on most training speakers, calibrated on the held-out rest, in one call (``(plda, calibrator,
    info)``; ``info["calibration_eer"]``: EER of the PLDA scores on the held-out trials)."""
    spk = np.array([str(s) for s in speakers])
    fit_spk, held_spk = split_calibration_speakers(list(spk), calibration_fraction, seed)
    is_held = np.isin(spk, held_spk)
    X = np.asarray(embeddings, dtype=np.float64)
    plda = PLDA().fit(X[~is_held], spk[~is_held], lda_dim=lda_dim, length_norm=length_norm)
    ia, ib, tgt = make_trials_from_labels(spk[is_held], max_trials=max_trials, seed=seed)
    raw = plda.score_pairs(X[is_held], ia, ib)
    cal = ScoreCalibrator().fit(raw, tgt, prior=prior)
    info = {"fit_speakers": len(fit_spk), "held_out_speakers": len(held_spk), "calibration_trials": int(tgt.size),
            "calibration_eer": metrics.compute_eer(raw, tgt)[0]}
    return plda, cal, info


def test_fit_backend_end_to_end(gauss_model):
    g = gauss_model
    plda, cal, info = fit_backend(g["X"], g["labels"], lda_dim=None, length_norm=True,
                                  calibration_fraction=0.2, max_trials=4000, seed=0)
    assert info["held_out_speakers"] == 60 and info["fit_speakers"] == 240
    assert info["calibration_trials"] == 4000 and info["calibration_eer"] < 0.15
    xa, xb, tgt = eval_trials(np.random.default_rng(8), g["B"], g["W"], g["mean"])
    llr = cal.transform(plda.score(xa, xb))
    # calibrated: the Bayes decision at p=0.5 is close to the best threshold
    act = metrics.actual_dcf(llr, tgt, metrics.bayes_threshold(0.5), p_target=0.5)
    assert act - metrics.min_dcf(llr, tgt, p_target=0.5)[0] < 0.05

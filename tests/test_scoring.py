"""Trial scoring at scale (svlab.scoring): chunked cosine scores, AS-norm, speaker means; EER.cosine_score
(lab step 3.1) against it; the training data a back-end is fitted on (svlab.scoring_system)."""
from __future__ import annotations

import time

import numpy as np
import pytest

import EER
from scoring_reference import naive_asnorm
from svlab import backend, config, metrics, scoring
from svlab.scoring_system import training_data_section


def _silent(*args, **kwargs) -> None:
    pass


# ==================================================================================================
# svlab.scoring: scale, AS-norm
# ==================================================================================================
def test_million_trials_over_ten_thousand_embeddings_fast_and_exact():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((10_000, 192)).astype(np.float32)
    a = rng.integers(0, 10_000, 1_000_000)
    b = rng.integers(0, 10_000, 1_000_000)
    t0 = time.perf_counter()
    s = scoring.cosine_scores(emb, a, b)
    t_score = time.perf_counter() - t0
    lab = (rng.random(s.size) < 0.05).astype(int)
    t0 = time.perf_counter()
    summ = metrics.summary(s, lab)
    t_metrics = time.perf_counter() - t0
    print(f"\n1,000,000 cosine trials over 10,000 x 192 embeddings: scoring {t_score:.2f}s, "
          f"EER/minDCF {t_metrics:.2f}s")
    assert s.shape == (1_000_000,) and s.dtype == np.float32
    assert t_score < 60 and t_metrics < 60          # seconds, even on a busy 2-core machine
    assert 0.4 < summ["eer"] < 0.6                  # random embeddings: chance level
    sub = rng.choice(s.size, 2000, replace=False)
    ea, eb = emb[a[sub]].astype(np.float64), emb[b[sub]].astype(np.float64)
    naive = np.sum(ea * eb, axis=1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    np.testing.assert_allclose(s[sub], naive, atol=1e-5)
    # chunking never changes a result
    np.testing.assert_array_equal(scoring.cosine_scores(emb, a[:5000], b[:5000], chunk=77), s[:5000])


@pytest.mark.parametrize("top_n", [3, 100])
def test_asnorm_matches_naive_loops(top_n):
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((30, 12)).astype(np.float32)
    cohort = rng.standard_normal((9, 12)).astype(np.float32)      # 100 > 9: whole cohort
    a, b = rng.integers(0, 30, 50), rng.integers(0, 30, 50)
    raw = scoring.cosine_scores(emb, a, b)
    mu, sd = scoring.cohort_stats(emb, cohort, top_n, chunk=20)   # several blocks
    fast = scoring.asnorm(raw, a, b, mu, sd)
    np.testing.assert_allclose(fast, naive_asnorm(emb, cohort, a, b, top_n), rtol=1e-4, atol=1e-4)


def test_asnorm_with_plda_scorer_matches_naive():
    rng = np.random.default_rng(2)
    spk = np.repeat(np.arange(10), 6)
    x = (rng.standard_normal((10, 8))[spk] + 0.5 * rng.standard_normal((60, 8))).astype(np.float32)
    plda = backend.PLDA().fit(x, spk)
    sc = scoring.PLDAScorer(plda)
    emb, cohort = x[:20], x[20:]
    a, b = rng.integers(0, 20, 15), rng.integers(0, 20, 15)
    mu, sd = scoring.cohort_stats(emb, cohort, 5, scorer=sc, chunk=50)
    fast = scoring.asnorm(sc.pairs(emb, a, b), a, b, mu, sd)

    def score(p, q):
        return float(plda.score(p[None], q[None])[0])
    np.testing.assert_allclose(fast, naive_asnorm(emb, cohort, a, b, 5, score), rtol=1e-4, atol=1e-4)


def test_speaker_means():
    emb = np.array([[3, 0], [0, 2], [1, 1], [5, 5]], dtype=np.float32)
    means, names = scoring.speaker_means(emb, ["b", "a", "b", "a"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(means[1], (np.array([1, 0]) + np.array([1, 1]) / np.sqrt(2)) / 2, rtol=1e-6)
    raw, _ = scoring.speaker_means(emb, ["b", "a", "b", "a"], normalize=False)
    np.testing.assert_allclose(raw[0], [2.5, 3.5])


def test_training_data_section_prefers_checkpoint_unless_overridden(tmp_path):
    manifest = tmp_path / "train.txt"
    manifest.write_text("S1 a.wav\n")
    shipped = config.load_config()
    state = {"config": {"data": {"root": str(tmp_path), "train_manifest": str(manifest), "bad_audio": "error"}}}
    assert training_data_section(shipped, state, _silent)["train_manifest"] == str(manifest)
    user = config.load_config(None, {"data.root": "/somewhere/else"})
    assert training_data_section(user, state, _silent)["root"] == "/somewhere/else"


def test_lab_cosine_score_equals_chunked_cosine_scores():
    rng = np.random.default_rng(11)
    emb = rng.standard_normal((500, 64)).astype(np.float32)
    a, b = rng.integers(0, 500, 20_000), rng.integers(0, 500, 20_000)
    expected = scoring.cosine_scores(emb, a, b)
    got = EER.cosine_score(emb[a], emb[b])
    assert got.dtype == np.float32 and got.shape == (20_000,)
    np.testing.assert_array_equal(got, expected)
    # in the chunks EER.evaluate passes, including a last short one
    chunks = [EER.cosine_score(emb[a[s:s + 4096]], emb[b[s:s + 4096]]) for s in range(0, a.size, 4096)]
    np.testing.assert_array_equal(np.concatenate(chunks), expected)
    np.testing.assert_array_equal(EER.cosine_score(emb[a[:1]], emb[b[:1]]), expected[:1])

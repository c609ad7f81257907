"""Evaluation a researcher can trust: metrics against independent computations, DET/histogram plots,
AS-norm, PLDA + calibration in EER.py, embeddings export (EER.py / extract.py), verify.py, report.py.

One tiny run (8 training speakers, 1 epoch of a 32-channel x-vector) is trained once for the module.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import config  # noqa: E402
import demo_corpus  # noqa: E402
import EER  # noqa: E402
import extract  # noqa: E402
import metrics  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402
import scoring  # noqa: E402
import verify  # noqa: E402

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAB_LINE = re.compile(r"^Epoch=(\d+|-) EER= \d+\.\d\d Thres= -?\d+\.\d{5}$")


def _silent(*args, **kwargs) -> None:
    pass


# ==================================================================================================
# Fixture: tiny corpus + tiny trained run (once per module)
# ==================================================================================================
@pytest.fixture(scope="module")
def evrun(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluation_run")
    params = dict(n_train_speakers=8, n_test_speakers=4, utts_per_speaker=4, min_seconds=1.0, max_seconds=1.5)
    if "test_utts_per_speaker" in demo_corpus.DEFAULTS:
        params["test_utts_per_speaker"] = 4
    demo_corpus.generate(base / "corpus", params=params, files_dir=base / "files", workers=1, log=_silent)
    overrides = {
        "data.root": str(base / "corpus"), "data.train_manifest": str(base / "files" / "split_train_set.txt"),
        "test.root": str(base / "corpus"), "test.test_manifest": str(base / "files" / "test_set.txt"),
        "test.trials": str(base / "files" / "trials.txt"),
        "train.save_dir": str(base / "runs"), "train.n_folder": "001", "features.cache_dir": str(base / "cache"),
        "model.channels": 32, "model.embedding_size": 16, "features.n_mfcc": 20, "train.epochs": 1,
        "train.batchsize": 8, "train.crop_frames": 50,
        "test.model_path": str(base / "runs" / "001" / "checkpoint_001.pth"),
    }
    cfg = config.load_config(None, overrides)
    import train
    train.train(cfg, log=_silent)
    nested: dict = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    cfg_file = base / "eval_config.yaml"
    cfg_file.write_text(yaml.safe_dump(nested), encoding="utf-8")
    run_dir = base / "runs" / "001"
    return dict(base=base, cfg=cfg, cfg_file=cfg_file, run_dir=run_dir, ckpt=run_dir / "checkpoint_001.pth",
                corpus=base / "corpus", files=base / "files")


def _eer_main(evrun, *args) -> int:
    return EER.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["ckpt"]), *args])


def _read_scores(path: Path) -> dict:
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        a, b, s = line.split()
        out[(a, b)] = float(s)
    return out


def _read_trials(path: Path) -> list[tuple[str, str, int]]:
    return [(a, b, int(lab)) for a, b, lab in (ln.split() for ln in Path(path).read_text().splitlines() if ln.strip())]


def _is_png(path: Path) -> bool:
    return Path(path).is_file() and Path(path).read_bytes()[:8] == PNG_MAGIC and Path(path).stat().st_size > 2000


# ==================================================================================================
# 1. metrics.py against independent computations
# ==================================================================================================
def _brute_rates(scores, labels):
    """(thresholds, far, frr) at +inf and every distinct score, by direct counting."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    thresholds = [np.inf] + sorted(set(scores.tolist()), reverse=True)
    far, frr = [], []
    for t in thresholds:
        acc = scores >= t
        far.append(np.sum(acc & (labels == 0)) / np.sum(labels == 0))
        frr.append(np.sum(~acc & (labels == 1)) / np.sum(labels == 1))
    return np.array(thresholds), np.array(far), np.array(frr)


def _brute_eer(scores, labels) -> float:
    """Intersection of the (FAR, FRR) polyline with FAR = FRR, walking the segments."""
    _, far, frr = _brute_rates(scores, labels)
    for i in range(1, len(far)):
        d0, d1 = frr[i - 1] - far[i - 1], frr[i] - far[i]
        if d0 > 0 >= d1:
            t = d0 / (d0 - d1)
            return far[i - 1] + t * (far[i] - far[i - 1])
    raise AssertionError("no crossing")


def _sklearn_brentq_eer(scores, labels) -> float:
    """The classic recipe: root of 1 - x - TPR(x) on sklearn's ROC, linearly interpolated."""
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    return brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-12)


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
    assert eer == pytest.approx(_brute_eer(scores, labels), abs=1e-9)
    assert eer == pytest.approx(_sklearn_brentq_eer(scores, labels), abs=1e-6)
    # Bounds that hold for any definition between the two step curves.
    _, far, frr = _brute_rates(scores, labels)
    assert np.max(np.minimum(far, frr)) - 1e-12 <= eer <= np.min(np.maximum(far, frr)) + 1e-12
    # The threshold is an operating point on the right side of the crossing.
    far_t, frr_t = metrics.error_rates_at(scores, labels, thr)
    assert min(far_t, frr_t) - 1e-12 <= eer <= max(far_t, frr_t) + 1e-12


@pytest.mark.parametrize("name,scores,labels", _datasets(), ids=[d[0] for d in _datasets()])
@pytest.mark.parametrize("p_target", [0.5, 0.01, 0.001])
def test_min_dcf_matches_bruteforce_sweep(name, scores, labels, p_target):
    thresholds, far, frr = _brute_rates(scores, labels)
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
    assert metrics.compute_eer(s, lab)[0] == pytest.approx(_brute_eer(s, lab))
    assert metrics.compute_eer(s, lab)[0] == pytest.approx(_sklearn_brentq_eer(s, lab), abs=1e-6)


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
# 3 + 7. scoring: scale, AS-norm
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


def _naive_asnorm(emb, cohort, a, b, top_n, score=None):
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


@pytest.mark.parametrize("top_n", [3, 100])
def test_asnorm_matches_naive_loops(top_n):
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((30, 12)).astype(np.float32)
    cohort = rng.standard_normal((9, 12)).astype(np.float32)      # 100 > 9: whole cohort
    a, b = rng.integers(0, 30, 50), rng.integers(0, 30, 50)
    raw = scoring.cosine_scores(emb, a, b)
    mu, sd = scoring.cohort_stats(emb, cohort, top_n, chunk=20)   # several blocks
    fast = scoring.asnorm(raw, a, b, mu, sd)
    np.testing.assert_allclose(fast, _naive_asnorm(emb, cohort, a, b, top_n), rtol=1e-4, atol=1e-4)


def test_asnorm_with_plda_scorer_matches_naive():
    backend = pytest.importorskip("backend")
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
    np.testing.assert_allclose(fast, _naive_asnorm(emb, cohort, a, b, 5, score), rtol=1e-4, atol=1e-4)


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
    assert EER.training_data_section(shipped, state, _silent)["train_manifest"] == str(manifest)
    user = config.load_config(None, {"data.root": "/somewhere/else"})
    assert EER.training_data_section(user, state, _silent)["root"] == "/somewhere/else"


# ==================================================================================================
# EER.py end to end
# ==================================================================================================
def test_eer_default_outputs_lab_line_and_index(evrun):
    lines = []
    res = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=lines.append)
    out = evrun["run_dir"] / "eval_001"
    assert Path(res["out_dir"]) == out
    assert any(LAB_LINE.match(ln) for ln in lines), lines
    m = json.loads((out / "metrics.json").read_text())
    for key in ("eer", "threshold", "n_target", "n_nontarget", "checkpoint", "min_dcf_0.01",
                "min_dcf_0.01_threshold", "min_dcf_0.001", "min_dcf_0.001_threshold"):
        assert key in m, key
    assert m["checkpoint"] == str(evrun["ckpt"]) and m["backend"] == "cosine"
    for name in ("roc.png", "det.png", "hist.png"):
        assert _is_png(out / name), name
    # metrics.json agrees with an independent recomputation from scores.txt + the trial list
    scores = _read_scores(out / "scores.txt")
    trials = _read_trials(evrun["files"] / "trials.txt")
    s = np.array([scores[(a, b)] for a, b, _ in trials])
    lab = np.array([t[2] for t in trials])
    assert m["eer"] == pytest.approx(_brute_eer(s, lab), abs=2e-6)
    assert (m["n_target"], m["n_nontarget"]) == (int(lab.sum()), int((lab == 0).sum()))
    index = json.loads((evrun["run_dir"] / "evaluations.json").read_text())
    assert index["checkpoint_001.pth"][-1]["metrics"] == "eval_001/metrics.json"
    # still callable with the original positional signature (baseline too)
    base = EER.evaluate(evrun["cfg"], None, evrun["base"] / "baseline_out", None, _silent, True)
    assert (evrun["base"] / "baseline_out" / "det.png").is_file() and base["epoch"] is None


def test_save_embeddings_and_extract_agree(evrun, tmp_path):
    out = tmp_path / "ev"
    assert _eer_main(evrun, "--out", str(out), "--save_embeddings") == 0
    emb = np.load(out / "embeddings.npy")
    rows = (out / "embeddings_index.txt").read_text(encoding="utf-8").splitlines()
    assert emb.dtype == np.float32 and emb.shape == (len(rows), 16) and len(set(rows)) == len(rows)
    # scores.txt are the cosines of these embeddings
    scores = _read_scores(out / "scores.txt")
    idx = {r: i for i, r in enumerate(rows)}
    (a, b), s = next(iter(scores.items()))
    ea, eb = emb[idx[a]], emb[idx[b]]
    assert s == pytest.approx(float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb)), abs=1e-5)
    # extract.py: relative (to --root) and absolute entries, plus a stereo 44.1 kHz copy
    wav, sr = sf.read(evrun["corpus"] / rows[0], dtype="float32")
    import librosa
    stereo = np.stack([librosa.resample(wav, orig_sr=sr, target_sr=44100)] * 2, axis=1)
    sf.write(tmp_path / "stereo44k.wav", stereo, 44100)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{rows[0]}\n{evrun['corpus'] / rows[1]}\n\n{tmp_path / 'stereo44k.wav'}\n")
    assert extract.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["ckpt"]), "--list", str(lst),
                         "--root", str(evrun["corpus"]), "--out", str(tmp_path / "x" / "emb.npy")]) == 0
    got = np.load(tmp_path / "x" / "emb.npy")
    names = (tmp_path / "x" / "emb_index.txt").read_text().splitlines()
    assert got.dtype == np.float32 and got.shape == (3, 16) and names[0] == rows[0]
    np.testing.assert_allclose(got[0], emb[0], atol=1e-5)
    np.testing.assert_allclose(got[1], emb[1], atol=1e-5)
    cos = float(got[2] @ got[0] / np.linalg.norm(got[2]) / np.linalg.norm(got[0]))
    assert np.all(np.isfinite(got[2])) and cos > 0.8, cos
    # errors: missing list, missing audio
    assert extract.main(["--checkpoint", str(evrun["ckpt"]), "--list", str(tmp_path / "nope.txt"),
                         "--out", str(tmp_path / "e.npy")]) == 2
    (tmp_path / "bad.txt").write_text("missing.wav\n")
    assert extract.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["ckpt"]),
                         "--list", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "e.npy")]) == 2


def test_asnorm_in_eer_matches_manual_normalisation(evrun, tmp_path):
    out = tmp_path / "asn"
    assert _eer_main(evrun, "--out", str(out), "--score_norm", "asnorm", "--asnorm_top_n", "3",
                     "--save_embeddings") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["backend"], m["score_norm"], m["asnorm_top_n"]) == ("cosine+asnorm", "asnorm", 3)
    with np.load(out / "cohort.npz") as z:
        cohort = z["cohort"]
        meta = json.loads(str(z["meta"]))
    assert cohort.shape == (8, 16) and len(meta["speakers"]) == 8       # one mean per training speaker
    emb = np.load(out / "embeddings.npy")
    rows = (out / "embeddings_index.txt").read_text().splitlines()
    idx = {r: i for i, r in enumerate(rows)}
    scores = _read_scores(out / "scores.txt")
    pairs = list(scores)[:25]
    a = [idx[p[0]] for p in pairs]
    b = [idx[p[1]] for p in pairs]
    np.testing.assert_allclose([scores[p] for p in pairs], _naive_asnorm(emb, cohort, a, b, 3), rtol=1e-3, atol=1e-3)
    # the cohort really is the training speakers' mean (length-normalised) embeddings
    state = torch.load(evrun["ckpt"], weights_only=True)
    assert meta["speakers"] == state["speakers"]


def test_plda_calibration_backend_reuse_and_retrain(evrun, tmp_path):
    pytest.importorskip("backend")
    out = tmp_path / "plda"
    logs: list[str] = []
    res = EER.evaluate(evrun["cfg"], evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True)
    assert (out / "backend.npz").is_file() and not any("reusing" in ln for ln in logs)
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "plda+calibrated" and m["calibrated"] is True
    info = m["backend_info"]
    assert info["fit_speakers"] + info["held_out_speakers"] == 8 and info["held_out_speakers"] >= 2
    assert m["bayes_llr_threshold_0.01"] == pytest.approx(np.log(99))
    # actual DCF and Cllr recomputed from the written LLRs
    llr = _read_scores(out / "scores_llr.txt")
    trials = _read_trials(evrun["files"] / "trials.txt")
    x = np.array([llr[(a, b)] for a, b, _ in trials])
    lab = np.array([t[2] for t in trials])
    far = np.mean(x[lab == 0] >= np.log(99))
    frr = np.mean(x[lab == 1] < np.log(99))
    assert m["actual_dcf_0.01"] == pytest.approx((0.01 * frr + 0.99 * far) / 0.01, abs=1e-3)
    assert m["cllr"] == pytest.approx(metrics.cllr(x, lab), abs=1e-3)
    assert m["min_dcf_0.01"] <= m["actual_dcf_0.01"] + 1e-9
    # scores.txt are PLDA LLRs of the fit-speaker PLDA saved in backend.npz
    import backend
    plda, cal, _ = backend.load_backend(out / "backend.npz", None)
    assert plda is not None and cal is not None
    # second run reuses, --retrain_backend refits; results identical (deterministic)
    logs.clear()
    res2 = EER.evaluate(evrun["cfg"], evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True)
    assert any("reusing" in ln for ln in logs) and res2["eer"] == pytest.approx(res["eer"])
    logs.clear()
    res3 = EER.evaluate(evrun["cfg"], evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True,
                        retrain_backend=True)
    assert not any("reusing" in ln for ln in logs) and res3["eer"] == pytest.approx(res["eer"])
    # a back-end saved with other settings is not reused
    logs.clear()
    cfg_lda = config.load_config(evrun["cfg_file"], {"test.plda_lda_dim": 4})
    EER.evaluate(cfg_lda, evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True)
    assert any("other settings" in ln for ln in logs)
    # default folder name of the system
    r = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent, backend="plda", center=True, score_norm="asnorm")
    assert Path(r["out_dir"]).name == "eval_001_plda_center_asnorm"
    assert json.loads((Path(r["out_dir"]) / "metrics.json").read_text())["center"] is True


def test_eer_main_user_errors(evrun, capsys):
    assert _eer_main(evrun, "--set", "test.backend=lda") == 2
    assert "error:" in capsys.readouterr().err
    assert EER.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["base"] / "no.pth")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    assert _eer_main(evrun, "--set", "test.asnorm_top_n=0", "--score_norm", "asnorm") == 2
    assert "asnorm_top_n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _eer_main(evrun, "--backend", "svm")
    assert e.value.code == 2


# ==================================================================================================
# verify.py
# ==================================================================================================
def _verify(evrun, *args) -> int:
    return verify.main(["--config", str(evrun["cfg_file"]), *args])


def test_verify_needs_an_evaluation_or_threshold(evrun, tmp_path, capsys):
    lonely = tmp_path / "lonely" / "checkpoint_001.pth"
    lonely.parent.mkdir()
    shutil.copyfile(evrun["ckpt"], lonely)
    wav = evrun["corpus"] / "S0009" / "S0009W0001.wav"
    assert _verify(evrun, str(wav), str(wav), "--checkpoint", str(lonely)) == 2
    err = capsys.readouterr().err
    assert "error: no evaluation of" in err and "--threshold" in err and "EER.py" in err
    assert _verify(evrun, str(wav), str(wav), "--checkpoint", str(lonely), "--threshold", "0.5") == 0
    out = capsys.readouterr().out
    assert "cosine score: 1.00000" in out and "ACCEPT" in out
    assert _verify(evrun, str(wav), str(wav), "--checkpoint", str(lonely), "--threshold", "1.5") == 0
    assert "REJECT" in capsys.readouterr().out
    assert _verify(evrun, str(wav), "--checkpoint", str(lonely)) == 2             # one file only
    assert _verify(evrun, str(wav), str(evrun["base"] / "missing.wav"), "--checkpoint", str(lonely),
                   "--threshold", "0") == 2
    assert "not found" in capsys.readouterr().err


def test_verify_uses_last_evaluation_even_with_out(evrun, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    assert _eer_main(evrun, "--out", str(elsewhere)) == 0
    m = json.loads((elsewhere / "metrics.json").read_text())
    capsys.readouterr()
    a = evrun["corpus"] / "S0009" / "S0009W0001.wav"
    b = evrun["corpus"] / "S0010" / "S0010W0002.wav"
    res = verify.verify(evrun["cfg"], evrun["ckpt"], [a], [b], out=_silent)
    assert res["threshold"] == pytest.approx(m["threshold"]) and res["metrics"] == str(elsewhere / "metrics.json")
    assert res["accept"] == (res["score"] >= m["threshold"]) and res["system"] == "cosine"
    # the final-name copy of the checkpoint finds the same evaluation (same file fingerprint)
    final = evrun["run_dir"] / "xvector_gap_softmax_checkpoint.pth"
    assert verify.verify(evrun["cfg"], final, [a], [b], out=_silent)["metrics"] == str(elsewhere / "metrics.json")
    # enrolment with several recordings: mean of the length-normalised embeddings
    c = evrun["corpus"] / "S0009" / "S0009W0002.wav"
    res2 = verify.verify(evrun["cfg"], evrun["ckpt"], [a, c], [b], out=_silent)
    state = torch.load(evrun["ckpt"], weights_only=True)
    from speaker_model import model_from_checkpoint
    feat = extract.checkpoint_features(evrun["cfg"], state, _silent, cache=False)
    e, _, _ = extract.embed_files(model_from_checkpoint(state), [a, c, b], feat, log=_silent)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    en = e[:2].mean(axis=0)
    assert res2["score"] == pytest.approx(float(en @ e[2] / np.linalg.norm(en)), abs=1e-5)
    # any sample rate, stereo: an 8 kHz stereo copy of a is accepted as itself
    wav, sr = sf.read(a, dtype="float32")
    import librosa
    low = librosa.resample(wav, orig_sr=sr, target_sr=8000)
    sf.write(tmp_path / "a8k.wav", np.stack([low, low], axis=1), 8000)
    assert _verify(evrun, str(a), str(tmp_path / "a8k.wav"), "--checkpoint", str(evrun["ckpt"])) == 0
    assert re.search(r"cosine score: 0\.\d+", capsys.readouterr().out)
    # CLI enrol/test form
    assert _verify(evrun, "--enroll", str(a), str(c), "--test", str(b), "--checkpoint", str(evrun["ckpt"])) == 0
    out = capsys.readouterr().out
    assert "threshold:" in out and ("ACCEPT" in out or "REJECT" in out)


def test_verify_prints_calibrated_llr(evrun, tmp_path, capsys):
    pytest.importorskip("backend")
    cal_dir = tmp_path / "cal"
    assert _eer_main(evrun, "--out", str(cal_dir), "--calibrate") == 0
    m = json.loads((cal_dir / "metrics.json").read_text())
    capsys.readouterr()
    a = evrun["corpus"] / "S0009" / "S0009W0001.wav"
    b = evrun["corpus"] / "S0009" / "S0009W0003.wav"
    lines: list[str] = []
    res = verify.verify(evrun["cfg"], evrun["ckpt"], [a], [b], out=lines.append)
    assert res["llr"] == pytest.approx(m["calibration"]["a"] * res["cosine"] + m["calibration"]["b"], abs=1e-4)
    text = "\n".join(lines)
    assert "calibrated LLR" in text and "Bayes decision" in text and "4.60" in text
    assert res["bayes_decisions"][0.01] == (res["llr"] >= np.log(99))
    # the decision follows the last evaluation (cosine+calibrated): cosine score vs its EER threshold
    assert res["threshold"] == pytest.approx(m["threshold"])
    # a PLDA evaluation chosen with --eval: the decision uses the PLDA score and that threshold
    plda_dir = tmp_path / "plda"
    assert _eer_main(evrun, "--out", str(plda_dir), "--backend", "plda") == 0
    mp = json.loads((plda_dir / "metrics.json").read_text())
    res_p = verify.verify(evrun["cfg"], evrun["ckpt"], [a], [b], eval_dir=plda_dir, out=_silent)
    assert res_p["system"] == "plda" and res_p["threshold"] == pytest.approx(mp["threshold"])
    scores = _read_scores(plda_dir / "scores.txt")
    ra, rb = "S0009/S0009W0001.wav", "S0009/S0009W0003.wav"
    if (ra, rb) in scores:
        assert res_p["score"] == pytest.approx(scores[(ra, rb)], abs=1e-3)


# ==================================================================================================
# report.py
# ==================================================================================================
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_markdown_html_and_images(evrun, tmp_path):
    EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent)                  # eval_001
    res = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent, score_norm="asnorm", report=True)
    run = evrun["run_dir"]
    assert Path(res["report"]) == run / "report.html"
    assert report.main(["--run_dir", str(run)]) == 0
    md = (run / "report.md").read_text(encoding="utf-8")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "curves.png" in md and "| eval_001 |" in md and "eval_001_asnorm" in md
    assert "```yaml" in md and "embedding_size: 16" in md
    assert '<meta charset="utf-8">' in page and 'id="img-check"' in page
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert "curves.png" in srcs and "eval_001/det.png" in srcs and "eval_001_asnorm/hist.png" in srcs
    for src in srcs:
        assert not src.startswith("/") and (run / src).is_file(), src
    # the per-epoch log table and the evaluation row with the EER from metrics.json
    m = json.loads((run / "eval_001" / "metrics.json").read_text())
    assert f"{m['eer'] * 100:.2f}%" in page and "<th>loss</th>" in page
    # --n_folder form
    assert report.main(["--config", str(evrun["cfg_file"]), "--n_folder", "001"]) == 0
    assert report.main(["--config", str(evrun["cfg_file"]), "--n_folder", "999"]) == 2


def test_report_images_load_in_headless_chromium(evrun, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); report.html not opened in a browser")
    EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent)
    _, page = report.write_report(evrun["run_dir"], log=_silent)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<div id="img-check"[^>]*data-loaded="(\d+)"[^>]*data-total="(\d+)"', proc.stdout)
    assert m, f"no image check in the DOM (rc {proc.returncode}): {proc.stderr[-500:]}"
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total >= 4 and loaded == total, f"{loaded}/{total} images loaded"

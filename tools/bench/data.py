"""The data side: MFCC extraction (warm, with the worker pool, and cold in a fresh process),
embedding extraction, cosine scoring, and the cold time of train.py's first epoch."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.system import PROJECT, SUBPROCESS_TIMEOUT_S, quiet, run_bench_script, subprocess_env, sync, vm_hwm_mb
from dataset import SpkTestDataset
from svlab import models as speaker_model
from svlab.audio import load_audio
from svlab.embedding import embed_features
from svlab.feature_cache import extract_features
from svlab.features import equal_length_batches, feature_dim, mfcc
from svlab.scoring import cosine_scores

# The first mfcc(load_audio(...)) call in a fresh interpreter: imports, librosa's numba start-up and
# one utterance, then the same call again (the warm cost). Prints one "BENCH {json}" line.
MFCC_COLD_SCRIPT = """\
import json, time
t0 = time.perf_counter()
from svlab.audio import load_audio
from svlab.features import mfcc
t1 = time.perf_counter()
cfg = json.loads({cfg!r})
path = {path!r}
mfcc(load_audio(path, cfg['sample_rate']), cfg)
t2 = time.perf_counter()
mfcc(load_audio(path, cfg['sample_rate']), cfg)
t3 = time.perf_counter()
print('BENCH ' + json.dumps({{'import': t1 - t0, 'first': t2 - t1, 'second': t3 - t2}}))
"""


def measure_mfcc(bench) -> None:
    """Warm feature extraction of the whole corpus in one process, then with the worker pool that
    ``extract_features`` starts for 64 files or more."""
    import soundfile as sf
    feat_cfg = {**bench.cfg["features"], "cache_dir": ""}
    paths = bench.audio_paths(bench.corpus["train"]) + bench.audio_paths(bench.corpus["test"])
    audio_s = sum(sf.info(str(p)).duration for p in paths)
    mfcc(load_audio(paths[0], feat_cfg["sample_rate"]), feat_cfg)  # warm-up: librosa import, JIT
    rates, xrt = [], []
    for _ in range(bench.runs):
        t0 = time.perf_counter()
        feats, problems = extract_features(paths, feat_cfg, workers=1, desc="bench features")
        dt = time.perf_counter() - t0
        if problems:
            raise RuntimeError(f"feature extraction failed: {problems[:3]}")
        rates.append(len(paths) / dt)
        xrt.append(audio_s / dt)
    bench.record("mfcc_utts_per_s", rates)
    bench.record("mfcc_x_realtime", xrt)
    bench.result["mfcc_audio_seconds"] = round(audio_s, 3)
    bench.result["mfcc_utterances"] = len(paths)
    workers = min(os.cpu_count() or 1, 8)
    if len(paths) >= 64 and workers > 1:  # extract_features' own threshold for its process pool
        rates, xrt = [], []
        for _ in range(bench.runs):
            t0 = time.perf_counter()
            extract_features(paths, feat_cfg, desc="bench features")
            dt = time.perf_counter() - t0
            rates.append(len(paths) / dt)
            xrt.append(audio_s / dt)
        bench.record("mfcc_parallel_utts_per_s", rates)
        bench.record("mfcc_parallel_x_realtime", xrt)
        bench.result["mfcc_parallel_workers"] = workers
    else:
        bench.result["mfcc_parallel_utts_per_s"] = bench.result["mfcc_parallel_x_realtime"] = None


def measure_mfcc_cold(bench) -> None:
    """The first MFCC call in fresh processes (``MFCC_COLD_SCRIPT``); in full mode also once with an
    empty numba cache, as on the very first run after installing librosa."""
    path = bench.audio_paths(bench.corpus["train"])[0]
    feat_cfg = {k: v for k, v in bench.cfg["features"].items() if k != "cache_dir"}
    script = MFCC_COLD_SCRIPT.format(cfg=json.dumps(feat_cfg), path=str(path))
    first, second, proc = [], [], []
    for _ in range(bench.cold_runs):
        t0 = time.perf_counter()
        d = run_bench_script(script, subprocess_env(bench.threads), "MFCC cold-start")
        wall = time.perf_counter() - t0
        first.append(d["first"])
        second.append(d["second"])
        proc.append(wall)
    bench.record("mfcc_cold_seconds", first)
    bench.record("mfcc_cold_warm_call_seconds", second)
    bench.record("mfcc_cold_process_seconds", proc)
    if bench.quick:  # numba compiles every librosa kernel it uses: too slow for the smoke mode
        bench.result["mfcc_cold_nocache_seconds"] = None
        return
    env = subprocess_env(bench.threads)
    with tempfile.TemporaryDirectory(prefix="numba_cache_") as cache:
        env["NUMBA_CACHE_DIR"] = cache
        d = run_bench_script(script, env, "MFCC no-cache")
    bench.record("mfcc_cold_nocache_seconds", [d["first"]])


def measure_embedding(bench) -> None:
    """Whole-utterance embedding of the test set as EER.py does it (``embed_features``, equal-length
    batches within ``test.batch_frames``), the same without a frame budget (interleaved, run by run),
    and the model on one fixed batch of 3-s inputs (what batching could give)."""
    cfg, device = bench.cfg, bench.device
    model = getattr(bench, "model", None)
    if model is None:  # training section failed: a fresh model is as good for timing
        model = speaker_model.build_model(cfg["model"], feature_dim(cfg["features"])).to(device)
    model.eval()
    ds = SpkTestDataset(cfg, log=quiet)
    bs, budget = cfg["test"]["batch_size"], cfg["test"]["batch_frames"]
    frames = sum(f.shape[1] for f in ds.features)
    audio_s = frames * cfg["features"]["hop_length_ms"] / 1000.0
    budgets = {"embed_utts_per_s": budget, "embed_unbudgeted_utts_per_s": frames}  # the whole set: no cap
    rates = {key: [] for key in budgets}
    for run in range(bench.runs + 1):  # run 0 warms up
        for key, max_frames in budgets.items():
            sync(device)
            t0 = time.perf_counter()
            emb = embed_features(model, ds.features, bs, device, max_frames=max_frames)
            sync(device)
            if run:
                rates[key].append(len(ds) / (time.perf_counter() - t0))
    assert emb.shape[0] == len(ds)
    rate = bench.record("embed_utts_per_s", rates["embed_utts_per_s"])
    unbudgeted = bench.record("embed_unbudgeted_utts_per_s", rates["embed_unbudgeted_utts_per_s"])
    bench.result["embed_budget_speedup"] = rate / unbudgeted
    bench.result["embed_x_realtime"] = rate * audio_s / len(ds)
    bench.result["embed_utterances"] = len(ds)
    lengths = [f.shape[1] for f in ds.features]
    bench.result["embed_batches"] = len(equal_length_batches(lengths, bs, budget))
    bench.result["embed_unbudgeted_batches"] = len(equal_length_batches(lengths, bs, frames))
    x = torch.randn(bs, feature_dim(cfg["features"]), 300).to(device)
    rates = []
    with torch.no_grad():
        model(x)
        for _ in range(bench.runs):
            sync(device)
            t0 = time.perf_counter()
            model(x).float().cpu()
            sync(device)
            rates.append(bs / (time.perf_counter() - t0))
    bench.record("embed_fixed_batch_utts_per_s", rates)


def measure_scoring(bench) -> None:
    """``cosine_scores`` on random embeddings and random trial pairs."""
    rng = np.random.default_rng(0)
    n_emb, n_trials = bench.s["score_embeddings"], bench.s["score_trials"]
    emb = rng.standard_normal((n_emb, 512), dtype=np.float32)
    a = rng.integers(0, n_emb, n_trials)
    b = rng.integers(0, n_emb, n_trials)
    cosine_scores(emb, a[:1000], b[:1000])  # warm-up
    rates = []
    for _ in range(bench.runs):
        t0 = time.perf_counter()
        scores = cosine_scores(emb, a, b)
        rates.append(n_trials / (time.perf_counter() - t0))
    assert scores.shape == (n_trials,)
    bench.record("score_trials_per_s", rates)
    bench.result["score_embeddings"] = n_emb
    bench.result["score_trials"] = n_trials


def measure_first_epoch(bench) -> None:
    """``python train.py --epochs 1`` on the generated corpus with a fresh, empty feature cache:
    wall time to its ``Train Stage: 1/`` line, its parts as train.py reports them, and its peak
    memory (read from /proc while it prints)."""
    first, startup, feats, epoch, total, peak = [], [], [], [], [], []
    for i in range(bench.cold_runs):
        run_dir = bench.workdir / f"first_epoch_{i}"
        ov = bench.overrides(run_dir / "feature_cache", run_dir / "runs")
        cmd = [sys.executable, "-u", str(PROJECT / "train.py"), "--epochs", "1", "--n_folder", "bench",
               "--gpu", "0" if bench.device.type == "cuda" else "-1"]
        for k, v in ov.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=subprocess_env(bench.threads), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        t_first_line = t_stage = rss = None
        feat_s = epoch_s = None
        tail = []
        try:
            for line in proc.stdout:
                now = time.perf_counter() - t0
                hwm = vm_hwm_mb(proc.pid)  # the process is alive while it prints
                if hwm is not None:
                    rss = hwm if rss is None else max(rss, hwm)
                tail = (tail + [line])[-40:]
                if t_first_line is None and line.strip():
                    t_first_line = now
                m = re.search(r"features ready in ([0-9.]+)\s*s", line)
                if m:
                    feat_s = float(m.group(1))
                if t_stage is None and "Train Stage: 1/" in line:
                    t_stage = now
                    m = re.search(r"([0-9.]+)s\)\s*$", line.strip())
                    epoch_s = float(m.group(1)) if m else None
            rc = proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - t0
        if rc != 0 or t_stage is None:
            raise RuntimeError(f"train.py exited with {rc} before/after 'Train Stage: 1/': {''.join(tail)[-1500:]}")
        first.append(t_stage)
        total.append(wall)
        if rss is not None:
            peak.append(rss)
        if t_first_line is not None:
            startup.append(t_first_line)
        if feat_s is not None:
            feats.append(feat_s)
        if epoch_s is not None:
            epoch.append(epoch_s)
        shutil.rmtree(run_dir, ignore_errors=True)
    bench.record("first_epoch_seconds", first)
    bench.record("first_epoch_process_seconds", total)
    bench.record("first_epoch_startup_seconds", startup)
    bench.record("first_epoch_features_seconds", feats)
    bench.record("first_epoch_train_seconds", epoch)
    bench.record("first_epoch_peak_rss_mb", peak)

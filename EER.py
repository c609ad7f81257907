"""Evaluate a checkpoint on the trial list (lab steps 3.1-3.2): embeddings, scores, EER, minDCF, plots.

    python EER.py --cp_num 30                 # saved_model/000/checkpoint_030.pth
    python EER.py                             # test.model_path from config.yaml
    python EER.py --baseline                  # no-training baseline: mean+std of raw MFCCs, cosine
    python EER.py --cp_num 30 --score_norm asnorm          # AS-norm with a training-speaker cohort
    python EER.py --cp_num 30 --backend plda --calibrate   # PLDA back-end + calibrated LLRs
    python EER.py --cp_num 30 --save_embeddings --report   # also embeddings.npy and the run report

Prints the lab's line ``Epoch=30 EER= 3.25 Thres= 0.61234`` and writes, in
``saved_model/<n_folder>/eval_<NNN>/`` (``eval_<NNN>_<system>/`` for other back-ends, e.g.
``eval_030_plda_asnorm_cal``): ``scores.txt`` (ENROLL TEST SCORE), ``metrics.json``, ``roc.png``,
``det.png``, ``hist.png``; with a back-end also ``backend.npz`` (PLDA / calibrator) and
``cohort.npz`` (AS-norm cohort, training mean), reused by later runs (``--retrain_backend`` refits).
Every evaluation is recorded in ``<checkpoint folder>/evaluations.json`` so ``verify.py`` finds the
threshold of the last evaluation of a checkpoint wherever ``--out`` put it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import metrics
import scoring
from checkpoint import CheckpointError, atomic_write, describe_mismatch, epoch_checkpoint_path, load_checkpoint
from config import ConfigError, config_path_value, explicit_keys, load_config, parse_override, resolve_path
from dataset import (DataError, SpkTestDataset, check_root, load_audio, mfcc, overlap_warning, read_manifest,
                     read_trials)
from demo_corpus import ensure_demo_corpus
from embedding import checkpoint_features, cli_path, embed_features, embed_files, select_device, write_embeddings
from speaker_model import model_from_checkpoint

BACKENDS = ("cosine", "plda")
SCORE_NORMS = ("none", "asnorm")
EVAL_INDEX = "evaluations.json"
BACKEND_FILE = "backend.npz"
COHORT_FILE = "cohort.npz"
COHORT_FORMAT = "speaker-lab-cohort/1"
SPLIT_SEED = 0

try:  # the PLDA / calibration back-end (backend.py); cosine scoring works without it
    import backend as _backend
    BackendError = _backend.BackendError
except ImportError:  # pragma: no cover - backend.py ships with the project
    _backend = None

    class BackendError(RuntimeError):
        pass


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Score a trial list with a trained checkpoint: EER, minDCF, "
                                             "ROC/DET/score histogram; optional PLDA, AS-norm, calibration.")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--cp_num", type=int, default=None,
                    help="epoch of saved_model/<n_folder>/checkpoint_<NNN>.pth (default: test.model_path)")
    ap.add_argument("--n_folder", default=None, help="run folder under saved_model/ (default: train.n_folder)")
    ap.add_argument("--checkpoint", default=None, help="explicit checkpoint file (overrides --cp_num)")
    ap.add_argument("--out", default=None, help="output folder (default: saved_model/<n_folder>/eval_<NNN>/)")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU")
    ap.add_argument("--baseline", action="store_true",
                    help="score the no-training baseline (mean+std of raw MFCCs) instead of a checkpoint")
    ap.add_argument("--backend", choices=BACKENDS, default=None,
                    help="cosine scoring or a PLDA back-end trained on training-set embeddings "
                         "(default: test.backend)")
    ap.add_argument("--score_norm", choices=SCORE_NORMS, default=None,
                    help="score normalisation: asnorm = adaptive symmetric normalisation with a cohort of "
                         "training-speaker mean embeddings (default: test.score_norm)")
    ap.add_argument("--asnorm_top_n", type=int, default=None, help="AS-norm top-N cohort scores (default: "
                                                                   "test.asnorm_top_n)")
    ap.add_argument("--center", action="store_true", default=None,
                    help="subtract the mean training embedding before scoring (default: test.center)")
    ap.add_argument("--calibrate", action="store_true", default=None,
                    help="fit a score calibrator on held-apart training speakers: LLR scores, actual DCF "
                         "at the Bayes threshold, Cllr (default: test.calibrate)")
    ap.add_argument("--retrain_backend", action="store_true",
                    help="refit the PLDA / cohort / calibrator even if the evaluation folder has them")
    ap.add_argument("--save_embeddings", action="store_true",
                    help="also write embeddings.npy (float32) and embeddings_index.txt to the output folder")
    ap.add_argument("--report", action="store_true",
                    help="afterwards write report.md / report.html in the checkpoint's run folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return ap


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoringOptions:
    backend: str = "cosine"
    score_norm: str = "none"
    asnorm_top_n: int = 100
    center: bool = False
    calibrate: bool = False
    calibration_fraction: float = 0.2
    calibration_trials: int = 100_000
    plda_lda_dim: int = 0
    backend_utts_per_speaker: int = 0

    @property
    def needs_training_data(self) -> bool:
        return self.backend == "plda" or self.score_norm == "asnorm" or self.center or self.calibrate

    @property
    def plain(self) -> bool:
        """Scores are plain cosine similarities of the raw embeddings (calibration aside)."""
        return self.backend == "cosine" and self.score_norm == "none" and not self.center

    @property
    def suffix(self) -> str:
        """Folder suffix: '' for plain cosine, else e.g. '_plda_asnorm_center_cal'."""
        parts = (["plda"] if self.backend == "plda" else []) + (["center"] if self.center else []) \
            + (["asnorm"] if self.score_norm == "asnorm" else []) + (["cal"] if self.calibrate else [])
        return "".join(f"_{p}" for p in parts)

    @property
    def label(self) -> str:
        """System name, e.g. 'cosine', 'plda+asnorm+calibrated'."""
        parts = [self.backend] + (["center"] if self.center else []) \
            + (["asnorm"] if self.score_norm == "asnorm" else []) + (["calibrated"] if self.calibrate else [])
        return "+".join(parts)


def scoring_options(cfg: dict, backend=None, score_norm=None, asnorm_top_n=None, center=None,
                    calibrate=None) -> ScoringOptions:
    """Options from ``cfg['test']`` with explicit arguments taking precedence; validated."""
    t = cfg["test"]
    src = cfg.get("_config_path", "config")

    def pick(arg, key, default):
        return arg if arg is not None else t.get(key, default)
    opts = ScoringOptions(
        backend=str(pick(backend, "backend", "cosine")), score_norm=str(pick(score_norm, "score_norm", "none")),
        asnorm_top_n=int(pick(asnorm_top_n, "asnorm_top_n", 100)), center=bool(pick(center, "center", False)),
        calibrate=bool(pick(calibrate, "calibrate", False)),
        calibration_fraction=float(t.get("calibration_fraction", 0.2)),
        calibration_trials=int(t.get("calibration_trials", 100_000)),
        plda_lda_dim=int(t.get("plda_lda_dim", 0)),
        backend_utts_per_speaker=int(t.get("backend_utts_per_speaker", 0)))
    if opts.backend not in BACKENDS:
        raise ConfigError(f"{src}: key 'test.backend' is {opts.backend!r}; choose one of {', '.join(BACKENDS)}")
    if opts.score_norm not in SCORE_NORMS:
        raise ConfigError(f"{src}: key 'test.score_norm' is {opts.score_norm!r}; choose one of "
                          f"{', '.join(SCORE_NORMS)}")
    if opts.asnorm_top_n < 1:
        raise ConfigError(f"{src}: key 'test.asnorm_top_n' must be at least 1, got {opts.asnorm_top_n}")
    if not 0.0 < opts.calibration_fraction < 1.0:
        raise ConfigError(f"{src}: key 'test.calibration_fraction' must be between 0 and 1, got "
                          f"{opts.calibration_fraction}")
    if opts.calibration_trials < 2:
        raise ConfigError(f"{src}: key 'test.calibration_trials' must be at least 2, got {opts.calibration_trials}")
    if opts.plda_lda_dim < 0 or opts.backend_utts_per_speaker < 0:
        raise ConfigError(f"{src}: keys 'test.plda_lda_dim' and 'test.backend_utts_per_speaker' must be >= 0 "
                          "(0 = off / all)")
    if (opts.backend == "plda" or opts.calibrate) and _backend is None:
        raise ConfigError("the PLDA / calibration back-end needs backend.py, which is missing")
    return opts


def resolve_checkpoint(cfg: dict, cp_num: int | None, checkpoint: str | None) -> Path:
    if checkpoint:
        return cli_path(checkpoint)
    if cp_num is not None:
        return epoch_checkpoint_path(config_path_value(cfg, "train.save_dir") / str(cfg["train"]["n_folder"]), cp_num)
    return config_path_value(cfg, "test.model_path")


def default_out_dir(cfg: dict, checkpoint: Path | None, baseline: bool, opts: ScoringOptions) -> Path:
    """``<ckpt folder>/eval_<stem without 'checkpoint_'><system suffix>`` (``<save_dir>/baseline...``)."""
    if baseline:
        return config_path_value(cfg, "train.save_dir") / f"baseline{opts.suffix}"
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"eval_{checkpoint.stem.replace('checkpoint_', '')}{opts.suffix}"


def trial_utterances(trials: list, test_index: set[str], trials_path: Path, manifest: Path) -> list[str]:
    """Utterances the trials need, in first-use order; all missing ones are reported together."""
    needed, missing = {}, []
    for t in trials:
        for rel in (t.enroll, t.test):
            if rel not in test_index:
                missing.append(f"line {t.line}: {rel}")
            needed.setdefault(rel, None)
    if missing:
        raise DataError(f"{trials_path}: {len(missing)} trial utterance(s) are not in the test manifest {manifest}: "
                        f"{'; '.join(missing[:10])}. Add them to the manifest or fix the trial list")
    return list(needed)


# --------------------------------------------------------------------------------------------------
# Embedding and scoring
# --------------------------------------------------------------------------------------------------
def embed_dataset(model: torch.nn.Module, dataset: SpkTestDataset, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """Embeddings ``(n_utts, embedding_size)`` in dataset order; equal-length batches, so exact."""
    return embed_features(model, dataset.features, batch_size, device)


def cosine_scores(emb: np.ndarray, enroll_idx: np.ndarray, test_idx: np.ndarray,
                  chunk: int = scoring.DEFAULT_CHUNK) -> np.ndarray:
    """Cosine similarity of embedding pairs, vectorised in chunks (memory bounded for huge trial lists)."""
    return scoring.cosine_scores(emb, enroll_idx, test_idx, chunk)


def mfcc_stats_embeddings(paths: list[Path], feat_cfg: dict) -> np.ndarray:
    """No-training baseline: mean and standard deviation of raw (not mean-normalised) MFCCs."""
    rows = []
    for p in paths:
        f = mfcc(load_audio(p, feat_cfg["sample_rate"]), feat_cfg, mean_norm=False)
        rows.append(np.concatenate([f.mean(axis=1), f.std(axis=1)]))
    return np.stack(rows).astype(np.float32)


def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_data_section(cfg: dict, state: dict | None, log=print) -> dict:
    """The training data to fit back-ends on: the checkpoint's recorded ``data`` section, unless the
    user changed ``data.*`` from the shipped defaults (then the current config's)."""
    shipped = load_config()["data"]
    recorded = (state or {}).get("config", {}).get("data")
    if recorded is None or cfg["data"] != shipped:
        return dict(cfg["data"])
    data = {**shipped, **recorded}
    if not resolve_path(data["train_manifest"]).is_file() and resolve_path(cfg["data"]["train_manifest"]).is_file():
        log(f"note: the checkpoint's training manifest {data['train_manifest']} is gone; using the config's")
        return dict(cfg["data"])
    return data


def training_embeddings(data: dict, embed_paths, utts_per_speaker: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Whole-utterance embeddings of the training manifest (``utts_per_speaker`` each, 0 = all) and the
    speaker of each row."""
    root, manifest = resolve_path(data["root"]), resolve_path(data["train_manifest"])
    ensure_demo_corpus(data["root"], log=log)
    utts = read_manifest(manifest, key="data.train_manifest")
    if utts_per_speaker > 0:
        count: dict[str, int] = {}
        kept = []
        for u in utts:
            if count.get(u.speaker, 0) < utts_per_speaker:
                count[u.speaker] = count.get(u.speaker, 0) + 1
                kept.append(u)
        utts = kept
    check_root(root, utts, "data.root", manifest)
    t0 = time.perf_counter()
    emb, kept_idx = embed_paths([root / u.relpath for u in utts], data.get("bad_audio", "error"))
    speakers = np.array([utts[i].speaker for i in kept_idx])
    log(f"training-set embeddings for the back-end: {len(emb)} utterances of {len(set(speakers.tolist()))} "
        f"speakers ({time.perf_counter() - t0:.1f}s)")
    return emb, speakers


@dataclass
class FittedBackend:
    """Everything a scoring system needs besides the embeddings (all optional)."""
    mean: np.ndarray | None = None
    plda: object | None = None
    calibrator: object | None = None
    cohort: np.ndarray | None = None
    cohort_speakers: list | None = None
    info: dict | None = None

    def scorer(self):
        return scoring.PLDAScorer(self.plda) if self.plda is not None else scoring.CosineScorer()


def score_trials(fb: FittedBackend, opts: ScoringOptions, emb: np.ndarray, idx_a, idx_b) -> np.ndarray:
    """System scores of trials ``(emb[idx_a], emb[idx_b])``: centering, cosine/PLDA, AS-norm (not calibration)."""
    x = scoring.center(emb, fb.mean if opts.center else None)
    scorer = fb.scorer()
    scores = scorer.pairs(x, idx_a, idx_b)
    if opts.score_norm == "asnorm":
        used = np.unique(np.concatenate([np.asarray(idx_a, np.int64), np.asarray(idx_b, np.int64)]))
        mu = np.zeros(len(x))
        sd = np.ones(len(x))
        mu[used], sd[used] = scoring.cohort_stats(x[used], fb.cohort, opts.asnorm_top_n, scorer)
        scores = scoring.asnorm(scores, idx_a, idx_b, mu, sd)
    return np.asarray(scores, dtype=np.float32)


def backend_settings(opts: ScoringOptions, data: dict) -> dict:
    """What a saved back-end depends on besides the checkpoint (a change means refitting)."""
    s = {"train_root": str(data["root"]), "train_manifest": str(data["train_manifest"]),
         "utts_per_speaker": opts.backend_utts_per_speaker, "backend": opts.backend, "center": opts.center,
         "score_norm": opts.score_norm, "calibrate": opts.calibrate}
    if opts.backend == "plda":
        s["plda_lda_dim"] = opts.plda_lda_dim
    if opts.calibrate:
        s.update(calibration_fraction=opts.calibration_fraction, calibration_trials=opts.calibration_trials,
                 split_seed=SPLIT_SEED)
        if opts.score_norm == "asnorm":
            s["asnorm_top_n"] = opts.asnorm_top_n
    return s


def save_cohort(path: Path, fb: FittedBackend, fingerprint: str) -> None:
    meta = json.dumps({"format": COHORT_FORMAT, "fingerprint": fingerprint,
                       "speakers": list(fb.cohort_speakers or [])})
    arrays = {"meta": np.array(meta),
              "cohort": np.asarray(fb.cohort if fb.cohort is not None else np.zeros((0, 0)), dtype=np.float32),
              "mean": np.asarray(fb.mean if fb.mean is not None else np.zeros(0), dtype=np.float32)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def load_cohort(path: Path, fingerprint: str | None) -> tuple[np.ndarray | None, np.ndarray | None, list]:
    """``(cohort or None, training mean or None, cohort speakers)``; BackendError when unusable."""
    if not path.is_file():
        raise BackendError(f"cohort file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            cohort, mean = z["cohort"], z["mean"]
    except Exception as e:  # BadZipFile, KeyError, ValueError, JSONDecodeError
        raise BackendError(f"{path} is not a readable cohort file ({type(e).__name__}); pass --retrain_backend") from None
    if meta.get("format") != COHORT_FORMAT:
        raise BackendError(f"{path} is not a cohort file of this project")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise BackendError(f"{path} was made for another checkpoint or other settings")
    return (cohort if cohort.size else None), (mean if mean.size else None), meta.get("speakers", [])


def _try_load(out_dir: Path, opts: ScoringOptions, fingerprint: str, log) -> FittedBackend | None:
    """The saved back-end of this evaluation folder if it fits ``fingerprint``, else None (with a note)."""
    fb = FittedBackend()
    need_backend_file = opts.backend == "plda" or opts.calibrate
    need_cohort_file = opts.score_norm == "asnorm" or opts.center
    try:
        if need_backend_file:
            path = out_dir / BACKEND_FILE
            if not path.is_file():
                return None
            saved = _backend.read_backend_meta(path).get("fingerprint", "")
            if saved != fingerprint:
                same_ckpt = saved.split("+")[0] == fingerprint.split("+")[0]
                log(f"note: {path} was fitted {'with other settings' if same_ckpt else 'for another checkpoint'}; "
                    "refitting the back-end")
                return None
            fb.plda, fb.calibrator, fb.info = _backend.load_backend(path, fingerprint)
        if need_cohort_file:
            path = out_dir / COHORT_FILE
            if not path.is_file():
                return None
            fb.cohort, fb.mean, fb.cohort_speakers = load_cohort(path, fingerprint)
    except BackendError as e:
        log(f"note: {e}; refitting the back-end")
        return None
    if (opts.backend == "plda" and fb.plda is None) or (opts.calibrate and fb.calibrator is None) \
            or (opts.score_norm == "asnorm" and fb.cohort is None) or (opts.center and fb.mean is None):
        return None
    return fb


def fit_backend(opts: ScoringOptions, train_emb: np.ndarray, train_spk: np.ndarray, log=print) -> FittedBackend:
    """Fit centering mean, PLDA, AS-norm cohort and calibrator on training-set embeddings.

    With calibration, the training speakers are split (``backend.split_calibration_speakers``): PLDA,
    cohort and mean use only the fit speakers; the calibrator is fitted on trials among the held-apart
    speakers scored by the very same system.
    """
    info: dict = {"training_utterances": int(len(train_emb)), "training_speakers": len(set(train_spk.tolist()))}
    fit = np.ones(len(train_emb), dtype=bool)
    if opts.calibrate:
        try:
            fit_spk, held_spk = _backend.split_calibration_speakers(train_spk.tolist(), opts.calibration_fraction,
                                                                    seed=SPLIT_SEED)
        except BackendError as e:
            raise BackendError(f"calibration: {e}") from None
        fit = np.isin(train_spk, fit_spk)
        info.update(fit_speakers=len(fit_spk), held_out_speakers=len(held_spk))
    fb = FittedBackend(info=info)
    if opts.center:
        fb.mean = train_emb[fit].mean(axis=0).astype(np.float32)
    x = scoring.center(train_emb, fb.mean)
    if opts.backend == "plda":
        fb.plda = _backend.PLDA().fit(x[fit], train_spk[fit], lda_dim=opts.plda_lda_dim or None, length_norm=True)
        info.update(plda_dim=fb.plda.dim, plda_lda_dim=opts.plda_lda_dim)
    if opts.score_norm == "asnorm":
        fb.cohort, fb.cohort_speakers = scoring.speaker_means(x[fit], train_spk[fit],
                                                              normalize=opts.backend == "cosine")
        info["cohort_size"] = int(len(fb.cohort))
        if opts.asnorm_top_n > len(fb.cohort):
            log(f"note: AS-norm top-N {opts.asnorm_top_n} > cohort of {len(fb.cohort)} speakers; using all of them")
    if opts.calibrate:
        held_emb, held_spk = train_emb[~fit], train_spk[~fit]
        ia, ib, tgt = _backend.make_trials_from_labels(held_spk, max_trials=opts.calibration_trials, seed=SPLIT_SEED)
        raw = score_trials(fb, opts, held_emb, ia, ib)
        fb.calibrator = _backend.ScoreCalibrator().fit(raw, tgt, prior=0.5)
        info.update(calibration_trials=int(tgt.size), calibration_eer=metrics.compute_eer(raw, tgt)[0],
                    calibration_a=fb.calibrator.a, calibration_b=fb.calibrator.b)
        log(f"calibrator fitted on {tgt.size} trials of {len(set(held_spk.tolist()))} held-apart training "
            f"speakers (their EER {info['calibration_eer'] * 100:.2f}%): llr = {fb.calibrator.a:.4f} * score "
            f"+ {fb.calibrator.b:.4f}")
    return fb


def prepare_backend(opts: ScoringOptions, out_dir: Path, fingerprint: str, retrain: bool, train_data_fn,
                    log=print) -> tuple[FittedBackend, bool]:
    """Load the evaluation folder's saved back-end or fit (and save) a new one; returns (backend, reused)."""
    if not opts.needs_training_data:
        return FittedBackend(), False
    if not retrain:
        fb = _try_load(out_dir, opts, fingerprint, log)
        if fb is not None:
            log(f"reusing the back-end saved in {out_dir} (--retrain_backend to refit)")
            return fb, True
    train_emb, train_spk = train_data_fn()
    fb = fit_backend(opts, train_emb, train_spk, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.backend == "plda" or opts.calibrate:
        _backend.save_backend(out_dir / BACKEND_FILE, fb.plda, fb.calibrator, fingerprint,
                              extra={"info": fb.info, "system": opts.label})
    if opts.score_norm == "asnorm" or opts.center:
        save_cohort(out_dir / COHORT_FILE, fb, fingerprint)
    return fb, False


def checkpoint_fingerprint(checkpoint: Path | None, feat_cfg: dict) -> str:
    if checkpoint is None:
        return "baseline-" + _sha(feat_cfg)
    if _backend is not None:
        return _backend.checkpoint_fingerprint(checkpoint)
    st = Path(checkpoint).stat()
    return _sha([st.st_size, st.st_mtime_ns])


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------
def _write_outputs(out_dir: Path, trials, scores: np.ndarray, result: dict, labels: np.ndarray, label: str,
                   title: str, llr: np.ndarray | None = None, score_name: str = "score") -> None:
    from plots import plot_det, plot_roc, plot_score_hist
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{t.enroll} {t.test} {s:.6f}\n" for t, s in zip(trials, scores))
    atomic_write(out_dir / "scores.txt", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    if llr is not None:
        lines = "".join(f"{t.enroll} {t.test} {s:.6f}\n" for t, s in zip(trials, llr))
        atomic_write(out_dir / "scores_llr.txt", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    curve = metrics.error_curve(scores, labels)
    eer, thr = result["eer"], result["threshold"]
    plot_roc(curve.fpr, curve.fnr, eer, thr, out_dir / "roc.png", label=label, title=f"ROC: {title}")
    dcf_thr = result["min_dcf_0.01_threshold"]
    far, frr = metrics.error_rates_at(scores, labels, dcf_thr)
    plot_det(curve.fpr, curve.fnr, eer, thr, out_dir / "det.png",
             dcf_point=(far, frr, result["min_dcf_0.01"], dcf_thr), label=label, title=f"DET: {title}")
    plot_score_hist(scores, labels, thr, out_dir / "hist.png", label=label, title=f"Scores: {title}",
                    score_name=score_name)
    atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n",
                                                                      encoding="utf-8"))


def _portable(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (so a copied run folder keeps working), else absolute."""
    path, base = Path(path).resolve(), Path(base).resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def record_evaluation(checkpoint: Path, metrics_path: Path, result: dict) -> Path:
    """Add this evaluation to ``<checkpoint folder>/evaluations.json`` (latest last per checkpoint)."""
    checkpoint = Path(checkpoint)
    index_file = checkpoint.parent / EVAL_INDEX
    index = read_evaluation_index(index_file)
    entry = {"metrics": _portable(metrics_path, checkpoint.parent), "system": result.get("backend"),
             "eer": result["eer"], "threshold": result["threshold"], "fingerprint": result.get("fingerprint"),
             "time": result.get("evaluated_at")}
    entries = [e for e in index.get(checkpoint.name, []) if e.get("metrics") != entry["metrics"]]
    index[checkpoint.name] = entries + [entry]
    atomic_write(index_file, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))
    return index_file


def read_evaluation_index(index_file: Path) -> dict:
    try:
        data = json.loads(Path(index_file).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_system(metrics_path: Path, checkpoint: Path | None = None) -> tuple[ScoringOptions, FittedBackend, dict]:
    """The scoring system of a finished evaluation (its ``metrics.json``): options, saved back-end, metrics.

    With ``checkpoint``, checks that the evaluation and its back-end were made with this very checkpoint
    file (a retrained checkpoint makes the old threshold and back-end meaningless).
    """
    metrics_path = Path(metrics_path)
    try:
        m = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the evaluation {metrics_path}: {e}") from None
    opts = ScoringOptions(backend=m.get("scorer", "cosine"), score_norm=m.get("score_norm", "none"),
                          asnorm_top_n=int(m.get("asnorm_top_n") or 100), center=bool(m.get("center", False)),
                          calibrate=bool(m.get("calibrated", False)))
    fp = None
    if checkpoint is not None:
        fp = checkpoint_fingerprint(Path(checkpoint), {})
        if m.get("fingerprint") and m["fingerprint"] != fp:
            raise DataError(f"{metrics_path} evaluated another version of {Path(checkpoint).name} (the file "
                            f"changed since, e.g. retrained); run EER.py on it again")
    fb = FittedBackend()
    folder = metrics_path.parent
    if m.get("backend_file"):
        path = folder / m["backend_file"]
        if _backend is None:
            raise BackendError("this evaluation used backend.py, which is missing")
        fb.plda, fb.calibrator, fb.info = _backend.load_backend(path, None)
        saved = _backend.read_backend_meta(path).get("fingerprint", "")
        if fp is not None and saved.split("+")[0] != fp:
            raise BackendError(f"{path} was fitted for another checkpoint; run EER.py again")
    if m.get("cohort_file"):
        fb.cohort, fb.mean, fb.cohort_speakers = load_cohort(folder / m["cohort_file"], None)
    if (opts.backend == "plda" and fb.plda is None) or (opts.calibrate and fb.calibrator is None) \
            or (opts.score_norm == "asnorm" and fb.cohort is None) or (opts.center and fb.mean is None):
        raise BackendError(f"the back-end files of {folder} are missing; run EER.py again")
    return opts, fb, m


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def evaluate(cfg: dict, checkpoint: Path | None, out_dir: Path | None = None, device=None, log=print,
             baseline: bool = False, *, backend: str | None = None, score_norm: str | None = None,
             asnorm_top_n: int | None = None, center: bool | None = None, calibrate: bool | None = None,
             retrain_backend: bool = False, save_embeddings: bool = False, report: bool = False) -> dict:
    """Embed the test utterances, score every trial, compute EER/minDCF, write outputs; return metrics.

    Keyword options default to the ``test.*`` config keys (``backend``, ``score_norm``, ``asnorm_top_n``,
    ``center``, ``calibrate``).
    """
    opts = scoring_options(cfg, backend, score_norm, asnorm_top_n, center, calibrate)
    device = device or torch.device("cpu")
    ensure_demo_corpus(cfg["test"]["root"], log=log)
    trials_path = config_path_value(cfg, "test.trials")
    manifest = config_path_value(cfg, "test.test_manifest")
    trials = read_trials(trials_path, key="test.trials")
    batch_size = cfg["test"]["batch_size"]
    if baseline:
        state, feat_cfg, label, model = None, cfg["features"], "baseline (MFCC mean+std)", None
        checkpoint = None
    else:
        checkpoint = Path(checkpoint)
        state = load_checkpoint(checkpoint)
        diff = describe_mismatch(state["config"], cfg, only_keys=explicit_keys(cfg))
        if diff:
            raise CheckpointError(f"{checkpoint} does not match the settings you gave: {'; '.join(diff)}. A checkpoint "
                                  "is evaluated with its own model/feature settings: drop those --set/--config keys "
                                  "or pick a checkpoint trained with them")
        feat_cfg = checkpoint_features(cfg, state, log)
        label = f"{state.get('tag', 'model')} epoch {state['epoch']}"
        model = model_from_checkpoint(state, device)
    system = f"{label}, {opts.label}"
    eval_cfg = {**cfg, "features": feat_cfg}
    test_list = read_manifest(manifest, key="test.test_manifest")
    test_utts = {u.relpath for u in test_list}
    note = None if baseline else overlap_warning(state["config"].get("data", cfg["data"])["train_manifest"], test_list)
    if note:
        log(note)
    needed = trial_utterances(trials, test_utts, trials_path, manifest)

    t0 = time.perf_counter()
    if baseline:
        root = config_path_value(cfg, "test.root")
        emb = mfcc_stats_embeddings([root / r for r in needed], feat_cfg)
        index = {r: i for i, r in enumerate(needed)}
        rows = list(needed)
    else:
        dataset = SpkTestDataset(eval_cfg, log=log, relpaths=needed)
        emb = embed_dataset(model, dataset, batch_size, device)
        index = dataset.index
        rows = [u.relpath for u in dataset.utterances]
    t_embed = time.perf_counter() - t0

    def embed_paths(paths, policy):
        if baseline:
            return mfcc_stats_embeddings(paths, feat_cfg), list(range(len(paths)))
        e, kept, problems = embed_files(model, paths, feat_cfg, batch_size, device, policy=policy, log=log,
                                        desc="train MFCC")
        if problems:
            log(f"note: {len(problems)} unusable training file(s) left out of the back-end (data.bad_audio: skip)")
        return e, kept

    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg, checkpoint, baseline, opts)
    fb, reused = FittedBackend(), False
    data = None
    if opts.needs_training_data:
        data = training_data_section(cfg, state, log)
        ckpt_fp = checkpoint_fingerprint(checkpoint, feat_cfg)
        fingerprint = f"{ckpt_fp}+{_sha(backend_settings(opts, data))}"
        fb, reused = prepare_backend(
            opts, out_dir, fingerprint, retrain_backend,
            lambda: training_embeddings(data, embed_paths, opts.backend_utts_per_speaker, log), log=log)

    enroll_idx = np.array([index[t.enroll] for t in trials], dtype=np.int64)
    test_idx = np.array([index[t.test] for t in trials], dtype=np.int64)
    labels = np.array([t.label for t in trials], dtype=np.int64)
    t1 = time.perf_counter()
    scores = score_trials(fb, opts, emb, enroll_idx, test_idx)
    t_score = time.perf_counter() - t1

    result = metrics.summary(scores, labels)
    result.update({
        "n_utterances": int(len(emb)),
        "checkpoint": str(checkpoint) if checkpoint else None, "epoch": state["epoch"] if state else None,
        "trials": str(trials_path), "backend": opts.label, "scorer": opts.backend, "score_norm": opts.score_norm,
        "asnorm_top_n": opts.asnorm_top_n if opts.score_norm == "asnorm" else None, "center": opts.center,
        "calibrated": opts.calibrate, "system": system,
        "embed_seconds": round(t_embed, 3), "score_seconds": round(t_score, 4),
        "fingerprint": checkpoint_fingerprint(checkpoint, feat_cfg) if checkpoint else None,
        "evaluated_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "plots": {"roc": "roc.png", "det": "det.png", "hist": "hist.png"},
    })
    if opts.needs_training_data:
        result["training_data"] = {"root": str(data["root"]), "train_manifest": str(data["train_manifest"])}
        result["backend_info"] = fb.info
        result["backend_reused"] = reused
        result["backend_file"] = BACKEND_FILE if (opts.backend == "plda" or opts.calibrate) else None
        result["cohort_file"] = COHORT_FILE if (opts.score_norm == "asnorm" or opts.center) else None
    llr = None
    if opts.calibrate:
        llr = fb.calibrator.transform(scores)
        cal = {"a": fb.calibrator.a, "b": fb.calibrator.b, "prior": fb.calibrator.prior,
               "cllr": metrics.cllr(llr, labels), "min_cllr": metrics.min_cllr(llr, labels)}
        for p in metrics.DCF_TARGETS:
            bt = _backend.ScoreCalibrator.bayes_threshold(p)
            result[f"actual_dcf_{p:g}"] = metrics.actual_dcf(llr, labels, bt, p_target=p)
            result[f"bayes_llr_threshold_{p:g}"] = bt
            if fb.calibrator.a > 0:
                result[f"bayes_score_threshold_{p:g}"] = (bt - fb.calibrator.b) / fb.calibrator.a
        result["calibration"] = cal
        result["cllr"], result["min_cllr"] = cal["cllr"], cal["min_cllr"]
    out_dir = Path(out_dir)
    score_name = {"cosine": "cosine score", "plda": "PLDA log-likelihood ratio"}[opts.backend]
    if opts.score_norm == "asnorm":
        score_name = f"AS-norm {score_name}"
    ckpt_text = Path(checkpoint).name if checkpoint else "no checkpoint"
    title = f"{ckpt_text} ({opts.label}) on {Path(trials_path).name}"
    _write_outputs(out_dir, trials, scores, result, labels, label=system, title=title, llr=llr,
                   score_name=score_name)
    if save_embeddings:
        write_embeddings(out_dir / "embeddings.npy", emb, rows)
        log(f"embeddings: {out_dir / 'embeddings.npy'} ({emb.shape[0]} x {emb.shape[1]}, float32), rows listed "
            f"in {out_dir / 'embeddings_index.txt'}")
    if checkpoint is not None:
        record_evaluation(checkpoint, out_dir / "metrics.json", result)
    result["out_dir"] = str(out_dir)
    epoch_text = state["epoch"] if state else "-"
    eer, thr = result["eer"], result["threshold"]
    log(f"Epoch={epoch_text} EER= {eer * 100:.2f} Thres= {thr:.5f}")
    log(f"minDCF(0.01)= {result['min_dcf_0.01']:.4f} minDCF(0.001)= {result['min_dcf_0.001']:.4f} | "
        f"{result['n_target']} target / {result['n_nontarget']} non-target trials | {opts.label} | {out_dir}")
    if opts.calibrate:
        log(f"actDCF(0.01)= {result['actual_dcf_0.01']:.4f} actDCF(0.001)= {result['actual_dcf_0.001']:.4f} "
            f"(Bayes thresholds: LLR >= {result['bayes_llr_threshold_0.01']:.2f} / "
            f"{result['bayes_llr_threshold_0.001']:.2f}) Cllr= {result['cllr']:.4f} minCllr= {result['min_cllr']:.4f}")
    if report:
        if checkpoint is None:
            log("note: --report needs a checkpoint's run folder; no report for the baseline")
        else:
            import report as report_mod
            md, html = report_mod.write_report(Path(checkpoint).parent, log=log)
            result["report"] = str(html)
    log(f"ROC curve: {Path(out_dir) / 'roc.png'}")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        if args.n_folder is not None:  # (None would also drop a --set train.n_folder=...)
            overrides["train.n_folder"] = args.n_folder
        cfg = load_config(args.config, overrides)
        device = select_device(args.gpu)
        checkpoint = None if args.baseline else resolve_checkpoint(cfg, args.cp_num, args.checkpoint)
        evaluate(cfg, checkpoint, resolve_path(args.out) if args.out else None, device=device,
                 baseline=args.baseline, backend=args.backend, score_norm=args.score_norm,
                 asnorm_top_n=args.asnorm_top_n, center=args.center, calibrate=args.calibrate,
                 retrain_backend=args.retrain_backend, save_embeddings=args.save_embeddings, report=args.report)
    except (ConfigError, DataError, CheckpointError, metrics.MetricError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

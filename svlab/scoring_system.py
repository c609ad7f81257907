"""Scoring systems beyond plain cosine: options, back-ends fitted on training embeddings, cohorts.

A scoring system is a :class:`ScoringOptions` (what to do) plus a :class:`FittedBackend` (what was
learnt from the training set for it):

    centering   subtract the mean training embedding            (``mean``)
    backend     cosine similarity or PLDA                       (``plda``, ``svlab.backend.PLDA``)
    score_norm  AS-norm against training-speaker means          (``cohort``, ``svlab.scoring``)
    calibrate   affine map to log-likelihood ratios             (``calibrator``, ``svlab.calibration``)

``fit_or_load_backend`` gives the back-end of an evaluation: the one saved in its folder
(``backend.npz``: PLDA / calibrator; ``cohort.npz``: cohort and mean) when it was fitted for the same
checkpoint and settings, else a new one fitted on training-set embeddings and saved there. With
``features.store`` on, those embeddings come from the on-disk store training reads (built or completed
here if need be), a batch at a time: memory holds the embeddings, not the training set's features.
The option values come from the ``test:`` section of ``config.yaml`` (the only place that sets their
defaults), or from the ``metrics.json`` of a finished evaluation.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from svlab import backend as plda_backend
from svlab import calibration, metrics, scoring
from svlab.config import CHOICES, is_foreign_path, load_config, resolve_path
from svlab.demo_corpus import ensure_demo_corpus
from svlab.errors import BackendError, ConfigError
from svlab.feature_cache import training_store_corpus
from svlab.files import atomic_write
from svlab.manifests import check_root, read_corpora, read_manifest, training_roots

BACKEND_FILE = "backend.npz"
COHORT_FILE = "cohort.npz"
COHORT_FORMAT = "speaker-lab-cohort/1"
SPLIT_SEED = 0  # seed of the fit / calibration split of the training speakers and of the calibration trials


@dataclass(frozen=True)
class ScoringOptions:
    """What a scoring system does (the ``test.*`` keys of ``config.yaml``); build it with
    :func:`scoring_options`."""
    backend: str                   # cosine | plda
    score_norm: str                # none | asnorm
    asnorm_top_n: int
    center: bool
    calibrate: bool
    calibration_fraction: float
    calibration_trials: int
    plda_lda_dim: int              # 0: no LDA
    backend_utts_per_speaker: int  # 0: all

    @property
    def needs_training_data(self) -> bool:
        return self.backend == "plda" or self.score_norm == "asnorm" or self.center or self.calibrate

    @property
    def plain(self) -> bool:
        """Scores are plain cosine similarities of the raw embeddings (calibration aside)."""
        return self.backend == "cosine" and self.score_norm == "none" and not self.center

    @property
    def lda_dim(self) -> int:
        """The LDA dimension the PLDA back-end reduces to (0: none, or no PLDA)."""
        return self.plda_lda_dim if self.backend == "plda" else 0

    @property
    def suffix(self) -> str:
        """Folder suffix: '' for plain cosine, else e.g. '_plda_center_asnorm_cal' ('_plda_lda128' with LDA:
        systems that score differently never share a folder)."""
        parts = (["plda"] if self.backend == "plda" else []) + ([f"lda{self.lda_dim}"] if self.lda_dim else []) \
            + (["center"] if self.center else []) \
            + (["asnorm"] if self.score_norm == "asnorm" else []) + (["cal"] if self.calibrate else [])
        return "".join(f"_{p}" for p in parts)

    @property
    def label(self) -> str:
        """System name, e.g. 'cosine', 'plda+asnorm+calibrated'."""
        parts = [self.backend + (f"(lda {self.lda_dim})" if self.lda_dim else "")] + (["center"] if self.center else []) \
            + (["asnorm"] if self.score_norm == "asnorm" else []) + (["calibrated"] if self.calibrate else [])
        return "+".join(parts)


def scoring_options(cfg: dict, backend=None, score_norm=None, asnorm_top_n=None, center=None,
                    calibrate=None) -> ScoringOptions:
    """Options from ``cfg['test']``, the arguments that are not None taking precedence; validated."""
    t = cfg["test"]
    src = cfg.get("_config_path", "config")

    def pick(arg, key):
        return arg if arg is not None else t[key]
    opts = ScoringOptions(
        backend=str(pick(backend, "backend")), score_norm=str(pick(score_norm, "score_norm")),
        asnorm_top_n=int(pick(asnorm_top_n, "asnorm_top_n")), center=bool(pick(center, "center")),
        calibrate=bool(pick(calibrate, "calibrate")), calibration_fraction=float(t["calibration_fraction"]),
        calibration_trials=int(t["calibration_trials"]), plda_lda_dim=int(t["plda_lda_dim"]),
        backend_utts_per_speaker=int(t["backend_utts_per_speaker"]))
    for key in ("backend", "score_norm"):
        choices = CHOICES[f"test.{key}"]
        if getattr(opts, key) not in choices:
            raise ConfigError(f"{src}: key 'test.{key}' is {getattr(opts, key)!r}; choose one of {', '.join(choices)}")
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
    return opts


def options_of_evaluation(m: dict) -> ScoringOptions:
    """The options a finished evaluation used, from its ``metrics.json`` (keys it does not record,
    which do not change how its saved back-end scores, come from the shipped ``config.yaml``)."""
    opts = scoring_options(load_config(), backend=m.get("scorer"), score_norm=m.get("score_norm"),
                           asnorm_top_n=m.get("asnorm_top_n"), center=m.get("center"), calibrate=m.get("calibrated"))
    return replace(opts, plda_lda_dim=int(m.get("plda_lda_dim") or 0))


# --------------------------------------------------------------------------------------------------
# Training data for the back-end
# --------------------------------------------------------------------------------------------------
def training_data_section(cfg: dict, state: dict | None, log=print) -> dict:
    """The training data to fit back-ends on: the checkpoint's recorded ``data`` section, unless the
    user changed ``data.*`` from the shipped defaults (then the current config's)."""
    shipped = load_config()["data"]
    recorded = (state or {}).get("config", {}).get("data")
    if recorded is None or cfg["data"] != shipped \
            or any(is_foreign_path(recorded.get(k, "")) for k in ("root", "train_manifest")):  # trained on Windows
        return dict(cfg["data"])
    data = {**shipped, **recorded}
    if not resolve_path(data["train_manifest"]).is_file() and resolve_path(cfg["data"]["train_manifest"]).is_file():
        log(f"note: the checkpoint's training manifest {data['train_manifest']} is gone; using the config's")
        return dict(cfg["data"])
    return data


def training_embeddings(data: dict, embed_paths, utts_per_speaker: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Whole-utterance embeddings of the training manifest (``utts_per_speaker`` each, 0 = all) and the
    speaker of each row. ``embed_paths(paths, bad_audio_policy, store_corpus) -> (embeddings, indices of the
    usable paths)``; ``store_corpus`` is the whole manifest's ``(paths, keys)``, whose on-disk feature store
    (the one training reads: ``svlab.feature_cache.training_store_corpus``) holds the features of ``paths``."""
    root, manifest = resolve_path(data["root"]), resolve_path(data["train_manifest"])
    ensure_demo_corpus(*training_roots(data), log=log)
    utts = read_corpora(data["corpora"]) if data.get("corpora") else read_manifest(manifest, key="data.train_manifest")
    corpus = training_store_corpus(utts, root)  # before the per-speaker subset: training's store holds them all
    if utts_per_speaker > 0:
        count: dict[str, int] = {}
        kept = []
        for u in utts:
            if count.get(u.speaker, 0) < utts_per_speaker:
                count[u.speaker] = count.get(u.speaker, 0) + 1
                kept.append(u)
        utts = kept
    if not data.get("corpora"):  # read_corpora checked each corpus's own root; data.root is unused then
        check_root(root, utts, "data.root", manifest)
    t0 = time.perf_counter()
    emb, kept_idx = embed_paths([u.path(root) for u in utts], data.get("bad_audio", "error"), corpus)
    speakers = np.array([utts[i].speaker for i in kept_idx])
    log(f"training-set embeddings for the back-end: {len(emb)} utterances of {len(set(speakers.tolist()))} "
        f"speakers ({time.perf_counter() - t0:.1f}s)")
    return emb, speakers


# --------------------------------------------------------------------------------------------------
# The fitted back-end and scoring with it
# --------------------------------------------------------------------------------------------------
@dataclass
class FittedBackend:
    """Everything a scoring system needs besides the embeddings (all optional)."""
    mean: np.ndarray | None = None
    plda: plda_backend.PLDA | None = None
    calibrator: calibration.ScoreCalibrator | None = None
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


def fit_backend(opts: ScoringOptions, train_emb: np.ndarray, train_spk: np.ndarray, log=print) -> FittedBackend:
    """Fit centering mean, PLDA, AS-norm cohort and calibrator on training-set embeddings.

    With calibration, the training speakers are split (``calibration.split_calibration_speakers``): PLDA,
    cohort and mean use only the fit speakers; the calibrator is fitted on trials among the held-apart
    speakers scored by the very same system.
    """
    info: dict = {"training_utterances": int(len(train_emb)), "training_speakers": len(set(train_spk.tolist()))}
    fit = np.ones(len(train_emb), dtype=bool)
    if opts.calibrate:
        try:
            fit_spk, held_spk = calibration.split_calibration_speakers(train_spk.tolist(), opts.calibration_fraction,
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
        fb.plda = plda_backend.PLDA().fit(x[fit], train_spk[fit], lda_dim=opts.plda_lda_dim or None,
                                          length_norm=True)
        info.update(plda_dim=fb.plda.dim, plda_lda_dim=opts.plda_lda_dim)
    if opts.score_norm == "asnorm":
        fb.cohort, fb.cohort_speakers = scoring.speaker_means(x[fit], train_spk[fit],
                                                              normalize=opts.backend == "cosine")
        info["cohort_size"] = int(len(fb.cohort))
        if opts.asnorm_top_n > len(fb.cohort):
            log(f"note: AS-norm top-N {opts.asnorm_top_n} > cohort of {len(fb.cohort)} speakers; using all of them")
    if opts.calibrate:
        held_emb, held_spk = train_emb[~fit], train_spk[~fit]
        ia, ib, tgt = calibration.make_trials_from_labels(held_spk, max_trials=opts.calibration_trials,
                                                           seed=SPLIT_SEED)
        raw = score_trials(fb, opts, held_emb, ia, ib)
        fb.calibrator = calibration.ScoreCalibrator().fit(raw, tgt, prior=0.5)
        info.update(calibration_trials=int(tgt.size), calibration_eer=metrics.compute_eer(raw, tgt)[0],
                    calibration_a=fb.calibrator.a, calibration_b=fb.calibrator.b)
        log(f"calibrator fitted on {tgt.size} trials of {len(set(held_spk.tolist()))} held-apart training "
            f"speakers (their EER {info['calibration_eer'] * 100:.2f}%): llr = {fb.calibrator.a:.4f} * score "
            f"+ {fb.calibrator.b:.4f}")
    return fb


# --------------------------------------------------------------------------------------------------
# Saved back-ends: backend.npz (svlab.backend) and cohort.npz
# --------------------------------------------------------------------------------------------------
def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(checkpoint: Path | None, feat_cfg: dict) -> str:
    """Identity of what made the embeddings: the checkpoint file, or the features of the baseline."""
    if checkpoint is None:
        return "baseline-" + _sha(feat_cfg)
    return plda_backend.checkpoint_fingerprint(checkpoint)


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
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
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
        raise BackendError(f"{path} is not a readable cohort file ({type(e).__name__}); "
                           "pass --retrain_backend") from None
    if meta.get("format") != COHORT_FORMAT:
        raise BackendError(f"{path} is not a cohort file of this project")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise BackendError(f"{path} was made for another checkpoint or other settings")
    return (cohort if cohort.size else None), (mean if mean.size else None), meta.get("speakers", [])


def complete(fb: FittedBackend, opts: ScoringOptions) -> bool:
    """Whether ``fb`` has every part the options need."""
    return not ((opts.backend == "plda" and fb.plda is None) or (opts.calibrate and fb.calibrator is None)
                or (opts.score_norm == "asnorm" and fb.cohort is None) or (opts.center and fb.mean is None))


def load_saved_backend(folder: Path, opts: ScoringOptions, fingerprint: str, log=print) -> FittedBackend | None:
    """The back-end saved in an evaluation folder if it fits ``fingerprint``, else None (with a note)."""
    fb = FittedBackend()
    try:
        if opts.backend == "plda" or opts.calibrate:
            path = folder / BACKEND_FILE
            if not path.is_file():
                return None
            saved = plda_backend.read_backend_meta(path).get("fingerprint", "")
            if saved != fingerprint:
                same_ckpt = saved.split("+")[0] == fingerprint.split("+")[0]
                log(f"note: {path} was fitted {'with other settings' if same_ckpt else 'for another checkpoint'}; "
                    "refitting the back-end")
                return None
            fb.plda, fb.calibrator, fb.info = plda_backend.load_backend(path, fingerprint)
        if opts.score_norm == "asnorm" or opts.center:
            path = folder / COHORT_FILE
            if not path.is_file():
                return None
            fb.cohort, fb.mean, fb.cohort_speakers = load_cohort(path, fingerprint)
    except BackendError as e:
        log(f"note: {e}; refitting the back-end")
        return None
    return fb if complete(fb, opts) else None


def prepare_backend(opts: ScoringOptions, out_dir: Path, fingerprint: str, retrain: bool, train_data_fn,
                    log=print, save_dir: Path | None = None) -> tuple[FittedBackend, bool]:
    """Load the evaluation folder's saved back-end or fit (and save) a new one; returns (backend, reused).

    ``train_data_fn() -> (embeddings, speakers)`` is called only when a back-end has to be fitted. The
    back-end files go to ``save_dir`` (default ``out_dir``; a reused one is copied there), so that a new
    evaluation can be written apart from the old one and swapped in whole (``svlab.evaluation``)."""
    if not opts.needs_training_data:
        return FittedBackend(), False
    save_dir = Path(save_dir) if save_dir is not None else Path(out_dir)
    files = ([BACKEND_FILE] if (opts.backend == "plda" or opts.calibrate) else []) \
        + ([COHORT_FILE] if (opts.score_norm == "asnorm" or opts.center) else [])
    if not retrain:
        fb = load_saved_backend(out_dir, opts, fingerprint, log)
        if fb is not None:
            log(f"reusing the back-end saved in {out_dir} (--retrain_backend to refit)")
            if save_dir != Path(out_dir):
                save_dir.mkdir(parents=True, exist_ok=True)
                for name in files:
                    atomic_write(save_dir / name, lambda tmp, src=Path(out_dir) / name: shutil.copyfile(src, tmp))
            return fb, True
    train_emb, train_spk = train_data_fn()
    fb = fit_backend(opts, train_emb, train_spk, log=log)
    save_dir.mkdir(parents=True, exist_ok=True)
    if BACKEND_FILE in files:
        plda_backend.save_backend(save_dir / BACKEND_FILE, fb.plda, fb.calibrator, fingerprint,
                                  extra={"info": fb.info, "system": opts.label})
    if COHORT_FILE in files:
        save_cohort(save_dir / COHORT_FILE, fb, fingerprint)
    return fb, False


def fit_or_load_backend(opts: ScoringOptions, cfg: dict, state: dict | None, checkpoint: Path | None, feat_cfg: dict,
                        out_dir: Path, retrain: bool, embed_paths, log=print,
                        save_dir: Path | None = None) -> tuple[FittedBackend, dict]:
    """The back-end of an evaluation (empty for plain cosine) and what ``metrics.json`` records about it.

    ``embed_paths(paths, bad_audio_policy, store_corpus) -> (embeddings, indices of the usable paths)``
    embeds training audio the way the test audio was embedded (``training_embeddings``). A back-end saved in
    ``out_dir`` is reused when it fits; the back-end files are written to ``save_dir`` (default ``out_dir``).
    """
    if not opts.needs_training_data:
        return FittedBackend(), {}
    data = training_data_section(cfg, state, log)
    fingerprint = f"{source_fingerprint(checkpoint, feat_cfg)}+{_sha(backend_settings(opts, data))}"
    fb, reused = prepare_backend(
        opts, out_dir, fingerprint, retrain,
        lambda: training_embeddings(data, embed_paths, opts.backend_utts_per_speaker, log), log=log,
        save_dir=save_dir)
    return fb, {"training_data": {"root": str(data["root"]), "train_manifest": str(data["train_manifest"])},
                "backend_info": fb.info, "backend_reused": reused,
                "backend_file": BACKEND_FILE if (opts.backend == "plda" or opts.calibrate) else None,
                "cohort_file": COHORT_FILE if (opts.score_norm == "asnorm" or opts.center) else None}

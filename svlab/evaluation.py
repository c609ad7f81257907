"""Evaluations of a checkpoint on a trial list: where they go, what they write, how to find them again.

An evaluation folder (``evaluation_folder``) holds

    scores.txt      ENROLL TEST SCORE, one line per trial (scores_llr.txt: calibrated LLRs)
    metrics.json    EER and its threshold, minDCF, the scoring system, the checkpoint's fingerprint
    roc.png  det.png  hist.png
    backend.npz  cohort.npz     the fitted back-end, if the system has one (svlab.scoring_system)

and every evaluation of a checkpoint is recorded in ``<checkpoint folder>/evaluations.json``
(``record_evaluation``), so ``tools/verify.py`` finds the last one wherever ``--out`` put it
(``evaluations_of``) and rebuilds its scoring system (``load_system``).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from svlab import metrics
from svlab.audio import load_audio
from svlab.backend import checkpoint_fingerprint, load_backend, read_backend_meta
from svlab.checkpoint import describe_mismatch
from svlab.config import config_path_value, explicit_keys
from svlab.demo_corpus import ensure_demo_corpus
from svlab.embedding import checkpoint_features, embed_files
from svlab.errors import BackendError, CheckpointError, DataError
from svlab.features import mfcc
from svlab.files import atomic_write
from svlab.manifests import Trial, Utterance, overlap_warning, read_manifest, read_trials
from svlab.plots import plot_det, plot_roc, plot_score_hist
from svlab.scoring_system import FittedBackend, ScoringOptions, complete, load_cohort, options_of_evaluation

EVAL_INDEX = "evaluations.json"
EVAL_PREFIX = "eval_"          # eval_<NNN><system suffix>, next to the checkpoint
BASELINE_PREFIX = "baseline"   # baseline<system suffix>, in train.save_dir
PLOTS = {"roc": "roc.png", "det": "det.png", "hist": "hist.png"}


def evaluation_folder(checkpoint: Path | None, opts: ScoringOptions | None = None, cfg: dict | None = None) -> Path:
    """Default output folder of an evaluation: ``<checkpoint folder>/eval_<NNN><suffix>`` (``NNN``: the
    checkpoint's file name without ``checkpoint_``), or for the no-training baseline (``checkpoint``
    None) ``<train.save_dir of cfg>/baseline<suffix>``. ``suffix`` names the scoring system
    (``ScoringOptions.suffix``, '' for plain cosine and when ``opts`` is None)."""
    suffix = opts.suffix if opts is not None else ""
    if checkpoint is None:
        return config_path_value(cfg, "train.save_dir") / f"{BASELINE_PREFIX}{suffix}"
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{EVAL_PREFIX}{checkpoint.stem.replace('checkpoint_', '')}{suffix}"


# --------------------------------------------------------------------------------------------------
# The test set
# --------------------------------------------------------------------------------------------------
@dataclass
class TestTrials:
    """The trial list and the test utterances it needs (``needed``: relative paths, first-use order)."""
    trials_path: Path
    trials: list[Trial]
    utterances: list[Utterance]
    needed: list[str]


def read_test_trials(cfg: dict, log=print) -> TestTrials:
    """Read ``test.trials`` and ``test.test_manifest`` (generating the demo corpus if it is the test root)."""
    ensure_demo_corpus(cfg["test"]["root"], log=log)
    trials_path = config_path_value(cfg, "test.trials")
    manifest = config_path_value(cfg, "test.test_manifest")
    trials = read_trials(trials_path, key="test.trials")
    utterances = read_manifest(manifest, key="test.test_manifest")
    needed = trial_utterances(trials, {u.relpath for u in utterances}, trials_path, manifest)
    return TestTrials(trials_path, trials, utterances, needed)


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


def checkpoint_settings(cfg: dict, state: dict, checkpoint: Path, test: TestTrials, log=print) -> dict:
    """Feature settings to embed the test set with (the checkpoint's); refuses model/feature settings the
    user gave that contradict the checkpoint, and notes test speakers the model was trained on."""
    diff = describe_mismatch(state["config"], cfg, only_keys=explicit_keys(cfg))
    if diff:
        raise CheckpointError(f"{checkpoint} does not match the settings you gave: {'; '.join(diff)}. A checkpoint "
                              "is evaluated with its own model/feature settings: drop those --set/--config keys "
                              "or pick a checkpoint trained with them")
    feat_cfg = checkpoint_features(cfg, state, log)
    note = overlap_warning(state["config"].get("data", cfg["data"])["train_manifest"], test.utterances)
    if note:
        log(note)
    return feat_cfg


def mfcc_stats_embeddings(paths: list[Path], feat_cfg: dict) -> np.ndarray:
    """No-training baseline: mean and standard deviation of raw (not mean-normalised) MFCCs."""
    rows = []
    for p in paths:
        f = mfcc(load_audio(p, feat_cfg["sample_rate"]), feat_cfg, mean_norm=False)
        rows.append(np.concatenate([f.mean(axis=1), f.std(axis=1)]))
    return np.stack(rows).astype(np.float32)


def training_embedder(model, feat_cfg: dict, batch_size: int, device, log=print):
    """``embed_paths(paths, bad_audio_policy) -> (embeddings, indices of the usable paths)`` for fitting a
    back-end on training audio: embeddings of ``model``, or MFCC statistics for the baseline (``model`` None)."""
    def embed_paths(paths, policy):
        if model is None:
            return mfcc_stats_embeddings(paths, feat_cfg), list(range(len(paths)))
        e, kept, problems = embed_files(model, paths, feat_cfg, batch_size, device, policy=policy, log=log,
                                        desc="train MFCC")
        if problems:
            log(f"note: {len(problems)} unusable training file(s) left out of the back-end (data.bad_audio: skip)")
        return e, kept
    return embed_paths


# --------------------------------------------------------------------------------------------------
# metrics.json
# --------------------------------------------------------------------------------------------------
def describe_run(opts: ScoringOptions, checkpoint: Path | None, state: dict | None, test: TestTrials,
                 n_utterances: int, system: str, embed_seconds: float, score_seconds: float) -> dict:
    """What ``metrics.json`` records about the evaluation besides the error rates."""
    return {
        "n_utterances": int(n_utterances),
        "checkpoint": str(checkpoint) if checkpoint else None, "epoch": state["epoch"] if state else None,
        "trials": str(test.trials_path), "backend": opts.label, "scorer": opts.backend, "score_norm": opts.score_norm,
        "asnorm_top_n": opts.asnorm_top_n if opts.score_norm == "asnorm" else None, "center": opts.center,
        "calibrated": opts.calibrate, "system": system,
        "embed_seconds": round(embed_seconds, 3), "score_seconds": round(score_seconds, 4),
        "fingerprint": checkpoint_fingerprint(checkpoint) if checkpoint else None,
        "evaluated_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "plots": dict(PLOTS),
    }


def calibration_metrics(fb: FittedBackend, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Calibrated LLRs of ``scores`` and their quality: actual DCF at the Bayes thresholds, Cllr."""
    cal = fb.calibrator
    llr = cal.transform(scores)
    out: dict = {}
    for p in metrics.DCF_TARGETS:
        bt = metrics.bayes_threshold(p)
        out[f"actual_dcf_{p:g}"] = metrics.actual_dcf(llr, labels, bt, p_target=p)
        out[f"bayes_llr_threshold_{p:g}"] = bt
        if cal.a > 0:
            out[f"bayes_score_threshold_{p:g}"] = (bt - cal.b) / cal.a
    out["calibration"] = {"a": cal.a, "b": cal.b, "prior": cal.prior, "cllr": metrics.cllr(llr, labels),
                          "min_cllr": metrics.min_cllr(llr, labels)}
    out["cllr"], out["min_cllr"] = out["calibration"]["cllr"], out["calibration"]["min_cllr"]
    return llr, out


def log_details(result: dict, opts: ScoringOptions, out_dir: Path, log=print) -> None:
    """The lines printed after the lab's ``Epoch=.. EER= .. Thres= ..`` line."""
    log(f"minDCF(0.01)= {result['min_dcf_0.01']:.4f} minDCF(0.001)= {result['min_dcf_0.001']:.4f} | "
        f"{result['n_target']} target / {result['n_nontarget']} non-target trials | {opts.label} | {out_dir}")
    if opts.calibrate:
        log(f"actDCF(0.01)= {result['actual_dcf_0.01']:.4f} actDCF(0.001)= {result['actual_dcf_0.001']:.4f} "
            f"(Bayes thresholds: LLR >= {result['bayes_llr_threshold_0.01']:.2f} / "
            f"{result['bayes_llr_threshold_0.001']:.2f}) Cllr= {result['cllr']:.4f} minCllr= {result['min_cllr']:.4f}")


# --------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------
def _write_scores(path: Path, trials: list[Trial], scores) -> None:
    lines = "".join(f"{t.enroll} {t.test} {s:.6f}\n" for t, s in zip(trials, scores))
    atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def write_outputs(out_dir: Path, test: TestTrials, scores: np.ndarray, labels: np.ndarray, fpr, fnr, result: dict,
                  opts: ScoringOptions, checkpoint: Path | None, llr: np.ndarray | None = None) -> None:
    """scores.txt (and scores_llr.txt), roc.png, det.png, hist.png and metrics.json in ``out_dir``.

    ``fpr`` / ``fnr``: the ROC's false-accept and false-reject rates (threshold decreasing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_scores(out_dir / "scores.txt", test.trials, scores)
    if llr is not None:
        _write_scores(out_dir / "scores_llr.txt", test.trials, llr)
    label = result["system"]
    source = Path(checkpoint).name if checkpoint else "no checkpoint"
    title = f"{source} ({opts.label}) on {Path(test.trials_path).name}"
    score_name = {"cosine": "cosine score", "plda": "PLDA log-likelihood ratio"}[opts.backend]
    if opts.score_norm == "asnorm":
        score_name = f"AS-norm {score_name}"
    eer, thr = result["eer"], result["threshold"]
    plot_roc(fpr, fnr, eer, thr, out_dir / PLOTS["roc"], label=label, title=f"ROC: {title}")
    dcf_thr = result["min_dcf_0.01_threshold"]
    far, frr = metrics.error_rates_at(scores, labels, dcf_thr)
    plot_det(fpr, fnr, eer, thr, out_dir / PLOTS["det"], dcf_point=(far, frr, result["min_dcf_0.01"], dcf_thr),
             label=label, title=f"DET: {title}")
    plot_score_hist(scores, labels, thr, out_dir / PLOTS["hist"], label=label, title=f"Scores: {title}",
                    score_name=score_name)
    atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n",
                                                                      encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# The evaluation index
# --------------------------------------------------------------------------------------------------
def _portable(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (so a copied run folder keeps working), else absolute."""
    path, base = Path(path).resolve(), Path(base).resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def read_evaluation_index(index_file: Path) -> dict:
    """``{checkpoint file name: [entries, latest last]}`` of an ``evaluations.json`` ({} if absent/unreadable)."""
    try:
        data = json.loads(Path(index_file).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


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


def evaluations_of(checkpoint: Path) -> list[Path]:
    """metrics.json files of the evaluations of ``checkpoint``, most recent last.

    From ``<folder>/evaluations.json`` (entries under the checkpoint's file name, or under any name
    with the same file fingerprint, e.g. the final copy of the last epoch), else the default
    evaluation folder of the checkpoint.
    """
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent
    index = read_evaluation_index(folder / EVAL_INDEX)
    fp = checkpoint_fingerprint(checkpoint)
    entries = list(index.get(checkpoint.name, []))
    entries += [e for name, es in index.items() if name != checkpoint.name for e in es
                if e.get("fingerprint") == fp]
    entries.sort(key=lambda e: e.get("time") or "")
    fresh = [e for e in entries if e.get("fingerprint") in (None, fp)]
    entries = fresh or entries  # only stale ones: load_system then says the checkpoint changed
    found = []
    for e in entries:
        p = Path(e["metrics"])
        p = p if p.is_absolute() else folder / p
        if p.is_file() and p not in found:
            found.append(p)
    default = evaluation_folder(checkpoint) / "metrics.json"
    if not found and default.is_file():
        found.append(default)
    return found


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
    opts = options_of_evaluation(m)
    fp = None
    if checkpoint is not None:
        fp = checkpoint_fingerprint(Path(checkpoint))
        if m.get("fingerprint") and m["fingerprint"] != fp:
            raise DataError(f"{metrics_path} evaluated another version of {Path(checkpoint).name} (the file "
                            f"changed since, e.g. retrained); run EER.py on it again")
    fb = FittedBackend()
    folder = metrics_path.parent
    if m.get("backend_file"):
        path = folder / m["backend_file"]
        fb.plda, fb.calibrator, fb.info = load_backend(path, None)
        saved = read_backend_meta(path).get("fingerprint", "")
        if fp is not None and saved.split("+")[0] != fp:
            raise BackendError(f"{path} was fitted for another checkpoint; run EER.py again")
    if m.get("cohort_file"):
        fb.cohort, fb.mean, fb.cohort_speakers = load_cohort(folder / m["cohort_file"], None)
    if not complete(fb, opts):
        raise BackendError(f"the back-end files of {folder} are missing; run EER.py again")
    return opts, fb, m

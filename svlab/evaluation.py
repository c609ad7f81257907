"""Evaluations of a checkpoint on a trial list: where they go, what they write, how to find them again.

An evaluation folder (``evaluation_folder``) holds

    scores.txt      ENROLL TEST SCORE, one line per trial (scores_llr.txt: calibrated LLRs)
    metrics.json    EER and its threshold, minDCF, the scoring system, the trial list, the checkpoint's fingerprint
    roc.png  det.png  hist.png
    backend.npz  cohort.npz     the fitted back-end, if the system has one (svlab.scoring_system)

It is named after the checkpoint, the scoring system and, when it is not the run's own test trial
list, the trial list (``eval_030``, ``eval_030_plda``, ``eval_030_trials_hard-3fa9c1``); the no-training
baseline goes to ``<train.save_dir>/baseline_<trial list>``. An evaluation is written into a hidden
sibling folder and swapped in whole (``EvaluationFolder``, ``svlab.safe_update``): a folder is all old
or all new, and an evaluation never replaces one of another trial list.

Every evaluation of a checkpoint is recorded in ``<checkpoint folder>/evaluations.json``
(``record_evaluation``; an unreadable index is kept aside, never silently replaced), so
``tools/verify.py`` finds them wherever ``--out`` put them (``evaluation_entries``), picks the one
to decide with (``decision_evaluation``) and rebuilds its scoring system (``load_system``).

``EER.py``, ``tools/verify.py`` and ``tools/report.py`` take the data and test settings from the run
itself (``with_run_settings``) unless the user gave them explicitly.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from svlab import confidence, metrics
from svlab.audio import load_audio
from svlab.backend import checkpoint_fingerprint, load_backend, read_backend_meta
from svlab.checkpoint import describe_mismatch
from svlab.config import CHOICES, PROJECT_ROOT, config_path_value, explicit_keys, is_foreign_path, resolve_path
from svlab.demo_corpus import ensure_demo_corpus
from svlab.embedding import checkpoint_features, embed_files
from svlab.errors import BackendError, CheckpointError, DataError, FileWriteError, LabError
from svlab.feature_cache import TRAINING_AUDIO_FIX
from svlab.features import BATCH_FRAMES, mfcc
from svlab.files import atomic_write
from svlab.guard import one_line
from svlab.manifests import Trial, Utterance, overlap_warning, read_manifest, read_trials
from svlab.plots import plot_det, plot_roc, plot_score_hist
from svlab.files import read_json_index
from svlab.safe_update import StagedFolder
from svlab.scoring_system import (BACKEND_FILE, COHORT_FILE, FittedBackend, ScoringOptions, complete, load_cohort,
                                  options_of_evaluation)

EVAL_INDEX = "evaluations.json"
EVAL_PREFIX = "eval_"          # eval_<NNN>[_<trial list>]<system suffix>, next to the checkpoint
BASELINE_PREFIX = "baseline"   # baseline_<trial list><system suffix>, in train.save_dir
PLOTS = {"roc": "roc.png", "det": "det.png", "hist": "hist.png"}
EMBEDDINGS = ("embeddings.npy", "embeddings_index.txt", "xvector.ark", "xvector.scp")  # the last two: Kaldi's
# every file an evaluation writes: anything else in an evaluation folder is the user's and is kept
EVAL_FILES = frozenset({"scores.txt", "scores_llr.txt", "metrics.json", *PLOTS.values(), BACKEND_FILE, COHORT_FILE,
                        *EMBEDDINGS})


def evaluation_folder(checkpoint: Path | None, opts: ScoringOptions | None = None, cfg: dict | None = None,
                      trials_tag: str = "") -> Path:
    """Default output folder of an evaluation: ``<checkpoint folder>/eval_<NNN>[_<trials_tag>]<suffix>``
    (``NNN``: the checkpoint's file name without ``checkpoint_``), or for the no-training baseline
    (``checkpoint`` None) ``<train.save_dir of cfg>/baseline[_<trials_tag>]<suffix>``. ``suffix`` names
    the scoring system (``ScoringOptions.suffix``, '' for plain cosine and when ``opts`` is None);
    ``trials_tag`` the trial list (``trials_tag()``: '' for the run's own)."""
    suffix = opts.suffix if opts is not None else ""
    tag = f"_{trials_tag}" if trials_tag else ""
    if checkpoint is None:
        return config_path_value(cfg, "train.save_dir") / f"{BASELINE_PREFIX}{tag}{suffix}"
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{EVAL_PREFIX}{checkpoint.stem.replace('checkpoint_', '')}{tag}{suffix}"


# --------------------------------------------------------------------------------------------------
# The run's own settings and trial list
# --------------------------------------------------------------------------------------------------
RUN_SECTIONS = ("data", "test")
NOT_FROM_RUN = frozenset({"test.model_path"})  # which checkpoint to evaluate is decided before


def _same_kind(value, default) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return type(value) is type(default)


def with_run_settings(cfg: dict, state: dict | None, source: object, log=print) -> dict:
    """``cfg`` with the ``data`` and ``test`` settings the run was trained with (recorded in the
    checkpoint, ``state['config']``) for every key the user did not give with ``--config`` / ``--set``
    (``svlab.config.explicit_keys``): a run is evaluated on its own trial list, not on whatever
    ``config.yaml`` says today. One line names what was taken from the run."""
    recorded = (state or {}).get("config")
    if not isinstance(recorded, dict):
        return cfg
    explicit = explicit_keys(cfg)
    out = {**cfg, "_sources": dict(cfg.get("_sources", {}))}
    taken, ignored = [], []
    for section in RUN_SECTIONS:
        rec, cur = recorded.get(section), cfg.get(section)
        if not isinstance(rec, dict) or not isinstance(cur, dict):
            continue
        merged = dict(cur)
        for k, v in rec.items():
            key = f"{section}.{k}"
            if k not in merged or key in explicit or key in NOT_FROM_RUN or v == merged[k]:
                continue
            if not _same_kind(v, merged[k]) or (key in CHOICES and v not in CHOICES[key]) \
                    or (isinstance(v, str) and is_foreign_path(v)):  # a path of the machine it was trained on
                ignored.append(key)
                continue
            merged[k] = float(v) if isinstance(merged[k], float) else v
            out["_sources"][key] = f"{source} (the run's recorded settings)"
            taken.append(f"{key}={v}")
        out[section] = merged
    if taken:
        log(f"note: using the run's own settings recorded in {source}: {'; '.join(taken)} "
            "(give others with --config or --set)")
    if ignored:
        log(f"note: ignoring unusable recorded settings of {source}: {', '.join(ignored)}")
    return out


def trial_list_id(trials: list[Trial]) -> str:
    """Identity of a trial list's content (the pairs and labels, separators and line endings aside)."""
    h = hashlib.sha1()
    for t in trials:
        h.update(f"{t.enroll}\t{t.test}\t{t.label}\n".encode("utf-8"))
    return h.hexdigest()[:12]


def _same_path(a, b) -> bool:
    try:
        return os.path.normcase(str(resolve_path(a))) == os.path.normcase(str(resolve_path(b)))
    except LabError:
        return False


def display_path(path) -> str:
    """A path as the user wrote it in a config: relative to the project folder when inside it."""
    try:
        return Path(path).resolve().relative_to(PROJECT_ROOT.resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


class TrialListRef:
    """A trial list known by its path; its content identity is read only when a path comparison fails."""

    def __init__(self, path, trials_id: str | None = None):
        self.path = Path(path)
        self._id, self._read = trials_id, trials_id is not None

    @property
    def id(self) -> str | None:
        if not self._read:
            self._read = True
            try:
                self._id = trial_list_id(read_trials(self.path))
            except (LabError, OSError):
                self._id = None
        return self._id

    def matches(self, m: dict) -> bool:
        """Whether the evaluation ``m`` (a metrics.json) was made on this trial list (same file or same trials)."""
        if m.get("trials") and _same_path(m["trials"], self.path):
            return True
        return bool(m.get("trials_id")) and m.get("trials_id") == self.id


def run_trial_list(state: dict | None) -> TrialListRef | None:
    """The test trial list a checkpoint's run was trained with (None when it does not record one)."""
    rec = (((state or {}).get("config") or {}).get("test") or {}).get("trials")
    if not isinstance(rec, str) or not rec.strip() or is_foreign_path(rec):  # e.g. trained on Windows
        return None
    return TrialListRef(resolve_path(rec))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:40] or "trials"


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
    id: str = field(default="")

    def ref(self) -> TrialListRef:
        return TrialListRef(self.trials_path, self.id)

    def audio_paths(self, root: Path, keys: list[str]) -> list[Path]:
        """The audio of the test utterances ``keys`` under ``root`` (``Utterance.path``: Kaldi ids too)."""
        of = {u.relpath: u for u in self.utterances}
        return [of[k].path(root) for k in keys]


def read_test_trials(cfg: dict, log=print) -> TestTrials:
    """Read ``test.trials`` and ``test.test_manifest`` (generating the demo corpus if it is the test root)."""
    ensure_demo_corpus(cfg["test"]["root"], log=log)
    trials_path = config_path_value(cfg, "test.trials")
    manifest = config_path_value(cfg, "test.test_manifest")
    trials = read_trials(trials_path, key="test.trials")
    utterances = read_manifest(manifest, key="test.test_manifest")
    needed = trial_utterances(trials, {u.relpath for u in utterances}, trials_path, manifest)
    return TestTrials(trials_path, trials, utterances, needed, trial_list_id(trials))


def trials_tag(test: TestTrials, state: dict | None) -> str:
    """The trial-list part of an evaluation folder's name: '' for the run's own test trial list (the
    one ``state`` records), else ``<file name>-<content id>`` (always for the baseline, ``state`` None)."""
    own = run_trial_list(state) if state is not None else None
    if state is not None and (own is None or own.matches({"trials": str(test.trials_path), "trials_id": test.id})):
        return ""
    return f"{_safe_name(test.trials_path.stem)}-{test.id[:6]}"


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
    note = overlap_warning(state["config"].get("data", cfg["data"]), test.utterances)  # a data section: any corpora
    if note:
        log(note)
    return feat_cfg


def mfcc_stats_embeddings(paths: list[Path], feat_cfg: dict) -> np.ndarray:
    """No-training baseline: mean and standard deviation of raw (not mean-normalised) MFCCs."""
    rows = []
    for p in paths:
        wav = load_audio(p, feat_cfg["sample_rate"], max_seconds=feat_cfg.get("max_seconds"))
        f = mfcc(wav, feat_cfg, mean_norm=False)
        rows.append(np.concatenate([f.mean(axis=1), f.std(axis=1)]))
    return np.stack(rows).astype(np.float32)


def training_embedder(model, feat_cfg: dict, batch_size: int, device, log=print, max_frames: int = BATCH_FRAMES):
    """``embed_paths(paths, bad_audio_policy, store_corpus=None) -> (embeddings, indices of the usable paths)``
    for fitting a back-end on training audio: embeddings of ``model`` (features from the training store of
    ``store_corpus`` when ``features.store`` is on: ``embed_files``), or MFCC statistics for the baseline."""
    def embed_paths(paths, policy, store_corpus=None):
        if model is None:
            return mfcc_stats_embeddings(paths, feat_cfg), list(range(len(paths)))
        e, kept, problems = embed_files(model, paths, feat_cfg, batch_size, device, policy=policy, log=log,
                                        desc="train features", fix=TRAINING_AUDIO_FIX, store_corpus=store_corpus,
                                        max_frames=max_frames)
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
        "trials": str(test.trials_path), "trials_id": test.id, "backend": opts.label, "scorer": opts.backend,
        "score_norm": opts.score_norm, "plda_lda_dim": opts.lda_dim,
        "asnorm_top_n": opts.asnorm_top_n if opts.score_norm == "asnorm" else None, "center": opts.center,
        "calibrated": opts.calibrate, "system": system,
        "embed_seconds": round(embed_seconds, 3), "score_seconds": round(score_seconds, 4),
        "fingerprint": checkpoint_fingerprint(checkpoint) if checkpoint else None,
        "evaluated_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "plots": dict(PLOTS),
    }


def bootstrap_intervals(cfg: dict, test: TestTrials, scores: np.ndarray, labels: np.ndarray) -> dict:
    """``metrics.json``'s 95 % intervals of the EER and minDCF (``eer_ci95``, ``min_dcf_<p>_ci95``, ``ci_method``):
    a bootstrap over the test speakers (``svlab.confidence``), ``test.bootstrap`` replicates (0: none)."""
    return confidence.interval_fields(test.trials, test.utterances, scores, labels, cfg["test"]["bootstrap"])


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


def log_details(result: dict, opts: ScoringOptions, out_dir: Path, log=print, embeddings: int | None = None) -> None:
    """The lines printed after the lab's ``Epoch=.. EER= .. Thres= ..`` line (``embeddings``: how many rows
    ``embeddings.npy`` got, when it was written)."""
    log(f"minDCF(0.01)= {result['min_dcf_0.01']:.4f} minDCF(0.001)= {result['min_dcf_0.001']:.4f} | "
        f"{confidence.intervals_line(result)}{result['n_target']} target / {result['n_nontarget']} non-target "
        f"trials | {opts.label} | {out_dir}")
    if opts.calibrate:
        log(f"actDCF(0.01)= {result['actual_dcf_0.01']:.4f} actDCF(0.001)= {result['actual_dcf_0.001']:.4f} "
            f"(Bayes thresholds: LLR >= {result['bayes_llr_threshold_0.01']:.2f} / "
            f"{result['bayes_llr_threshold_0.001']:.2f}) Cllr= {result['cllr']:.4f} minCllr= {result['min_cllr']:.4f}")
    if embeddings is not None:
        log(f"embeddings: {out_dir / EMBEDDINGS[0]} ({embeddings} rows, float32), rows listed in "
            f"{out_dir / EMBEDDINGS[1]}; for Kaldi: {out_dir / EMBEDDINGS[3]}")
    log(f"ROC curve: {out_dir / PLOTS['roc']}")


_COMMITTED: list[Path] = []  # evaluation folders this process has put in place (EvaluationFolder)


def interruption_note():
    """``() -> str``: what to say if Ctrl-C / SIGTERM stops the command from now on
    (``svlab.guard.run_command``): the evaluation folder is unchanged, or where the new one is complete."""
    done = len(_COMMITTED)

    def note() -> str:
        new = _COMMITTED[done:]
        return f"interrupted; the new evaluation is complete in {new[-1]}" if new else \
            "interrupted; the evaluation folder is unchanged"
    return note


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
    label = one_line(result["system"])  # the checkpoint's tag and file names: escaped in the pictures too
    source = Path(checkpoint).name if checkpoint else "no checkpoint"
    title = one_line(f"{source} ({opts.label}) on {Path(test.trials_path).name}")
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
class EvaluationFolder(StagedFolder):
    """``with EvaluationFolder(out_dir, test, log) as work:`` write the evaluation into ``work.path``; it
    replaces ``out_dir`` whole only when everything is written (``svlab.safe_update.StagedFolder``).

    Refused before any work: ``out_dir`` is a file, a folder holding other things than an evaluation
    (``--out`` at a run folder), or an evaluation of another trial list."""

    def __init__(self, out_dir: Path, test: TestTrials, log=print):
        out_dir = Path(out_dir)
        check_output_folder(out_dir, test)
        super().__init__(out_dir, EVAL_FILES, "evaluation", log)
        self._had_embeddings = (out_dir / EMBEDDINGS[0]).is_file()
        self.after_commit += [lambda: _COMMITTED.append(self.target), self._note_dropped_embeddings]

    def _note_dropped_embeddings(self) -> None:
        if self._had_embeddings and not (self.target / EMBEDDINGS[0]).is_file():
            self.log(f"note: the earlier {EMBEDDINGS[0]} of {self.target} went with the old evaluation "
                     "(--save_embeddings writes it again)")


def check_output_folder(out_dir: Path, test: TestTrials) -> None:
    """Refuse an output folder the evaluation must not replace (see ``EvaluationFolder``)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileWriteError(f"{out_dir} is a file, not an evaluation folder; pass another --out")
    if not out_dir.is_dir():
        return
    metrics_file = out_dir / "metrics.json"
    if not metrics_file.is_file():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EVAL_FILES and not p.name.startswith("."))
        if foreign:
            raise FileWriteError(f"{out_dir} is not an evaluation folder (it holds {', '.join(foreign[:5])}"
                                 f"{', ...' if len(foreign) > 5 else ''}); an evaluation replaces its folder as a "
                                 "whole: pass a new or empty folder to --out")
        return
    m = _read_json(metrics_file)
    if m and m.get("trials") and not test.ref().matches(m):
        raise FileWriteError(f"{out_dir} holds an evaluation of another trial list ({m['trials']}); this one is "
                             f"of {test.trials_path}. An evaluation never replaces one of another trial list: pass "
                             f"another --out, or move {out_dir} away")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def _valid_index(data: dict) -> bool:
    return all(isinstance(es, list) and all(isinstance(e, dict) and isinstance(e.get("metrics"), str) for e in es)
               for es in data.values())


def read_evaluation_index(index_file: Path, log=None, keep_aside: bool = False) -> dict:
    """``{checkpoint file name: [entries, latest last]}`` of an ``evaluations.json`` ({} if absent).

    An unreadable index is noted (``log``) and ignored, or with ``keep_aside`` (before writing a new
    one) renamed to ``evaluations.json.unreadable-<time>`` (``svlab.files.read_json_index``)."""
    return read_json_index(index_file, _valid_index, log or (lambda *a: None), keep_aside=keep_aside)


def record_evaluation(checkpoint: Path, metrics_path: Path, result: dict, log=print) -> Path:
    """Add this evaluation to ``<checkpoint folder>/evaluations.json`` (latest last per checkpoint)."""
    checkpoint = Path(checkpoint)
    index_file = checkpoint.parent / EVAL_INDEX
    index = read_evaluation_index(index_file, log, keep_aside=True)
    entry = {"metrics": _portable(metrics_path, checkpoint.parent), "system": result.get("backend"),
             "eer": result["eer"], "threshold": result["threshold"], "fingerprint": result.get("fingerprint"),
             "trials": result.get("trials"), "trials_id": result.get("trials_id"), "time": result.get("evaluated_at")}
    entries = [e for e in index.get(checkpoint.name, []) if e.get("metrics") != entry["metrics"]]
    index[checkpoint.name] = entries + [entry]
    atomic_write(index_file, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))
    return index_file


def evaluation_entries(checkpoint: Path, log=None) -> list[tuple[Path, dict]]:
    """``(metrics.json, its contents)`` of the evaluations of ``checkpoint``, oldest first.

    From ``<folder>/evaluations.json`` (entries under the checkpoint's file name, or under any name
    with the same file fingerprint, e.g. the final copy of the last epoch) and the ``eval_*`` folders
    next to it that evaluated this very file (so a lost index loses nothing). Evaluations of an
    earlier version of the file count only when there is no other (``load_system`` then says so).
    """
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent
    index = read_evaluation_index(folder / EVAL_INDEX, log)
    fp = checkpoint_fingerprint(checkpoint)
    listed = [Path(e["metrics"]) for name, es in index.items() for e in es
              if name == checkpoint.name or e.get("fingerprint") == fp]
    candidates = [(p if p.is_absolute() else folder / p, True) for p in listed]
    candidates += [(p, False) for p in sorted(folder.glob(f"{EVAL_PREFIX}*/metrics.json"))]
    default = _key(evaluation_folder(checkpoint) / "metrics.json")
    found, seen = [], set()
    for p, in_index in candidates:
        key = _key(p)
        m = _read_json(p) if key not in seen else None
        seen.add(key)
        if m is not None and "threshold" in m and (in_index or key == default or m.get("fingerprint") == fp):
            found.append((p, m))
    fresh = [(p, m) for p, m in found if m.get("fingerprint") in (None, fp)]
    found = fresh or found
    found.sort(key=lambda pm: str(pm[1].get("evaluated_at") or ""))
    return found


def _key(path: Path) -> str:
    return os.path.normcase(str(Path(path).resolve()))


def evaluations_of(checkpoint: Path) -> list[Path]:
    """metrics.json files of the evaluations of ``checkpoint``, most recent last (``evaluation_entries``)."""
    return [p for p, _ in evaluation_entries(checkpoint)]


def _same_system(m: dict, opts: ScoringOptions) -> bool:
    """Whether evaluation ``m`` scored trials like ``opts`` (calibration aside: it does not change the scores)."""
    norm = m.get("score_norm") or "none"
    return (m.get("scorer") or "cosine", norm, bool(m.get("center"))) == (opts.backend, opts.score_norm, opts.center) \
        and (norm != "asnorm" or m.get("asnorm_top_n") == opts.asnorm_top_n) \
        and int(m.get("plda_lda_dim") or 0) == opts.lda_dim


def decision_evaluation(checkpoint: Path, own: TrialListRef, opts: ScoringOptions, log=None,
                        what: str = "the run's own trial list") -> tuple[Path, dict, str] | None:
    """The evaluation whose EER threshold decides for ``checkpoint``: on the trial list ``own`` (``what``
    names it), with the scoring system ``opts`` (the latest such), else the latest on ``own`` with another
    system; None when ``own`` has none. Returns ``(metrics.json, its contents, why this one)``."""
    on_own = [(p, m) for p, m in evaluation_entries(checkpoint, log) if own.matches(m)]
    same = [(p, m) for p, m in on_own if _same_system(m, opts)]
    if same:
        return (*same[-1], f"{what}, the run's scoring system")
    if on_own:
        return (*on_own[-1], f"{what}; none there used the run's scoring system {opts.label}")
    return None


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

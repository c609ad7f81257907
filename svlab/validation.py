"""Validation during training: the EER and minDCF(0.01) of speakers the network never trains on,
after every epoch (the ``validation:`` section of ``config.yaml``).

``prepare``          before the model is built: hold some training speakers apart (they leave the
                     training classes), or read a given validation trial list; returns a ``Validator``
``Validator``        ``evaluate(model, device)`` after each epoch (the held-apart utterances embedded
                     with the current model in eval mode, cosine scores, ``svlab.metrics``),
                     ``describe(record)`` for the epoch's log line, ``state`` for the checkpoint
``choose_speakers``  which speakers are held apart (seeded, never the test speakers)
``pairs``            all pairs of the held-apart utterances, or a fixed random sample of them
``best_record``      the epoch with the lowest validation EER; ``write_best`` keeps it in ``best.json``
``epoch_arg`` / ``checkpoint_path``  ``EER.py --cp_num N|best``

Held apart (the default): ``validation.fraction`` of the training speakers, at most
``validation.max_speakers``, at least 2, drawn with ``validation.seed`` from those with at least
``validation.min_utterances`` usable utterances and not in ``test.test_manifest``; up to
``validation.utts_per_speaker`` of each one's utterances (a seeded choice) are embedded: the middle
``validation.max_frames`` frames of each (one length, so few full batches), or whole ones (0). ``validation.mode: auto`` does this only when at least
``validation.min_train_speakers`` speakers remain to train on. The split depends on the manifest and
``validation.seed`` alone (not ``train.seed``: every seed of a recipe trains on the same speakers), is
stored in the checkpoints (``validation``: mode, speakers, utterances) and is what ``--resume`` uses,
whatever the configuration says now; a checkpoint without it (validation off, or a run from before)
resumes with every speaker.

A given list (``validation.trials`` + ``validation.manifest``, audio under ``validation.root``): no
speaker is held apart; a list that shares speakers with the test manifest or the training manifest, or
that is the test trial list itself, gets a warning (the best epoch would be chosen on the test).

Under ``torchrun`` only rank 0 validates (on the model itself, not its DDP wrapper: no collective call);
the other processes wait at the end-of-epoch barrier.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from svlab import metrics
from svlab.checkpoint import epoch_checkpoint_path
from svlab.config import config_path_value, key_source
from svlab.embedding import embed_features
from svlab.errors import CheckpointError, ConfigError, LabError, MetricError
from svlab.feature_cache import load_features, new_speaker_factors, speed_speaker
from svlab.features import BATCH_FRAMES
from svlab.files import atomic_write
from svlab.manifests import overlapping_speakers, read_manifest, read_trials
from svlab.scoring import cosine_scores
from svlab.text import excerpt, printable

VAL_FIELDS = ["val_eer_pct", "val_min_dcf", "val_seconds"]  # train_log.csv columns after the old ones
BEST_FILE = "best.json"  # in the run folder: the epoch with the lowest validation EER


# --------------------------------------------------------------------------- which speakers, which pairs
def choose_speakers(counts: dict[str, int], exclude: set[str], fraction: float, max_speakers: int,
                    min_utterances: int, seed: int) -> list[str]:
    """Sorted speakers to hold apart: ``fraction`` of all ``counts`` speakers (rounded down), at most
    ``max_speakers``, at least 2, drawn with ``seed`` from those with at least ``min_utterances``
    utterances and not in ``exclude``; fewer when fewer qualify (an empty list when fewer than 2)."""
    wanted = max(2, min(int(max_speakers), int(math.floor(fraction * len(counts) + 1e-9))))
    candidates = sorted(s for s, n in counts.items() if n >= min_utterances and s not in exclude)
    if len(candidates) < 2:
        return []
    picked = np.random.default_rng(seed).choice(len(candidates), size=min(wanted, len(candidates)), replace=False)
    return sorted(candidates[i] for i in picked)


def _row_start(i, n: int):
    return i * (2 * n - i - 1) // 2  # pairs (a, b), a < b, in the rows before row i


def pair_at(k, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair number ``k`` of the ``n * (n - 1) / 2`` pairs ``(a, b)``, ``a < b``, in row order."""
    k = np.asarray(k, dtype=np.int64)
    a = n - 2 - np.floor(np.sqrt(4.0 * n * (n - 1) - 8.0 * k - 7.0) / 2.0 - 0.5).astype(np.int64)
    a = np.clip(a, 0, max(n - 2, 0))
    a = np.where(_row_start(a, n) > k, a - 1, a)  # float rounding, either way
    a = np.where(_row_start(a + 1, n) <= k, a + 1, a)
    return a, k - _row_start(a, n) + a + 1


def pairs(speakers: list[str], max_trials: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(a, b, labels)``: every pair of the utterances of ``speakers`` (one name per utterance), or,
    when there are more than ``max_trials``, a uniform random sample of that many (seeded, sorted)."""
    n = len(speakers)
    total = n * (n - 1) // 2
    k = np.arange(total, dtype=np.int64) if total <= max_trials else \
        np.sort(np.random.default_rng(seed).choice(total, size=max_trials, replace=False))
    a, b = pair_at(k, n)
    names = np.asarray(speakers)
    return a, b, (names[a] == names[b]).astype(np.int64)


def _middle(feat: np.ndarray, max_frames: int) -> np.ndarray:
    if not max_frames or feat.shape[1] <= max_frames:
        return feat
    start = (feat.shape[1] - max_frames) // 2
    return feat[:, start:start + max_frames]


# --------------------------------------------------------------------------- the validator
@dataclass
class Validator:
    """What ``evaluate`` scores after each epoch; ``state`` is stored in every checkpoint (None: no
    validation and no speaker held apart, and then the checkpoint is exactly as without this module)."""
    state: dict | None = None
    features: list | None = None
    a: np.ndarray | None = None
    b: np.ndarray | None = None
    labels: np.ndarray | None = None
    batch_size: int = 64
    batch_frames: int = BATCH_FRAMES
    log: object = print

    @property
    def active(self) -> bool:
        return self.features is not None

    def evaluate(self, model, device) -> dict:
        """The validation fields of this epoch's record (``VAL_FIELDS``); ``{}`` when there is no
        validation here (off, or not rank 0). ``model``: the network itself, not a DDP wrapper."""
        if not self.active:
            return {}
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            emb = embed_features(model, self.features, self.batch_size, device, desc="validation",
                                 max_frames=self.batch_frames)
        finally:
            model.train(was_training)
        try:
            m = metrics.summary(cosine_scores(emb, self.a, self.b), self.labels)
        except MetricError as e:  # a network whose embeddings are not finite: say so, keep training
            self.log(f"note: no validation EER this epoch ({e})")
            return {}
        return {"val_eer_pct": 100.0 * m["eer"], "val_min_dcf": m["min_dcf_0.01"],
                "val_seconds": round(time.perf_counter() - t0, 3)}

    @staticmethod
    def describe(record: dict) -> str:
        """`` | val EER 4.12% minDCF 0.321`` for the epoch's log line ('' without validation); the
        seconds it took are in ``train_log.csv`` (``val_seconds``)."""
        if "val_eer_pct" not in record:
            return ""
        return f" | val EER {record['val_eer_pct']:.2f}% minDCF {record['val_min_dcf']:.3f}"


def _hold_apart(dataset, speakers: set[str], aug_cfg: dict | None) -> None:
    """Remove ``speakers`` (and their speed copies) from the training items of ``dataset``
    (``dataset.SpkTrainDataset``) and renumber the classes, as if the manifest never listed them."""
    gone = set(speakers) | {speed_speaker(s, f) for s in speakers for f in new_speaker_factors(aug_cfg)}
    keep = [i for i, u in enumerate(dataset.utterances) if u.speaker not in gone]
    for name in ("utterances", "features", "versions", "speeds"):
        items = getattr(dataset, name)
        if items is not None:
            setattr(dataset, name, [items[i] for i in keep])
    dataset.speakers = sorted({u.speaker for u in dataset.utterances})
    index = {s: i for i, s in enumerate(dataset.speakers)}
    dataset.labels = [index[u.speaker] for u in dataset.utterances]


def _test_speakers(cfg: dict) -> set[str]:
    try:
        return {u.speaker for u in read_manifest(config_path_value(cfg, "test.test_manifest"))}
    except (LabError, OSError):
        return set()  # no readable test manifest: no test speaker to keep out


def prepare(cfg: dict, dataset, stored: dict | None = None, is_main: bool = True, log=print) -> Validator:
    """Hold the validation speakers apart from ``dataset`` (before the model is built: the number of
    classes changes) and load what rank 0 scores after each epoch. ``stored``: on ``--resume``, the
    ``validation`` record of the checkpoint resumed (``svlab.run_folder.saved_validation``; ``{}``: it
    has none), whose split is kept. See the module docstring."""
    v = cfg["validation"]
    usable = [u for i, u in enumerate(dataset.utterances) if u.speaker in dataset.manifest_speakers
              and (dataset.speeds is None or dataset.speeds[i] == 1.0)]
    counts: dict[str, int] = {}
    for u in usable:
        counts[u.speaker] = counts.get(u.speaker, 0) + 1
    if stored is not None:  # --resume: the split of the checkpoint, whatever the config says now
        held, utts = list(stored.get("speakers", [])), list(stored.get("utterances", []))
        if held and v["mode"] == "off":
            log(f"note: validation.mode is off, but this run was started with {len(held)} speakers held apart; "
                "they stay out of training, and no validation EER is computed")
        if stored == {} and v["mode"] != "off" and not v["trials"]:
            log("note: this run's checkpoint was trained on every speaker (no validation when it started); it "
                "resumes without held-apart speakers, so no validation EER")
    elif v["mode"] == "off" or v["trials"]:
        held, utts = [], []
    else:
        held = choose_speakers(counts, _test_speakers(cfg), v["fraction"], v["max_speakers"], v["min_utterances"],
                               v["seed"])
        left = len(counts) - len(held)
        if v["mode"] == "auto" and (not held or left < v["min_train_speakers"]):
            log(f"validation: off (validation.mode auto holds speakers apart only where "
                f"validation.min_train_speakers, {v['min_train_speakers']}, remain: this corpus has {len(counts)}; "
                f"--set validation.mode=on validates on {len(held) or 2} of them)")
            return Validator(log=log)
        if not held or left < 2:
            raise ConfigError(f"{key_source(cfg, 'validation.mode')}: validation.mode is on, but "
                              f"{cfg['data']['train_manifest']} has {len(counts)} speakers, of which "
                              f"{sum(n >= v['min_utterances'] for n in counts.values())} have "
                              f"validation.min_utterances {v['min_utterances']}: too few to hold 2 apart and train "
                              "on 2; set validation.mode off or give validation.trials")
        rng = np.random.default_rng(v["seed"])
        utts = []
        for s in held:
            own = sorted({u.relpath for u in usable if u.speaker == s})
            take = min(len(own), v["utts_per_speaker"])
            utts += [own[i] for i in sorted(rng.choice(len(own), size=take, replace=False))]
    state = None
    if held:
        n_before = len(dataset.speakers)
        _hold_apart(dataset, set(held), cfg.get("augment"))
        state = {"mode": "held_out", "speakers": held, "utterances": utts}
        log(f"validation: {len(held)} of the {len(counts)} training speakers held apart"
            + (" (as saved in the checkpoint)" if stored else f" (validation.seed {v['seed']})")
            + f", {len(utts)} of their utterances; training on the other {len(counts) - len(held)} speakers: "
              f"{len(dataset.speakers)} classes instead of {n_before}")
    if v["mode"] == "off" or not is_main or not (held or v["trials"]):
        return Validator(state=state, log=log)
    if v["trials"]:
        return _given_list(cfg, state, log)
    relpaths = utts
    speaker_of = {u.relpath: u.speaker for u in usable}
    root, audio_of = config_path_value(cfg, "data.root"), {u.relpath: u for u in usable}
    paths = [audio_of[r].path(root) if r in audio_of else root / r for r in relpaths]  # Kaldi ids: their audio
    feats, kept, _ = load_features(paths, cfg["features"], policy="skip", log=log, desc="validation features")
    names = [speaker_of.get(relpaths[i], "?") for i in kept]
    return _validator(cfg, state, feats, names, log)


def _validator(cfg: dict, state: dict | None, feats: list, names: list[str], log, trials=None) -> Validator:
    v = cfg["validation"]
    cropped = sum(bool(v["max_frames"]) and f.shape[1] > v["max_frames"] for f in feats)
    feats = [_middle(f, v["max_frames"]) for f in feats]
    if trials is None:
        a, b, labels = pairs(names, v["max_trials"], v["seed"])
    else:
        a, b, labels = trials
    n_tar = int(labels.sum())
    if n_tar == 0 or n_tar == len(labels):
        log("note: no validation EER: the validation pairs hold no " + ("target" if n_tar == 0 else "non-target")
            + " trial")
        return Validator(state=state, log=log)
    log(f"validation: {len(feats)} utterances of {len(set(names))} speakers, {len(labels)} trials "
        f"({n_tar} target) scored after every epoch"
        + (f"; the middle {v['max_frames']} frames of the {cropped} longer ones" if cropped else ""))
    return Validator(state=state, features=feats, a=a, b=b, labels=labels, batch_size=cfg["test"]["batch_size"],
                     batch_frames=cfg["test"]["batch_frames"], log=log)


def _given_list(cfg: dict, state: dict | None, log) -> Validator:
    """A validation trial list and its manifest (``validation.trials``, ``.manifest``, ``.root``)."""
    from svlab.evaluation import trial_utterances  # scoring machinery: loaded only for a given list
    v = cfg["validation"]
    trials_path = config_path_value(cfg, "validation.trials")
    if not v["manifest"]:
        raise ConfigError(f"{key_source(cfg, 'validation.trials')}: validation.trials is set, but "
                          "validation.manifest is empty; give the manifest (SPEAKER RELPATH) of its utterances")
    manifest = config_path_value(cfg, "validation.manifest")
    root = config_path_value(cfg, "validation.root" if v["root"] else "data.root")
    trials = read_trials(trials_path, key="validation.trials", source=key_source(cfg, "validation.trials"))
    utts = read_manifest(manifest, key="validation.manifest", source=key_source(cfg, "validation.manifest"))
    speaker_of, audio_of = {u.relpath: u.speaker for u in utts}, {u.relpath: u for u in utts}
    needed = trial_utterances(trials, set(speaker_of), trials_path, manifest)
    _warn_overlap(cfg, trials_path, [speaker_of[r] for r in needed], log)
    if len(trials) > v["max_trials"]:
        pick = np.sort(np.random.default_rng(v["seed"]).choice(len(trials), size=v["max_trials"], replace=False))
        trials = [trials[i] for i in pick]
    feats, kept, _ = load_features([audio_of[r].path(root) for r in needed], cfg["features"], policy="error", log=log,
                                   desc="validation features")
    index = {needed[i]: j for j, i in enumerate(kept)}
    a = np.array([index[t.enroll] for t in trials], dtype=np.int64)
    b = np.array([index[t.test] for t in trials], dtype=np.int64)
    labels = np.array([t.label for t in trials], dtype=np.int64)
    log(f"validation: trial list {printable(trials_path)}; no training speaker held apart")
    return _validator(cfg, state, feats, [speaker_of[needed[i]] for i in kept], log, trials=(a, b, labels))


def _warn_overlap(cfg: dict, trials_path: Path, speakers: list[str], log) -> None:
    """Warnings for a given validation list that is, or shares speakers with, the test or training data."""
    try:
        same = trials_path.resolve() == config_path_value(cfg, "test.trials").resolve()
    except (LabError, OSError):
        same = False
    if same:
        log(f"warning: validation.trials is the test trial list ({printable(trials_path)}): the best epoch is then "
            "chosen on the test, and its test EER is optimistic; validate on other speakers")
    for what, key in (("test", "test.test_manifest"), ("training", "data.train_manifest")):
        try:
            other = read_manifest(config_path_value(cfg, key))
        except (LabError, OSError):
            continue
        shared = overlapping_speakers(speakers, other)
        if shared and not same:
            log(f"warning: the validation list shares {len(shared)} speaker(s) with the {what} manifest {key} "
                f"({excerpt(', '.join(shared[:10]), 120)}): "
                + ("the best epoch is then chosen on test speakers, and its test EER is optimistic"
                   if what == "test" else "the network trains on them, so the validation EER is optimistic"))


# --------------------------------------------------------------------------- the best epoch
def best_record(history: list[dict]) -> dict | None:
    """The epoch record with the lowest validation EER (ties: lower minDCF(0.01), then the earlier
    epoch); None when no epoch was validated."""
    scored = [h for h in history if isinstance(h.get("val_eer_pct"), (int, float)) and math.isfinite(h["val_eer_pct"])]
    return min(scored, key=lambda h: (h["val_eer_pct"], h.get("val_min_dcf", math.inf), h["epoch"]), default=None)


def write_best(folder: Path, history: list[dict]) -> int | None:
    """``best.json`` in the run folder for ``history`` (removed when no epoch was validated); returns
    the best epoch, whose checkpoint ``train.keep_checkpoints`` must keep."""
    path = Path(folder) / BEST_FILE
    best = best_record(history)
    if best is None:
        path.unlink(missing_ok=True)
        return None
    data = {"epoch": int(best["epoch"]), "val_eer_pct": best["val_eer_pct"], "val_min_dcf": best.get("val_min_dcf"),
            "checkpoint": epoch_checkpoint_path(Path(folder), int(best["epoch"])).name,
            "chosen_by": "lowest validation EER; ties: lower minDCF(0.01), then the earlier epoch"}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
    return data["epoch"]


def epoch_arg(text: str):
    """``--cp_num``: an epoch number, or ``best`` (the epoch with the lowest validation EER)."""
    if text.strip().lower() == "best":
        return "best"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number or 'best', got {excerpt(repr(text), 40)}") from None


def checkpoint_path(folder: Path, cp_num, log=print) -> Path:
    """The checkpoint of epoch ``cp_num`` in the run folder, or of its best validation epoch for ``best``."""
    folder = Path(folder)
    if cp_num != "best":
        return epoch_checkpoint_path(folder, int(cp_num))
    path = folder / BEST_FILE
    if not path.is_file():
        raise CheckpointError(f"--cp_num best: {folder} has no {BEST_FILE}; this run was trained without validation "
                              "(validation.mode off, or auto with too few speakers); give an epoch number instead")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        epoch = int(data["epoch"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"--cp_num best: {path} is unreadable ({excerpt(str(e), 80)}); the epochs' validation "
                              "EERs are in train_log.csv: give an epoch number instead") from None
    checkpoint = epoch_checkpoint_path(folder, epoch)
    if not checkpoint.is_file():
        raise CheckpointError(f"--cp_num best: the best validation epoch, {epoch} ({BEST_FILE}), has no checkpoint "
                              f"any more ({checkpoint.name} is missing); give an epoch number instead")
    eer, dcf = data.get("val_eer_pct"), data.get("val_min_dcf")
    log(f"--cp_num best: epoch {epoch}, the lowest validation EER"
        + (f" ({float(eer):.2f}%, minDCF(0.01) {float(dcf):.3f})" if isinstance(eer, (int, float))
           and isinstance(dcf, (int, float)) else ""))
    return checkpoint

"""The life of a run folder, ``<train.save_dir>/<train.n_folder>`` (``svlab.checkpoint.run_folder``).

``RunSession``    one ``train.py``'s hold on its folder, from before anything is written to its exit:
                  the lock (``svlab.training.RunLock``, ``.train.lock``: a second ``train.py`` on a busy
                  folder is refused, naming the first; the lock of a process that is gone does not
                  block), a previous run kept aside, the refusal of a reused folder
``prepare``       --overwrite sets the previous run aside in ``.previous/`` (deleted once this run has
                  saved its first checkpoint, put back if it stops before); temporary files of a killed
                  save are removed
``resume_point``  the newest readable resumable checkpoint, and the files skipped on the way
``RunFolder``     what one training run writes there, with the modules whose state it saves:
                  ``config.yaml`` and ``skipped_files.txt`` at the start, ``checkpoint_NNN.pth``,
                  ``train_log.csv``, ``curves.png`` and ``best.json`` (the epoch of lowest validation
                  EER, ``svlab.validation``) every epoch (older checkpoints stripped of the
                  optimiser state, the oldest pruned), ``interrupted.pth`` on a stop, and the lab-named
                  ``<model>_<pooling>_<loss>_checkpoint.pth`` at the end.
``next_command``  the exact command line to run next on this run (``--resume``, ``EER.py``)

Only the main process (rank 0) writes; every file goes through ``atomic_write``.
"""
from __future__ import annotations

import csv
import os
import shlex
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import torch
import yaml

from svlab import distributed as dd
from svlab.checkpoint import (INTERRUPTED, FinetuneSource, describe_mismatch, epoch_checkpoint_path,
                              final_checkpoint_name, list_epoch_checkpoints, load_checkpoint, run_folder,
                              run_location_keys, save_checkpoint)
from svlab.config import DEFAULT_CONFIG, PROJECT_ROOT, get_key, public_config
from svlab.errors import CheckpointError, ConfigError, FileWriteError, LabError, TrainingError
from svlab.features import feature_signature
from svlab.manifests import corpora_record
from svlab.files import atomic_write, stale_temp_files, unused_name
from svlab.models import describe
from svlab.text import excerpt, printable
from svlab.training import RunLock, apply_changed_schedule
from svlab.validation import BEST_FILE, VAL_FIELDS, write_best

LOG_FIELDS = ["epoch", "loss", "acc", "lr", "margin", "seconds"]
RUN_FILES = ["train_log.csv", "curves.png", "skipped_files.txt", "config.yaml", BEST_FILE]  # besides checkpoints
ASIDE = ".previous"          # the previous run, set aside by --overwrite until the first checkpoint
MOVING = ".previous.moving"  # files on their way into or out of ASIDE: always safe to put back
DISCARD = ".previous.discard"  # ASIDE on its way out, once the new run has its first checkpoint
UNREADABLE = ".unreadable"   # suffix given to an unreadable checkpoint that --resume goes past


# --------------------------------------------------------------------------- what a run wrote
def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints of the run in ``folder``: epochs, ``interrupted.pth``, the lab-named copy."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = list(list_epoch_checkpoints(folder).values()) + sorted(folder.glob("*_checkpoint.pth"))
    return found + ([folder / INTERRUPTED] if (folder / INTERRUPTED).is_file() else [])


def run_files(folder: Path) -> list[Path]:
    """Every file a training run wrote in ``folder`` (evaluation folders are not the run's)."""
    folder = Path(folder)
    extra = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    return checkpoint_files(folder) + extra + sorted(folder.glob(f"*{UNREADABLE}"))


def refuse_reuse(folder: Path, resume: bool, overwrite: bool) -> None:
    """Raise ``TrainingError`` if ``folder`` holds checkpoints and neither --resume nor --overwrite
    says what to do with them."""
    existing = list_epoch_checkpoints(folder)
    if (existing or (folder / INTERRUPTED).exists()) and not (resume or overwrite):
        raise TrainingError(
            f"{folder} already holds checkpoints (epochs {min(existing) if existing else 0}-"
            f"{max(existing) if existing else 0}); use --resume to continue, --overwrite to start over, "
            f"or --n_folder NNN for a new run")


def prepare(folder: Path, clear: bool, log=print) -> None:
    """Before a run writes into ``folder``: set the previous run's files aside when ``clear``
    (--overwrite; see ``RunSession``), and remove the temporary files a killed save left."""
    if clear:
        set_aside(folder, log)
    for tmp in stale_temp_files(folder):
        log(f"note: removing {printable(tmp.name)}, left by a run that was killed while writing")
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- --overwrite: the previous run aside
def set_aside(folder: Path, log=print) -> None:
    """Move the previous run's files into ``.previous/`` (through ``.previous.moving/``, so that a kill
    half-way leaves a folder that is simply put back at the next start)."""
    files = run_files(folder)
    if not files:
        return
    moving = folder / MOVING
    try:
        moving.mkdir()
        for p in files:
            os.replace(p, moving / p.name)
        os.replace(moving, folder / ASIDE)
    except OSError as e:
        raise FileWriteError(f"--overwrite: could not set the previous run aside in {folder / ASIDE} "
                             f"({e.strerror or e}); nothing of it was deleted") from e
    log(f"--overwrite: the previous run's {len(files)} file(s) are set aside in {folder / ASIDE}; they are "
        "deleted once this run has saved its first checkpoint, and put back if it stops before")


def _move_back(moving: Path, folder: Path) -> int:
    n = 0
    for p in sorted(moving.iterdir()):
        os.replace(p, folder / p.name)
        n += 1
    moving.rmdir()
    return n


def put_back(folder: Path, log=print, why: str = "this run stopped before its first checkpoint") -> None:
    """Put the previous run back from ``.previous/`` (or a half-done move) and drop what this run
    wrote; never while ``folder`` holds checkpoints of the new run (``TrainingError`` then names both)."""
    aside, moving = folder / ASIDE, folder / MOVING
    if moving.is_dir():  # a move into or out of .previous/ that did not finish: its files are the old run's
        n = _move_back(moving, folder)
        log(f"note: put back {n} file(s) of the previous run that were being moved ({MOVING}/)")
    if not aside.is_dir():
        return
    own = checkpoint_files(folder)
    if own:
        held = sorted(p.name for p in aside.iterdir())
        raise TrainingError(
            f"{aside} holds {len(held)} file(s) of an earlier run ({excerpt(', '.join(held), 120)}) that an "
            f"--overwrite run set aside, and {folder} holds the newer run's checkpoints "
            f"({excerpt(', '.join(p.name for p in own), 120)}); keep one: delete {aside} to keep the newer "
            f"run, or move its files back into {folder} to keep the earlier one")
    for p in run_files(folder):  # this run's config.yaml, skipped_files.txt: it kept nothing
        p.unlink()
    os.replace(aside, moving)
    n = _move_back(moving, folder)
    log(f"{why}: the previous run is back in place ({n} file(s) restored from {ASIDE}/)")


def discard_previous(folder: Path, saved: Path, log=print) -> None:
    """Delete ``.previous/`` now that the new run has saved ``saved``, its first checkpoint."""
    aside = folder / ASIDE
    if aside.is_dir():
        os.replace(aside, folder / DISCARD)
        shutil.rmtree(folder / DISCARD, ignore_errors=True)
        log(f"--overwrite: {saved.name} is saved; the previous run's files ({ASIDE}/) are deleted")


def recover_leftovers(folder: Path, log=print) -> None:
    """At the start of a run, what a killed ``train.py`` left in the middle of --overwrite: a move is
    put back, a deletion finished, and ``.previous/`` restored if the run that set it aside saved no
    checkpoint (else ``TrainingError`` names both). Nothing of an earlier run is deleted unsaid."""
    discard = folder / DISCARD
    if discard.is_dir():
        shutil.rmtree(discard, ignore_errors=True)
        log(f"note: removed {discard}, the files of a run replaced by --overwrite, which a killed train.py "
            "was deleting after the new run's first checkpoint")
    put_back(folder, log, why=f"note: {folder / ASIDE} was left by an --overwrite run killed before its first "
                              "checkpoint")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


class RunSession:
    """One ``train.py``'s hold on its run folder (``with RunSession(...)`` around the whole run).

    Entering (the main process, rank 0, does the work; the others learn whether it succeeded): the
    folder is created, locked (``RunLock``), what a killed run left is recovered (``recover_leftovers``)
    and a reused folder refused (``refuse_reuse``), as is a --resume with nothing to resume
    (``resume_point``), all before the slow feature extraction. Leaving, on every path (return, error,
    Ctrl-C, SIGTERM, which raises ``KeyboardInterrupt`` here rather than killing the process): a
    previous run set aside by --overwrite and not yet replaced by a checkpoint is put back, the lock
    released, and folders this session created are removed if they stayed empty.
    """

    def __init__(self, folder: Path, info: dd.DistInfo, resume: bool = False, overwrite: bool = False, log=print):
        self.folder, self.info, self.resume, self.overwrite, self.log = Path(folder), info, resume, overwrite, log
        self.lock = RunLock(self.folder)
        self.created: list[Path] = []
        self.old_handlers: dict = {}

    def __enter__(self) -> "RunSession":
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
        error = None
        if self.info.is_main:
            self._catch_signals()
            try:
                self._take()
            except LabError as e:
                error = e
            except BaseException:
                self._leave(put_back_previous=False)
                raise
        if dd.any_rank(error is not None, self.info) and error is None:
            raise TrainingError(f"the main process could not start the run in {self.folder}; see its message")
        if error is not None:
            self._leave(put_back_previous=False)  # a .previous/ here is a killed run's: named in the error
            raise error
        return self

    def _take(self) -> None:
        folder = self.folder
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FileWriteError(f"cannot create the run folder {folder}: {e.strerror or e}") from e
        self.created = missing  # innermost first
        self.lock.acquire(self.log)
        recover_leftovers(folder, self.log)
        refuse_reuse(folder, self.resume, self.overwrite)
        if self.resume:
            resume_point(folder)  # nothing resumable: refused now, before the features are computed

    def _catch_signals(self) -> None:
        """SIGTERM/SIGHUP raise ``KeyboardInterrupt`` while they would kill the process outright, so the
        lock is released and a previous run put back (``StopFlag`` takes over inside the training loop)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                self.old_handlers[sig] = signal.signal(sig, _raise_interrupt)

    def _leave(self, put_back_previous: bool = True) -> None:
        try:
            if put_back_previous and self.lock.data is not None:  # only the lock's holder touches the folder
                put_back(self.folder, self.log)
        except (LabError, OSError) as e:  # said, not raised: the run's own outcome is the message
            self.log(f"warning: {e}")
        finally:
            self.lock.release()
            for p in self.created:
                try:
                    p.rmdir()  # only if empty
                except OSError:
                    break
            for sig, old in self.old_handlers.items():
                signal.signal(sig, old)
            self.old_handlers.clear()

    def __exit__(self, *exc) -> bool:
        if self.info.is_main:
            self._leave()
        return False


# --------------------------------------------------------------------------- --resume
def resume_point(folder: Path) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest resumable checkpoint of ``folder`` (one with the optimiser state: ``interrupted.pth``,
    the newest epoch, or the lab-named copy of the last one), its state, and the unreadable files
    newer than it, each with why. ``(None, None, [])`` for a folder without checkpoints.

    Raises ``TrainingError``, naming every file, when the folder holds checkpoints but none can be
    resumed, or when a readable checkpoint is newer than the one resumed (continuing would overwrite
    it with a retrained epoch).
    """
    folder = Path(folder)
    unreadable: list[tuple[Path, str]] = []
    weights_only: list[tuple[Path, int]] = []
    best, best_key = (None, None), (-1, -1)

    def consider(p: Path, on_tie: bool = False) -> None:
        nonlocal best, best_key
        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            unreadable.append((p, getattr(e, "reason", str(e))))
            return
        bad = [k for part in ("model_state", "loss_state") for k, t in (state.get(part) or {}).items()
               if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # damaged after it was saved (never saved so: svlab.training.check_weights)
            unreadable.append((p, f"damaged: non-finite values in {excerpt(', '.join(bad), 60)}"))
            return
        if "optimizer_state" not in state:
            weights_only.append((p, int(state["epoch"])))
            return
        key = (int(state["epoch"]), int(state.get("step_in_epoch", 0)))
        if key > best_key or (on_tie and key == best_key):
            best, best_key = (p, state), key

    for p in sorted(folder.glob("*_checkpoint.pth")) + [folder / INTERRUPTED]:
        if p.is_file():
            consider(p)
    for epoch, p in sorted(list_epoch_checkpoints(folder).items(), reverse=True):
        if (epoch, 0) < best_key:
            break  # older than what is resumable already: never read, never overwritten
        consider(p, on_tie=True)  # checkpoint_NNN rather than its lab-named copy
        if best[0] == p:
            break  # the newest resumable epoch: older ones are weights only
    path, state = best
    listing = "; ".join([f"{printable(p.name)}: {r}" for p, r in unreadable]
                        + [f"{printable(p.name)}: epoch {e}, weights only (no optimiser state)"
                           for p, e in weights_only])
    if path is None:
        if unreadable or weights_only:
            raise TrainingError(
                f"--resume: nothing in {folder} can be resumed ({excerpt(listing, 400)}); nothing was changed. "
                "Only the newest checkpoint keeps the optimiser state. Start over with --overwrite (the old "
                "files stay until the new run's first checkpoint) or train into a new --n_folder")
        return None, None, []
    newer = [(p, e) for p, e in weights_only if e > best_key[0]]
    if newer:
        raise TrainingError(
            f"--resume: {folder} holds {', '.join(printable(p.name) for p, _ in newer)}, readable and newer than "
            f"{printable(path.name)} (the newest resumable state, epoch {best_key[0]}); resuming would overwrite "
            "it with a retrained epoch. Move it elsewhere first, or train into a new --n_folder")
    return path, state, [(p, r) for p, r in unreadable]


def saved_validation(folder: Path) -> dict | None:
    """The ``validation`` record (``svlab.validation``: the held-apart speakers) of the checkpoint
    ``--resume`` continues from: ``{}`` when it has none (validation off, or a run from before), None
    when there is nothing to resume (or ``--resume`` will refuse, saying why)."""
    try:
        _, state, _ = resume_point(folder)
    except LabError:
        return None
    return None if state is None else dict(state.get("validation") or {})


def kept_validation(folder: Path, resume: bool, source: FinetuneSource | None) -> dict | None:
    """The validation split a run must keep (``svlab.validation.prepare``'s ``stored``): on --resume the
    checkpoint's, for a fine-tune the source's (its held-apart speakers were never trained on, and the
    classes must be the source's), else None (a new split)."""
    saved = saved_validation(folder) if resume else None
    if saved is None and source is not None:
        return dict(source.state.get("validation") or {})
    return saved


def keep_unreadable(files: list[tuple[Path, str]], log=print) -> None:
    """Rename unreadable checkpoints to ``<name>.unreadable``: the resumed run neither overwrites nor
    deletes them, and nothing lists them as checkpoints any more."""
    for p, reason in files:
        target = unused_name(p.with_name(p.name + UNREADABLE))
        try:
            os.replace(p, target)
        except OSError as e:
            raise FileWriteError(f"could not rename the unreadable {p} aside: {e.strerror or e}") from e
        log(f"warning: skipped {printable(p.name)} ({reason}); kept as {printable(target.name)}")


# --------------------------------------------------------------------------- files of every epoch
def write_log_csv(path: Path, history: list[dict]) -> None:
    """``train_log.csv``: one row per epoch (``LOG_FIELDS``, then the validation columns when some
    epoch was validated: ``svlab.validation.VAL_FIELDS``)."""
    fields = LOG_FIELDS + [k for k in VAL_FIELDS if any(k in h for h in history)]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
    atomic_write(path, write)


def strip_resume_state(path: Path, log=print) -> None:
    """Drop optimiser/scheduler state from an older epoch checkpoint: only the newest one is resumed
    from, and the optimiser state (two tensors per weight for Adam) would triple the disk use."""
    if not path.is_file():
        return
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:  # damaged since it was saved: leave it as it is, say so
        log(f"warning: {printable(path.name)} is no longer readable ({getattr(e, 'reason', e)}); left as it is")
        return
    if "optimizer_state" in state:
        for key in ("optimizer_state", "scheduler_state"):
            state.pop(key, None)
        save_checkpoint(state, path)


def prune(folder: Path, keep: int, protect: int | None = None) -> None:
    """Keep only the newest ``keep`` epoch checkpoints (0: keep all), and epoch ``protect`` (the best
    validation epoch, which ``EER.py --cp_num best`` evaluates)."""
    if keep and keep > 0:
        found = list_epoch_checkpoints(folder)
        for epoch in list(found)[:-keep]:
            if epoch != protect:
                found[epoch].unlink(missing_ok=True)


# --------------------------------------------------------------------------- the next command
EVAL_SECTIONS = ("data", "test", "features", "train.save_dir")  # what EER.py reads of a config


def _shown(path: Path) -> str:
    try:
        rel = os.path.relpath(path, Path.cwd())
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _scalar(value) -> str:
    """``value`` as ``--set`` reads it back (YAML; quoted where a string would read as a number)."""
    if isinstance(value, str) and value.strip() and yaml.safe_load(value) == value:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def next_command(script: str, cfg: dict, *flags: str, sections=None) -> str:
    """The exact command that runs ``script`` (``train.py``, ``EER.py``) on this run, from the current
    folder: ``flags``, ``--config`` when a user config was given, ``--n_folder`` and ``--set`` for what
    the command line set (only keys of ``sections`` where given)."""
    args = ["python", _shown(PROJECT_ROOT / script), *flags]
    if cfg.get("_config_path", str(DEFAULT_CONFIG)) != str(DEFAULT_CONFIG):
        args += ["--config", _shown(Path(cfg["_config_path"]))]
    from_cli = [k for k, where in cfg.get("_sources", {}).items() if where.startswith("command line")]
    if "train.n_folder" in from_cli:
        args += ["--n_folder", str(cfg["train"]["n_folder"])]
    for key in from_cli:
        if key != "train.n_folder" and (sections is None or key in sections or key.split(".")[0] in sections):
            args += ["--set", f"{key}={_scalar(get_key(cfg, key))}"]
    for key, value in run_location_keys(cfg).items():  # a fine-tune's run folder lies where its source's did
        args += ["--set", f"{key}={_scalar(value)}"]
    return printable(subprocess.list2cmdline(args) if os.name == "nt" else shlex.join(args))


class RunFolder:
    """The files of one training run of ``cfg``, and the state it saves of the modules it is given
    (the modules themselves, not a compile or DDP wrapper: checkpoints load the same either way).
    ``is_main``: only then are files written."""

    def __init__(self, cfg: dict, model, criterion, optimizer, scheduler, scaler, speakers: list[str],
                 log=print, is_main: bool = True):
        self.cfg, self.path, self.log, self.is_main = cfg, run_folder(cfg), log, is_main
        self.model, self.criterion, self.optimizer, self.scheduler, self.scaler = (
            model, criterion, optimizer, scheduler, scaler)
        self.speakers = list(speakers)
        self.validation: dict | None = None  # the held-apart speakers (svlab.validation), saved with every state
        self.source: FinetuneSource | None = None  # train.finetune_from: the checkpoint a fine-tune starts from
        self.finetuned_from: dict | None = None    # ... as its checkpoints record it

    def start(self) -> tuple[list[dict], int, int, None]:
        """A run that is not resumed: from scratch, or a fine-tune from ``self.source``, whose network and
        loss head weights are loaded exactly (a ``TrainingError`` when its classes are other speakers);
        returns ``resume``'s tuple for epoch 1."""
        if self.source is not None:
            path, state = self.source.path, self.source.state
            if state["speakers"] != self.speakers:
                ours, theirs = set(self.speakers), set(state["speakers"])
                odd = sorted(ours ^ theirs)
                what = (f"e.g. {printable(odd[0])} is only in {'this run' if odd[0] in ours else 'the source'}" if odd
                        else "in another order")
                raise TrainingError(f"train.finetune_from: {path} was trained on {len(theirs)} speakers, this run's "
                                    f"data has {len(ours)} ({what}); a fine-tune continues the same classes: train on "
                                    f"the source's data (data.*), or train a new model")
            self.model.load_state_dict(state["model_state"])
            self.criterion.load_state_dict(state["loss_state"])
            self.finetuned_from = self.source.record()
        return [], 1, 0, None

    def resume(self) -> tuple[list[dict], int, int, dict | None]:
        """Load the newest resumable state into the modules, optimiser, scheduler and scaler; returns
        ``(history, first epoch to run, steps of it already done, their partial sums or None)``.
        Refuses (``TrainingError``) a checkpoint of other speakers or another model/loss/features."""
        cfg, log = self.cfg, self.log
        path, state, unreadable = resume_point(self.path)
        if state is None:
            log(f"note: --resume but {self.path} has no checkpoint; starting "
                + ("from the fine-tune source" if self.source else "from scratch"))
            return self.start()
        if state["speakers"] != self.speakers:
            raise TrainingError(f"{path} was trained on other speakers than {cfg['data']['train_manifest']}; "
                                "resume with the same manifest or start a new --n_folder")
        diff = describe_mismatch(state["config"], cfg, sections=("model", "loss", "features"))
        if diff:
            raise TrainingError(f"{path} was trained with another configuration: {'; '.join(diff)}. Resume "
                                "with the same settings or start a new --n_folder")
        if self.is_main:  # only now: a refused --resume changes nothing
            keep_unreadable(unreadable, log)
        self.model.load_state_dict(state["model_state"])
        self.criterion.load_state_dict(state["loss_state"])
        self.finetuned_from = state.get("finetuned_from")
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        if "scaler_state" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state"])
        apply_changed_schedule(state["config"]["train"], cfg["train"], self.optimizer, self.scheduler, log)
        old_amp = state["config"]["train"].get("amp", "auto")
        if old_amp != cfg["train"]["amp"]:
            log(f"note: train.amp changed from {old_amp} to {cfg['train']['amp']} for the resumed run")
        start_epoch, skip_steps = state["epoch"] + 1, state.get("step_in_epoch", 0)
        if start_epoch > cfg["train"]["epochs"]:
            log(f"note: {printable(path.name)} has {state['epoch']} epochs done and train.epochs is "
                f"{cfg['train']['epochs']}: nothing to train (raise --epochs to train on)")
        log(f"resuming from {path.name}: epoch {state['epoch']} done"
            + (f", {skip_steps} steps into epoch {start_epoch}" if skip_steps else ""))
        return list(state.get("history", [])), start_epoch, skip_steps, dict(state["partial"]) if skip_steps else None

    def write_config(self, skipped: list[str], resume: bool) -> None:
        """``config.yaml`` (the configuration of this run) and ``skipped_files.txt`` (unusable audio
        left out under ``data.bad_audio: skip``; an old list goes when this run skipped nothing)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.is_main:
            return
        folder, cfg = self.path, self.cfg
        atomic_write(folder / "config.yaml", lambda tmp: tmp.write_text(
            yaml.safe_dump(public_config(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8"))
        if skipped:
            atomic_write(folder / "skipped_files.txt",
                         lambda tmp: tmp.write_text("\n".join(skipped) + "\n", encoding="utf-8"))
            self.log(f"the {len(skipped)} skipped file(s) are listed in {folder / 'skipped_files.txt'}")
        elif (folder / "skipped_files.txt").is_file() and not resume:
            (folder / "skipped_files.txt").unlink()  # from an earlier run: this one skipped nothing

    def state(self, epoch: int, history: list[dict]) -> dict:
        """The checkpoint dict after ``epoch`` finished epochs (``svlab.checkpoint`` lists its keys)."""
        cfg = self.cfg
        return {
            "epoch": epoch, "model_state": self.model.state_dict(), "loss_state": self.criterion.state_dict(),
            "optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.scheduler.state_dict(),
            "config": public_config(cfg), "features": feature_signature(cfg["features"]),
            "speakers": list(self.speakers), "history": history, "tag": describe(cfg["model"], cfg["loss"]),
            **({"scaler_state": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            **({"validation": self.validation} if self.validation else {}),
            **({"finetuned_from": self.finetuned_from} if self.finetuned_from else {}),
            **({"corpora": corpora_record(cfg, self.speakers)} if cfg["data"].get("corpora") else {}),
        }

    def save_interrupted(self, epoch: int, step: int, partial: dict, history: list[dict]) -> None:
        """``interrupted.pth``: the state ``step`` steps into ``epoch``, with the epoch's ``partial``
        sums (over all processes), so --resume continues mid-epoch."""
        if (self.path / ASIDE).is_dir():  # --overwrite before its first checkpoint: the old run comes back
            self.log(f"stopped in epoch {epoch}, step {step}, before this --overwrite run's first checkpoint: "
                     "nothing of it is kept")
            return
        state = self.state(epoch - 1, history)
        state["step_in_epoch"] = step
        state["partial"] = partial
        if self.is_main:
            save_checkpoint(state, self.path / INTERRUPTED)
        self.log(f"saved {self.path / INTERRUPTED} (epoch {epoch}, step {step}); "
                 f"continue with: {next_command('train.py', self.cfg, '--resume')}")

    def save_epoch(self, epoch: int, history: list[dict]) -> None:
        """``checkpoint_<epoch>.pth`` (the previous one keeps its weights only), ``train_log.csv`` and
        ``curves.png``; the oldest checkpoints beyond ``train.keep_checkpoints`` go."""
        folder = self.path
        save_checkpoint(self.state(epoch, history), epoch_checkpoint_path(folder, epoch))
        discard_previous(folder, epoch_checkpoint_path(folder, epoch), self.log)
        strip_resume_state(epoch_checkpoint_path(folder, epoch - 1), self.log)
        (folder / INTERRUPTED).unlink(missing_ok=True)
        write_log_csv(folder / "train_log.csv", history)
        best = write_best(folder, history)  # the epoch of lowest validation EER (svlab.validation): never pruned
        prune(folder, self.cfg["train"]["keep_checkpoints"], protect=best)
        try:
            from svlab.plots import plot_training_curves  # here: not even a broken matplotlib stops training
            plot_training_curves(history, folder / "curves.png", title=describe(self.cfg["model"], self.cfg["loss"]),
                                 best_epoch=best)
        except Exception as e:  # a figure must never cost a training run
            self.log(f"note: curves.png not drawn ({e})")

    def finish(self) -> Path:
        """Copy the newest epoch's checkpoint to the lab's name, ``<model>_<pooling>_<loss>_checkpoint.pth``
        (never an older one over it); returns that path."""
        cfg = self.cfg
        final = self.path / final_checkpoint_name(cfg["model"]["name"], cfg["model"]["pooling"], cfg["loss"]["type"])
        found = list_epoch_checkpoints(self.path)  # the newest: --resume with fewer --epochs trains none
        if found and self.is_main:
            last = found[max(found)]
            atomic_write(final, lambda tmp: shutil.copyfile(last, tmp))
        return final

"""The life of a run folder, ``<train.save_dir>/<train.n_folder>`` (``svlab.checkpoint.run_folder``).

``refuse_reuse``  a folder that already holds checkpoints is used only with --resume or --overwrite
``prepare``       --overwrite clears the previous run; temporary files of a killed save are removed
``newest_state``  the newest resumable checkpoint (``interrupted.pth`` counts if it is further along)
``RunFolder``     what one training run writes there, with the modules whose state it saves:
                  ``config.yaml`` and ``skipped_files.txt`` at the start, ``checkpoint_NNN.pth``,
                  ``train_log.csv`` and ``curves.png`` every epoch (older checkpoints stripped of the
                  optimiser state, the oldest pruned), ``interrupted.pth`` on a stop, and the lab-named
                  ``<model>_<pooling>_<loss>_checkpoint.pth`` at the end.

Only the main process (rank 0) writes; every file goes through ``atomic_write``.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import yaml

from svlab.checkpoint import (INTERRUPTED, describe_mismatch, epoch_checkpoint_path, final_checkpoint_name,
                              list_epoch_checkpoints, load_checkpoint, run_folder, save_checkpoint)
from svlab.config import public_config
from svlab.errors import CheckpointError, TrainingError
from svlab.features import feature_signature
from svlab.files import atomic_write, stale_temp_files
from svlab.models import describe
from svlab.training import apply_changed_schedule

LOG_FIELDS = ["epoch", "loss", "acc", "lr", "margin", "seconds"]
RUN_FILES = ["train_log.csv", "curves.png", "skipped_files.txt"]  # besides checkpoints: what --overwrite removes


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
    """Before a run writes into ``folder``: remove the previous run's checkpoints and logs when
    ``clear`` (--overwrite; evaluation folders stay), and the temporary files a killed save left."""
    if clear and folder.exists():
        removed = []
        candidates = (list(list_epoch_checkpoints(folder).values()) + sorted(folder.glob("*_checkpoint.pth"))
                      + [folder / INTERRUPTED] + [folder / name for name in RUN_FILES])
        for p in candidates:
            if p.is_file():
                p.unlink()
                removed.append(p.name)
        if removed:
            log(f"--overwrite: removed {len(removed)} file(s) of the previous run in {folder}")
    for tmp in stale_temp_files(folder):
        log(f"note: removing {tmp.name}, left by a run that was killed while writing")
        tmp.unlink(missing_ok=True)


def newest_state(folder: Path, log=print) -> tuple[Path | None, dict | None]:
    """Newest resumable checkpoint in ``folder`` and its state (an interrupted one counts if it is
    further along); ``(None, None)`` if there is none."""
    candidates = [p for _, p in sorted(list_epoch_checkpoints(folder).items(), reverse=True)]
    best, best_key = (None, None), (-1, -1)
    inter = folder / INTERRUPTED
    for p in ([inter] if inter.is_file() else []) + candidates:
        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
            continue
        if "optimizer_state" not in state:
            continue  # an older epoch checkpoint: weights only, not resumable
        key = (state["epoch"], state.get("step_in_epoch", 0))
        if key > best_key:
            best, best_key = (p, state), key
        if p != inter:
            break  # epoch checkpoints are sorted newest first: the first resumable one is enough
    return best


def write_log_csv(path: Path, history: list[dict]) -> None:
    """``train_log.csv``: one row per epoch (``LOG_FIELDS``)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
    atomic_write(path, write)


def strip_resume_state(path: Path) -> None:
    """Drop optimiser/scheduler state from an older epoch checkpoint: only the newest one is resumed
    from, and the optimiser state (two tensors per weight for Adam) would triple the disk use."""
    if not path.is_file():
        return
    state = load_checkpoint(path)
    if "optimizer_state" in state:
        for key in ("optimizer_state", "scheduler_state"):
            state.pop(key, None)
        save_checkpoint(state, path)


def prune(folder: Path, keep: int) -> None:
    """Keep only the newest ``keep`` epoch checkpoints (0: keep all)."""
    if keep and keep > 0:
        found = list_epoch_checkpoints(folder)
        for epoch in list(found)[:-keep]:
            found[epoch].unlink(missing_ok=True)


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

    def resume(self) -> tuple[list[dict], int, int, dict | None]:
        """Load the newest resumable state into the modules, optimiser, scheduler and scaler; returns
        ``(history, first epoch to run, steps of it already done, their partial sums or None)``.
        Refuses (``TrainingError``) a checkpoint of other speakers or another model/loss/features."""
        cfg, log = self.cfg, self.log
        path, state = newest_state(self.path, log)
        if state is None:
            log(f"note: --resume but {self.path} has no checkpoint; starting from scratch")
            return [], 1, 0, None
        if state["speakers"] != self.speakers:
            raise TrainingError(f"{path} was trained on other speakers than {cfg['data']['train_manifest']}; "
                                "resume with the same manifest or start a new --n_folder")
        diff = describe_mismatch(state["config"], cfg, sections=("model", "loss", "features"))
        if diff:
            raise TrainingError(f"{path} was trained with another configuration: {'; '.join(diff)}. Resume "
                                "with the same settings or start a new --n_folder")
        self.model.load_state_dict(state["model_state"])
        self.criterion.load_state_dict(state["loss_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        if "scaler_state" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state"])
        apply_changed_schedule(state["config"]["train"], cfg["train"], self.optimizer, self.scheduler, log)
        old_amp = state["config"]["train"].get("amp", "auto")
        if old_amp != cfg["train"]["amp"]:
            log(f"note: train.amp changed from {old_amp} to {cfg['train']['amp']} for the resumed run")
        start_epoch, skip_steps = state["epoch"] + 1, state.get("step_in_epoch", 0)
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
        }

    def save_interrupted(self, epoch: int, step: int, partial: dict, history: list[dict]) -> None:
        """``interrupted.pth``: the state ``step`` steps into ``epoch``, with the epoch's ``partial``
        sums (over all processes), so --resume continues mid-epoch."""
        state = self.state(epoch - 1, history)
        state["step_in_epoch"] = step
        state["partial"] = partial
        if self.is_main:
            save_checkpoint(state, self.path / INTERRUPTED)
        self.log(f"saved {self.path / INTERRUPTED} (epoch {epoch}, step {step}); "
                 f"continue with: python train.py --resume --n_folder {self.cfg['train']['n_folder']}")

    def save_epoch(self, epoch: int, history: list[dict]) -> None:
        """``checkpoint_<epoch>.pth`` (the previous one keeps its weights only), ``train_log.csv`` and
        ``curves.png``; the oldest checkpoints beyond ``train.keep_checkpoints`` go."""
        folder = self.path
        save_checkpoint(self.state(epoch, history), epoch_checkpoint_path(folder, epoch))
        strip_resume_state(epoch_checkpoint_path(folder, epoch - 1))
        (folder / INTERRUPTED).unlink(missing_ok=True)
        write_log_csv(folder / "train_log.csv", history)
        prune(folder, self.cfg["train"]["keep_checkpoints"])
        try:
            from svlab.plots import plot_training_curves  # here: not even a broken matplotlib stops training
            plot_training_curves(history, folder / "curves.png", title=describe(self.cfg["model"], self.cfg["loss"]))
        except Exception as e:  # a figure must never cost a training run
            self.log(f"note: curves.png not drawn ({e})")

    def finish(self) -> Path:
        """Copy the last epoch's checkpoint to the lab's name, ``<model>_<pooling>_<loss>_checkpoint.pth``;
        returns that path."""
        cfg = self.cfg
        final = self.path / final_checkpoint_name(cfg["model"]["name"], cfg["model"]["pooling"], cfg["loss"]["type"])
        last = epoch_checkpoint_path(self.path, cfg["train"]["epochs"])
        if last.is_file() and self.is_main:
            atomic_write(final, lambda tmp: shutil.copyfile(last, tmp))
        return final

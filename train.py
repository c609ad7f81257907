"""Train a speaker-embedding network (lab steps 2.1-2.5).

    python train.py --batchsize 64                      # x-vector + GAP + Softmax on the configured data
    python train.py --loss_type amsoftmax --pooling stats --n_folder 001
    python train.py --resume                            # continue saved_model/000 where it stopped
    python train.py --amp bf16                          # bfloat16 autocast (fast on CPUs with AMX)

Every epoch writes ``saved_model/<n_folder>/checkpoint_<epoch:03d>.pth`` (atomically, self-describing:
``EER.py`` rebuilds the model from it alone), appends to ``train_log.csv`` and redraws
``curves.png``; the last epoch is also saved under the lab's name
``<model>_<pooling>_<loss>_checkpoint.pth``. Ctrl-C or SIGTERM saves ``interrupted.pth`` first, so
``--resume`` continues mid-epoch and reproduces the losses of an uninterrupted run.

Faults: config and data-path problems stop the run before any feature extraction and before the
run folder is touched (``--overwrite`` clears the old run only once the new data has been read).
A non-finite loss or weight stops training with the epoch and step; the last good checkpoint
stays. ``--resume`` refuses a checkpoint of another model/loss/feature configuration and applies
a changed ``--lr``. Temporary files left by a killed save are removed at the next start.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from checkpoint import (CheckpointError, atomic_write, describe_mismatch, epoch_checkpoint_path,
                        final_checkpoint_name, list_epoch_checkpoints, load_checkpoint, save_checkpoint,
                        stale_temp_files)
from config import ConfigError, config_path_value, key_source, load_config, parse_override, public_config
from dataset import DataError, SpkTrainDataset, check_training_data, feature_signature
from demo_corpus import ensure_demo_corpus
import distributed as dd
from cpu_runtime import keep_freed_memory, native_bfloat16, warm_up_vector_math
from embedding import select_device
from speaker_model import build_loss, build_model, describe

INTERRUPTED = "interrupted.pth"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent resume, ...)."""


class NonFiniteLoss(FloatingPointError):
    """The loss of a step was NaN or infinite (on some rank); the step was not applied."""


def amp_dtype_for(cfg: dict, device: torch.device, log=print) -> torch.dtype | None:
    """The ``torch.autocast`` dtype ``train`` uses for ``train.amp`` on ``device``; None: float32.

    ``auto``: on CUDA bfloat16 where the GPU has it, else float16 (``train`` then adds a gradient
    scaler); float32 on the CPU (and a hint where the CPU has native bfloat16). ``bf16`` on a CPU
    without native bfloat16 runs, with a note that it is emulated. Raises ``ConfigError`` for
    ``fp16`` on the CPU (no fast kernels) and ``bf16`` on a GPU without bfloat16.
    """
    setting = cfg["train"]["amp"]
    where = key_source(cfg, "train.amp")
    cuda = device.type == "cuda"
    if setting == "fp32":
        return None
    if setting == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native, what = native_bfloat16()
        if native and device.type == "cpu":
            log(f"note: this CPU has {what}: --amp bf16 (bfloat16 autocast) trains about 2x faster "
                "(README, 'bfloat16 training on the CPU')")
        return None
    if setting == "fp16":
        if not cuda:
            raise ConfigError(f"{where}: train.amp=fp16 needs a CUDA GPU; float16 has no fast {device.type} "
                              "kernels for these layers (190x slower than fp32 here); use bf16 or fp32")
        return torch.float16
    if cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{where}: train.amp=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16; "
                          "use fp16 (with a gradient scaler) or auto")
    if not cuda:
        native, what = native_bfloat16()
        if not native:
            log(f"note: train.amp=bf16: {what}, likely slower than train.amp=fp32")
    return torch.bfloat16


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, x: torch.Tensor,
               y: torch.Tensor, amp_dtype: torch.dtype | None = None, info=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step, the inner loop of ``train.train``.

    ``net(x, y) -> (loss, acc)`` is the embedding network and loss head together
    (``distributed.ModelWithHead``, or its DistributedDataParallel wrapper). Moves the batch to the
    network's device, runs the forward pass (under ``torch.autocast`` when ``amp_dtype`` is given),
    refuses a non-finite loss before touching the weights (on every rank at once when ``info`` is a
    distributed ``DistInfo``), zeroes the gradients, (scaled) backward, optimiser step, scaler update,
    LR-scheduler step. Returns the detached ``(loss, acc)``.

    ``benchmark.py`` times this same function.
    """
    device = next(net.parameters()).device
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if amp_dtype is not None:
        with torch.autocast(device.type, dtype=amp_dtype):
            loss, acc = net(x, y)
    else:
        loss, acc = net(x, y)
    bad = not bool(torch.isfinite(loss))
    if info is not None and info.distributed:
        bad = dd.any_rank(bad, info)  # all ranks stop at the same step, none waits forever
    if bad:
        raise NonFiniteLoss(f"loss became {loss.item()}" if not torch.isfinite(loss) else
                            "the loss became non-finite on another process")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach(), acc.detach()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train an x-vector / ECAPA-TDNN speaker embedding network.")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU (default: GPU 0 if present)")
    ap.add_argument("--n_folder", default=None, help="run folder under saved_model/ (default: train.n_folder, 000)")
    ap.add_argument("--model", choices=("xvector", "ecapa"), default=None, help="embedding network")
    ap.add_argument("--pooling", choices=("gap", "stats", "asp"), default=None, help="temporal pooling")
    ap.add_argument("--loss_type", choices=("softmax", "amsoftmax", "aamsoftmax"), default=None, help="loss head")
    ap.add_argument("--batchsize", type=int, default=None, help="utterance crops per step (default 64)")
    ap.add_argument("--speaker_size", type=int, default=None,
                    help="number of training speakers (default: taken from the manifest)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs to train (default 30)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.001)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    ap.add_argument("--crop_frames", type=int, default=None, help="training crop length in frames (10 ms each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set loss.margin=0.3 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    ap.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (falls back if unsupported)")
    ap.add_argument("--amp", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                    help="mixed precision (train.amp): auto = bf16/fp16 on a GPU, fp32 on the CPU; "
                         "bf16 trains ~2x faster on CPUs with AMX or AVX512-BF16")
    return ap


def config_from_args(args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(s) for s in args.set)
    flags = {
        "train.n_folder": args.n_folder, "model.name": args.model, "model.pooling": args.pooling,
        "loss.type": args.loss_type, "train.batchsize": args.batchsize, "train.epochs": args.epochs,
        "train.lr": args.lr, "train.seed": args.seed, "train.crop_frames": args.crop_frames, "train.amp": args.amp,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})  # unset flags keep --set values
    return load_config(args.config, overrides)


def lr_lambda(cfg_train: dict, steps_per_epoch: int):
    """Learning-rate factor per optimiser step: linear warm-up, then cosine decay or steps."""
    total = cfg_train["epochs"] * steps_per_epoch
    warm = min(cfg_train["warmup_epochs"] * steps_per_epoch, max(total - 1, 0))
    kind = cfg_train["scheduler"]

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * 0.99 + 0.01
        if kind == "step":
            return cfg_train["gamma"] ** (step // (cfg_train["step_size"] * steps_per_epoch))
        return 1.0
    return factor


def run_folder(cfg: dict) -> Path:
    """``<train.save_dir>/<train.n_folder>``, e.g. ``saved_model/000``."""
    return config_path_value(cfg, "train.save_dir") / str(cfg["train"]["n_folder"])


def _newest_state(folder: Path) -> tuple[Path | None, dict | None]:
    """Newest loadable checkpoint (an interrupted one counts if it is further along)."""
    candidates = [p for _, p in sorted(list_epoch_checkpoints(folder).items(), reverse=True)]
    best, best_key = (None, None), (-1, -1)
    inter = folder / INTERRUPTED
    for p in ([inter] if inter.is_file() else []) + candidates:
        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            print(f"warning: skipping {e}")
            continue
        if "optimizer_state" not in state:
            continue  # an older epoch checkpoint: weights only, not resumable
        key = (state["epoch"], state.get("step_in_epoch", 0))
        if key > best_key:
            best, best_key = (p, state), key
        if p != inter:
            break  # epoch checkpoints are sorted newest first: the first resumable one is enough
    return best


def _write_log_csv(path: Path, history: list[dict]) -> None:
    fields = ["epoch", "loss", "acc", "lr", "margin", "seconds"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
    atomic_write(path, write)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the state saved is consistent."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. called from a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a resumable checkpoint after this step ...",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: dict, resume: bool = False, overwrite: bool = False, speaker_size: int | None = None,
          device: torch.device | None = None, compile_model: bool = False, log=print,
          stop_after_steps: int | None = None, dist_info=None) -> dict:
    """Train with configuration ``cfg``; returns a summary dict (run folder, checkpoints, history).

    ``stop_after_steps`` simulates an interruption after that many optimiser steps (for tests).
    ``dist_info`` (``distributed.DistInfo``, from ``torchrun``): ``train.batchsize`` is then the global
    batch, split evenly over the processes; only rank 0 writes files.
    """
    warm_up_vector_math()  # before any multi-threaded float math: exact, reproducible results
    info = dist_info or dd.DistInfo(device=device or torch.device("cpu"))
    device = info.device if dist_info is not None else (device or torch.device("cpu"))
    if not info.is_main:
        log = _quiet
    tcfg = cfg["train"]
    folder = run_folder(cfg)
    # Order matters: every check that can fail fast runs before the slow feature extraction, and
    # nothing in the run folder is changed before the data has been read successfully.
    existing = list_epoch_checkpoints(folder)
    if (existing or (folder / INTERRUPTED).exists()) and not (resume or overwrite):
        raise TrainingError(
            f"{folder} already holds checkpoints (epochs {min(existing) if existing else 0}-"
            f"{max(existing) if existing else 0}); use --resume to continue, --overwrite to start over, "
            f"or --n_folder NNN for a new run")

    if tcfg["batchsize"] % info.world_size:
        raise ConfigError(f"train.batchsize {tcfg['batchsize']} is the global batch and must be divisible by the "
                          f"{info.world_size} processes")
    batch_per_process = tcfg["batchsize"] // info.world_size
    amp_dtype = amp_dtype_for(cfg, device, log)
    if amp_dtype is not None:
        log(f"mixed precision: torch.autocast {str(amp_dtype).replace('torch.', '')} on {device.type} "
            f"(train.amp={tcfg['amp']}); weights, optimiser and checkpoints stay float32")
    with dd.main_process_first(info):  # rank 0 generates the demo corpus / fills the feature cache once
        ensure_demo_corpus(cfg["data"]["root"], log=log)
        check_training_data(cfg)  # manifest parses, data.root holds its files: one message, before any work
        t0 = time.perf_counter()
        dataset = SpkTrainDataset(cfg, log=log)
    n_classes = len(dataset.speakers)  # speed-perturbed copies as new speakers count as classes too
    n_manifest_speakers = len({u.speaker for u in dataset.utterances if u.speaker in dataset.manifest_speakers})
    if speaker_size is not None and speaker_size != n_manifest_speakers:
        raise ConfigError(f"--speaker_size {speaker_size} but {cfg['data']['train_manifest']} has "
                          f"{n_manifest_speakers} speakers; drop --speaker_size or fix the manifest")
    if n_classes < 2:
        raise DataError(f"{cfg['data']['train_manifest']}: training needs at least 2 speakers, found {n_classes}"
                        + (f" after skipping {len(dataset.skipped)} unusable file(s)" if dataset.skipped else ""))
    log(f"training data: {len(dataset)} utterances, {n_classes} speakers "
        f"(features ready in {time.perf_counter() - t0:.1f}s)")
    if overwrite and not resume and folder.exists() and info.is_main:
        _clear_run(folder, log)
    for tmp in stale_temp_files(folder) if info.is_main else []:
        log(f"note: removing {tmp.name}, left by a run that was killed while writing")
        tmp.unlink(missing_ok=True)
    dd.barrier(info)

    torch.manual_seed(tcfg["seed"])
    model = build_model(cfg["model"], cfg["features"]["n_mfcc"]).to(device)
    head = build_loss(cfg["loss"], cfg["model"]["embedding_size"], n_classes).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    steps_per_epoch = dd.steps_per_epoch(len(dataset), batch_per_process, info)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, steps_per_epoch))

    history: list[dict] = []
    start_epoch, skip_steps, partial = 1, 0, {"loss": 0.0, "acc": 0.0, "n": 0, "seconds": 0.0}
    resume_state = None
    if resume:
        path, state = _newest_state(folder)
        if state is None:
            log(f"note: --resume but {folder} has no checkpoint; starting from scratch")
        else:
            if state["speakers"] != dataset.speakers:
                raise TrainingError(f"{path} was trained on other speakers than {cfg['data']['train_manifest']}; "
                                    "resume with the same manifest or start a new --n_folder")
            diff = describe_mismatch(state["config"], cfg, sections=("model", "loss", "features"))
            if diff:
                raise TrainingError(f"{path} was trained with another configuration: {'; '.join(diff)}. Resume "
                                    "with the same settings or start a new --n_folder")
            model.load_state_dict(state["model_state"])
            head.load_state_dict(state["loss_state"])
            optimizer.load_state_dict(state["optimizer_state"])
            scheduler.load_state_dict(state["scheduler_state"])
            _apply_changed_schedule(state["config"]["train"], tcfg, optimizer, scheduler, log)
            resume_state = state
            old_amp = state["config"]["train"].get("amp", "auto")
            if old_amp != tcfg["amp"]:
                log(f"note: train.amp changed from {old_amp} to {tcfg['amp']} for the resumed run")
            history = list(state.get("history", []))
            start_epoch = state["epoch"] + 1
            skip_steps = state.get("step_in_epoch", 0)
            if skip_steps:
                partial = dict(state["partial"])
            log(f"resuming from {path.name}: epoch {state['epoch']} done"
                + (f", {skip_steps} steps into epoch {start_epoch}" if skip_steps else ""))

    folder.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        atomic_write(folder / "config.yaml", lambda tmp: tmp.write_text(
            yaml.safe_dump(public_config(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8"))
        if dataset.skipped:
            atomic_write(folder / "skipped_files.txt",
                         lambda tmp: tmp.write_text("\n".join(dataset.skipped) + "\n", encoding="utf-8"))
            log(f"the {len(dataset.skipped)} skipped file(s) are listed in {folder / 'skipped_files.txt'}")
        elif (folder / "skipped_files.txt").is_file() and not resume:
            (folder / "skipped_files.txt").unlink()  # from an earlier run: this one skipped nothing

    if tcfg["keep_freed_memory"]:  # after feature extraction: its variable-size arrays would fragment the heap
        applied, why = keep_freed_memory()
        if not applied:
            log(f"note: train.keep_freed_memory has no effect here: {why}")
    train_model = model
    if compile_model:
        try:
            train_model = torch.compile(model)
        except Exception as e:  # platform without a working compiler
            log(f"note: torch.compile unavailable ({type(e).__name__}: {e}); training uncompiled")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if resume_state is not None and "scaler_state" in resume_state and scaler.is_enabled():
        scaler.load_state_dict(resume_state["scaler_state"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # One module holding every trained weight (network + loss head): one DDP wrapper, one all-reduce.
    trainer = dd.wrap_model(dd.ModelWithHead(train_model, head), info)
    compile_pending = train_model is not model  # torch.compile compiles (and can fail) at the first step

    def step_once(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal trainer, compile_pending
        if compile_pending:
            compile_pending = False
            t0 = time.perf_counter()
            try:
                out = train_step(trainer, optimizer, scheduler, scaler, x, y, amp_dtype, info)
            except NonFiniteLoss:
                raise
            except Exception as e:  # no C++ compiler, unsupported op, ...: the step changed no weight yet
                reason = " ".join(str(e).split())[:200]
                log(f"note: torch.compile failed at the first step ({type(e).__name__}: {reason}); "
                    "training uncompiled")
                trainer = dd.wrap_model(dd.ModelWithHead(model, head), info)
            else:
                log(f"torch.compile: model compiled (first step {time.perf_counter() - t0:.1f}s)")
                return out
        return train_step(trainer, optimizer, scheduler, scaler, x, y, amp_dtype, info)

    def base_state(epoch: int) -> dict:
        return {
            "epoch": epoch, "model_state": model.state_dict(), "loss_state": head.state_dict(),
            "optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
            "config": public_config(cfg), "features": feature_signature(cfg["features"]),
            "speakers": list(dataset.speakers), "history": history, "tag": describe(cfg["model"], cfg["loss"]),
            **({"scaler_state": scaler.state_dict()} if scaler.is_enabled() else {}),
        }

    epochs = tcfg["epochs"]
    margin = cfg["loss"]["margin"]
    warm_margin = cfg["loss"]["margin_warmup_epochs"]
    total_steps_done = 0
    from tqdm import tqdm
    with _StopFlag() as stop:
        for epoch in range(start_epoch, epochs + 1):
            dataset.set_epoch(epoch)
            if info.distributed:
                order = dict(sampler=dd.make_sampler(dataset, info, seed=tcfg["seed"], epoch=epoch))
            else:
                order = dict(shuffle=True, generator=torch.Generator().manual_seed(tcfg["seed"] * 100_003 + epoch))
            loader = DataLoader(dataset, batch_size=batch_per_process, collate_fn=dataset.collate_fn,
                                num_workers=tcfg["num_workers"], pin_memory=device.type == "cuda", **order)
            model.train()
            head.train()
            sums = {"loss": 0.0, "acc": 0.0, "n": 0, "seconds": 0.0}
            if skip_steps:  # the saved partial sums are already totals over all processes: count them once
                sums = dict(partial) if info.is_main else {**sums, "seconds": partial["seconds"]}
            t_epoch = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr,
                       disable=None)
            for step, (x, y) in enumerate(bar):
                if step < skip_steps:
                    continue
                if hasattr(head, "margin") and warm_margin > 0:
                    head.margin = margin * min(1.0, (epoch - 1 + step / steps_per_epoch) / warm_margin)
                try:
                    loss, acc = step_once(x, y)
                except NonFiniteLoss as e:
                    raise TrainingError(_diverged(str(e), epoch, step + 1, folder)) from None
                n = y.shape[0]
                sums["loss"] += loss.item() * n
                sums["acc"] += acc.item() * n
                sums["n"] += n
                total_steps_done += 1
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", acc=f"{sums['acc'] / sums['n']:.1f}%")
                stopping = stop.signum is not None or (stop_after_steps is not None
                                                       and total_steps_done >= stop_after_steps)
                if dd.any_rank(stopping, info):
                    state = base_state(epoch - 1)
                    state["step_in_epoch"] = step + 1
                    local = [sums["loss"], sums["acc"], sums["n"]]
                    state["partial"] = {**dict(zip(("loss", "acc", "n"), dd.all_reduce_sum(local, info))),
                                        "seconds": sums["seconds"] + time.perf_counter() - t_epoch}
                    if info.is_main:
                        save_checkpoint(state, folder / INTERRUPTED)
                    log(f"saved {folder / INTERRUPTED} (epoch {epoch}, step {step + 1}); "
                        "continue with: python train.py --resume" + (f" --n_folder {tcfg['n_folder']}"))
                    return {"run_folder": folder, "interrupted": True, "history": history}
            bar.close()
            skip_steps = 0
            if info.distributed:  # epoch means over every process's crops
                sums["loss"], sums["acc"], sums["n"] = dd.all_reduce_sum([sums["loss"], sums["acc"], sums["n"]], info)
            seconds = sums["seconds"] + time.perf_counter() - t_epoch
            record = {"epoch": epoch, "loss": sums["loss"] / max(sums["n"], 1), "acc": sums["acc"] / max(sums["n"], 1),
                      "lr": optimizer.param_groups[0]["lr"], "margin": getattr(head, "margin", 0.0),
                      "seconds": round(seconds, 3)}
            bad = [name for name, t in list(model.state_dict().items()) + list(head.state_dict().items())
                   if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:  # the last step's update overflowed: never save such weights as a "good" checkpoint
                raise TrainingError(_diverged(f"weights became non-finite ({', '.join(bad[:3])})", epoch,
                                              steps_per_epoch, folder))
            history.append(record)
            log(f"Train Stage: {epoch}/{epochs} ===> Loss {record['loss']:.4f} Acc {record['acc']:.2f}%"
                f"  (lr {record['lr']:.2e}, {seconds:.1f}s)")
            if not info.is_main:
                dd.barrier(info)  # wait for rank 0's checkpoint so every rank can resume from it
                continue
            save_checkpoint(base_state(epoch), epoch_checkpoint_path(folder, epoch))
            _strip_resume_state(epoch_checkpoint_path(folder, epoch - 1))
            (folder / INTERRUPTED).unlink(missing_ok=True)
            _write_log_csv(folder / "train_log.csv", history)
            _prune(folder, tcfg["keep_checkpoints"])
            try:
                from plots import plot_training_curves
                plot_training_curves(history, folder / "curves.png", title=describe(cfg["model"], cfg["loss"]))
            except Exception as e:  # a figure must never cost a training run
                log(f"note: curves.png not drawn ({e})")
            dd.barrier(info)

    final = folder / final_checkpoint_name(cfg["model"]["name"], cfg["model"]["pooling"], cfg["loss"]["type"])
    last = epoch_checkpoint_path(folder, epochs)
    if last.is_file() and info.is_main:
        atomic_write(final, lambda tmp: shutil.copyfile(last, tmp))
    log(f"done: {len(history)} epochs in {folder}; final checkpoint {final}")
    return {"run_folder": folder, "final_checkpoint": final, "history": history, "interrupted": False}


def _quiet(*args, **kwargs) -> None:
    """Log function of non-zero ranks: only rank 0 prints."""


def _diverged(what: str, epoch: int, step: int, folder: Path) -> str:
    good = list_epoch_checkpoints(folder)
    last = (f"The last good checkpoint, epoch {max(good)}, is kept in {folder}; lower the learning rate and "
            "continue from it with: python train.py --resume --lr <smaller>" if good else
            "No checkpoint was saved yet; lower the learning rate (--lr) and start again with --overwrite")
    return f"training diverged: {what} at epoch {epoch}, step {step}; stopped. {last}"


def _apply_changed_schedule(old: dict, new: dict, optimizer, scheduler, log) -> None:
    """On --resume, a changed train.lr takes effect (the saved optimiser/scheduler state would
    silently keep the old one); a changed train.epochs re-spreads the schedule. Both are logged."""
    if float(old.get("lr", new["lr"])) != float(new["lr"]):
        scheduler.base_lrs = [float(new["lr"]) for _ in scheduler.base_lrs]
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["initial_lr"] = float(new["lr"])
            group["lr"] = float(new["lr"]) * factor
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        log(f"note: train.lr changed from {old['lr']} to {new['lr']} for the resumed run")
    for key in ("epochs", "scheduler", "warmup_epochs", "step_size", "gamma"):
        if key in old and old[key] != new[key]:
            log(f"note: train.{key} changed from {old[key]} to {new[key]}; the learning-rate schedule follows "
                "the new value from here on")


def _clear_run(folder: Path, log) -> None:
    """--overwrite: remove the previous run's checkpoints and logs (evaluation folders stay)."""
    removed = []
    candidates = list(list_epoch_checkpoints(folder).values()) + sorted(folder.glob("*_checkpoint.pth")) + [
        folder / INTERRUPTED, folder / "train_log.csv", folder / "curves.png", folder / "skipped_files.txt"]
    for p in candidates:
        if p.is_file():
            p.unlink()
            removed.append(p.name)
    if removed:
        log(f"--overwrite: removed {len(removed)} file(s) of the previous run in {folder}")


def _strip_resume_state(path: Path) -> None:
    """Drop optimiser/scheduler state from an older epoch checkpoint: only the newest one is resumed
    from, and the optimiser state (two tensors per weight for Adam) would triple the disk use."""
    if not path.is_file():
        return
    state = load_checkpoint(path)
    if "optimizer_state" in state:
        for key in ("optimizer_state", "scheduler_state"):
            state.pop(key, None)
        save_checkpoint(state, path)


def _prune(folder: Path, keep: int) -> None:
    if keep and keep > 0:
        found = list_epoch_checkpoints(folder)
        for epoch in list(found)[:-keep]:
            found[epoch].unlink(missing_ok=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        device = select_device(args.gpu)
        info = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: DistributedDataParallel
            info = dd.setup_distributed(use_cuda=device.type == "cuda")
            device = info.device
        if info is None or info.is_main:
            procs = f" x {info.world_size} processes" if info else ""
            print(f"config: {cfg['_config_path']} | {describe(cfg['model'], cfg['loss'])} | device {device}{procs}")
        try:
            result = train(cfg, resume=args.resume, overwrite=args.overwrite, speaker_size=args.speaker_size,
                           device=device, compile_model=args.compile, dist_info=info)
        finally:
            if info is not None:
                dd.cleanup()
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second Ctrl-C): nothing to save
        print("\ninterrupted; no checkpoint was written by this run", file=sys.stderr)
        return 130
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a speaker-embedding network (lab steps 2.1-2.5).

    python train.py --batchsize 64                      # x-vector + GAP + Softmax on the configured data
    python train.py --loss_type amsoftmax --pooling stats --n_folder 001
    python train.py --resume                            # continue saved_model/000 where it stopped
    python train.py --amp bf16                          # bfloat16 autocast (fast on CPUs with AMX)
    python train.py --finetune_from saved_model/000/checkpoint_030.pth --n_folder 001 --set loss.margin=0.3
    torchrun --standalone --nproc_per_node=2 train.py   # data-parallel over 2 processes

Every epoch writes ``saved_model/<n_folder>/checkpoint_<epoch:03d>.pth`` (atomically, self-describing:
``EER.py`` rebuilds the model from it alone), appends to ``train_log.csv`` and redraws
``curves.png`` (with the EER of speakers held apart, ``validation:`` in ``config.yaml``, and its best
epoch in ``best.json``: ``EER.py --cp_num best``); the last epoch is also saved under the lab's name
``<model>_<pooling>_<loss>_checkpoint.pth``. Ctrl-C or SIGTERM saves ``interrupted.pth`` first, so
``--resume`` continues mid-epoch and reproduces the losses of an uninterrupted run.

Faults: config and data-path problems stop the run before any feature extraction and before the
run folder is touched. ``--overwrite`` sets the old run aside (``.previous/``) once the new data has
been read and deletes it only when the new run has saved its first checkpoint; a run that stops
before (error, divergence, Ctrl-C) puts it back. A second ``train.py`` on a locked run folder is
refused, naming the first. A non-finite loss or weight stops training with the epoch and step; the
last good checkpoint stays. ``--resume`` continues from the newest readable resumable checkpoint
(unreadable newer ones are kept as ``*.unreadable``, and named) and refuses when there is none, a
checkpoint of another model/loss/feature configuration, or one that would overwrite a newer readable
checkpoint; it applies a changed ``--lr``. Temporary files left by a killed save are removed at the
next start. The run ends by printing the ``EER.py`` command that evaluates it.

The machinery lives in ``svlab``: ``svlab.training`` (precision, schedule, signals, divergence checks,
torch.compile), ``svlab.run_folder`` (what a run writes and resumes from), ``svlab.distributed`` (DDP).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import SpkTrainDataset
from svlab import distributed as dd
from svlab.checkpoint import finetune_config, run_folder
from svlab.config import CHOICES, load_config, parse_override
from svlab.cpu_runtime import keep_freed_memory, warm_up_vector_math
from svlab.demo_corpus import ensure_demo_corpus
from svlab.embedding import select_device
from svlab.errors import ConfigError, DataError, LabError
from svlab.feature_cache import extract_training_share
from svlab.features import feature_dim
from svlab.manifests import check_training_data, training_roots
from svlab.models import build_loss, build_model, check_model_size, describe
from svlab.run_folder import EVAL_SECTIONS, RunFolder, RunSession, kept_validation, next_command, prepare
from svlab.training import (StopFlag, amp_dtype_for, autocast, check_loss, check_weights, compile_with_fallback,
                            lr_lambda, quiet, warm_up_margin)
from svlab.validation import best_record, prepare as prepare_validation


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train an x-vector / ECAPA-TDNN speaker embedding network.")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU (default: GPU 0 if present)")
    ap.add_argument("--n_folder", default=None, help="run folder under train.save_dir (default: train.n_folder)")
    ap.add_argument("--model", choices=CHOICES["model.name"], default=None, help="embedding network")
    ap.add_argument("--pooling", choices=CHOICES["model.pooling"], default=None, help="temporal pooling")
    ap.add_argument("--loss_type", choices=CHOICES["loss.type"], default=None, help="loss head")
    ap.add_argument("--batchsize", type=int, default=None, help="utterance crops per step (train.batchsize)")
    ap.add_argument("--speaker_size", type=int, default=None,
                    help="number of training speakers (default: taken from the manifest)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs to train (train.epochs)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (train.lr)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    ap.add_argument("--crop_frames", type=int, default=None, help="training crop length in frames of 10 ms")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set loss.margin=0.3 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    ap.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")
    ap.add_argument("--finetune_from", default=None, help="fine-tune (train.finetune_from): start from this "
                    "checkpoint's network, loss head and settings, e.g. with longer crops and a larger loss.margin")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (falls back if unsupported)")
    ap.add_argument("--amp", choices=CHOICES["train.amp"], default=None,
                    help="mixed precision (train.amp): auto = bf16/fp16 on a GPU, fp32 on the CPU; "
                         "bf16 trains faster on CPUs with AMX or AVX512-BF16")
    return ap


def config_from_args(args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(s) for s in args.set)
    flags = {
        "train.n_folder": args.n_folder, "model.name": args.model, "model.pooling": args.pooling,
        "loss.type": args.loss_type, "train.batchsize": args.batchsize, "train.epochs": args.epochs,
        "train.lr": args.lr, "train.seed": args.seed, "train.crop_frames": args.crop_frames, "train.amp": args.amp,
        "train.finetune_from": args.finetune_from,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})  # unset flags keep --set values
    return load_config(args.config, overrides)


def train(cfg: dict, resume: bool = False, overwrite: bool = False, speaker_size: int | None = None,
          device: torch.device | None = None, compile_model: bool = False, log=print,
          stop_after_steps: int | None = None, dist_info=None) -> dict:
    """Train with configuration ``cfg``; returns ``{"run_folder", "final_checkpoint", "history",
    "interrupted"}`` (no ``final_checkpoint`` when interrupted).

    ``stop_after_steps`` simulates an interruption after that many optimiser steps (for tests).
    ``dist_info`` (``distributed.DistInfo``, from ``torchrun``): ``train.batchsize`` is then the global
    batch, split evenly over the processes; only rank 0 writes files.
    """
    info = dist_info or dd.DistInfo(device=device or torch.device("cpu"))
    log = log if info.is_main else quiet
    cfg, source = finetune_config(cfg, log)  # train.finetune_from: the source's network, head and settings
    device, tcfg = info.device, cfg["train"]
    folder = run_folder(cfg)  # inside train.save_dir, or a one-line ConfigError
    # Order matters: every check that can fail fast runs before the slow feature extraction, and
    # nothing in the run folder is changed before the data has been read successfully.
    if tcfg["batchsize"] % info.world_size:
        raise ConfigError(f"train.batchsize {tcfg['batchsize']} is the global batch and must be divisible by the "
                          f"{info.world_size} processes")
    check_model_size(cfg["model"], feature_dim(cfg["features"]))  # an absurd network is refused before any work
    # the folder is locked for this run and refused if reused without --resume/--overwrite; a previous run
    # set aside by --overwrite is put back if this one ends (error, Ctrl-C) before its first checkpoint
    with RunSession(folder, info, resume=resume, overwrite=overwrite, log=log):
        warm_up_vector_math()  # before any multi-threaded float math: exact, reproducible results
        batch_per_process = tcfg["batchsize"] // info.world_size
        amp_dtype = amp_dtype_for(cfg, device, log)
        if amp_dtype is not None:
            log(f"mixed precision: torch.autocast {str(amp_dtype).replace('torch.', '')} on {device.type} "
                f"(train.amp={tcfg['amp']}); weights, optimiser and checkpoints stay float32")

        # ---- data: the random crops of the training utterances (rank 0 prepares, the others then read)
        with dd.main_process_first(info):
            ensure_demo_corpus(*training_roots(cfg["data"]), log=log)
            check_training_data(cfg)  # manifest parses, data.root holds its files: one message, before any work
        t0 = time.perf_counter()
        if info.distributed:  # every rank extracts its share of the feature store's shards (svlab.feature_store)
            extract_training_share(cfg, info.rank, info.world_size, lambda: dd.barrier(info), log)
        with dd.main_process_first(info):
            dataset = SpkTrainDataset(cfg, log=log)
        n_manifest_speakers = len({u.speaker for u in dataset.utterances if u.speaker in dataset.manifest_speakers})
        if speaker_size is not None and speaker_size != n_manifest_speakers:
            raise ConfigError(f"--speaker_size {speaker_size} but {cfg['data']['train_manifest']} has "
                              f"{n_manifest_speakers} speakers; drop --speaker_size or fix the manifest")
        # validation: speakers held apart leave the training classes (or a given list); rank 0 scores them
        validator = prepare_validation(cfg, dataset, kept_validation(folder, resume, source), info.is_main, log)
        n_classes = len(dataset.speakers)  # speed-perturbed copies as new speakers count as classes too
        if n_classes < 2:
            raise DataError(f"{cfg['data']['train_manifest']}: training needs at least 2 speakers, found {n_classes}"
                            + (f" after skipping {len(dataset.skipped)} unusable file(s)" if dataset.skipped else ""))
        log(f"training data: {len(dataset)} utterances, {n_classes} speakers "
            f"(features ready in {time.perf_counter() - t0:.1f}s)")
        if info.is_main:
            prepare(folder, clear=overwrite and not resume, log=log)
        dd.barrier(info)

        # ---- model, loss and optimiser (lab step 2.4)
        torch.manual_seed(tcfg["seed"])
        # =====> code <=====
        model = build_model(cfg["model"], feature_dim(cfg["features"])).to(device)
        criterion = build_loss(cfg["loss"], cfg["model"]["embedding_size"], n_classes).to(device)
        optimizer = torch.optim.Adam([*model.parameters(), *criterion.parameters()], lr=tcfg["lr"],
                                     weight_decay=tcfg["weight_decay"])
        # =====> code <=====
        steps_per_epoch = dd.steps_per_epoch(len(dataset), batch_per_process, info)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, steps_per_epoch))
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # float16 only
        # the run folder keeps the modules themselves: wrapped below, they train the same weights
        run = RunFolder(cfg, model, criterion, optimizer, scheduler, scaler, dataset.speakers, log, info.is_main)
        run.validation, run.source = validator.state, source  # the split, saved in every checkpoint: --resume keeps it
        history, start_epoch, skip_steps, partial = run.resume() if resume else run.start()
        run.write_config(dataset.skipped, resume)

        if tcfg["keep_freed_memory"]:  # after feature extraction: its variable-size arrays would fragment the heap
            applied, why = keep_freed_memory()
            if not applied:
                log(f"note: train.keep_freed_memory has no effect here: {why}")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        head = criterion  # the loss head itself, whose margin warms up
        if compile_model:
            model = compile_with_fallback(model, log)
        model, criterion = dd.wrap_model(model, info), dd.wrap_model(criterion, info)  # DDP: gradients averaged

        # ---- training loop
        epochs = tcfg["epochs"]
        total_steps_done = 0
        with StopFlag() as stop:
            for epoch in range(start_epoch, epochs + 1):
                dataset.set_epoch(epoch)  # the epoch's crops
                if info.distributed:
                    order = dict(sampler=dd.make_sampler(dataset, info, seed=tcfg["seed"], epoch=epoch))
                else:
                    order = dict(shuffle=True, generator=torch.Generator().manual_seed(tcfg["seed"] * 100_003 + epoch))
                loader = DataLoader(dataset, batch_size=batch_per_process, collate_fn=dataset.collate_fn,
                                    num_workers=tcfg["num_workers"], pin_memory=device.type == "cuda", **order)
                model.train()
                criterion.train()
                sums = {"loss": 0.0, "acc": 0.0, "n": 0, "seconds": 0.0}
                if skip_steps:  # the saved partial sums are already totals over all processes: count them once
                    sums = dict(partial) if info.is_main else {**sums, "seconds": partial["seconds"]}
                t_epoch = time.perf_counter()
                bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr,
                           disable=None)
                for step, (x, y) in enumerate(bar):
                    if step < skip_steps:
                        continue
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    warm_up_margin(head, cfg["loss"], epoch, step, steps_per_epoch)
                    with autocast(device, amp_dtype):
                        # =====> code <=====
                        embeddings = model(x)                    # (batch, embedding_size)
                        loss, acc = criterion(embeddings, y)     # scalar loss, accuracy in %
                        # =====> code <=====
                    check_loss(loss, info, epoch, step + 1, folder)  # on every process: all stop at the same step
                    # =====> code <=====
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    # =====> code <=====
                    scheduler.step()

                    n = y.shape[0]
                    sums["loss"] += loss.item() * n
                    sums["acc"] += acc.item() * n
                    sums["n"] += n
                    total_steps_done += 1
                    bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", acc=f"{sums['acc'] / sums['n']:.1f}%")
                    stopping = stop.signum is not None or (stop_after_steps is not None
                                                           and total_steps_done >= stop_after_steps)
                    if dd.any_rank(stopping, info):  # Ctrl-C / SIGTERM: save where we are, then stop
                        totals = dd.all_reduce_sum([sums["loss"], sums["acc"], sums["n"]], info)
                        partial = {**dict(zip(("loss", "acc", "n"), totals)),
                                   "seconds": sums["seconds"] + time.perf_counter() - t_epoch}
                        run.save_interrupted(epoch, step + 1, partial, history)
                        return {"run_folder": folder, "interrupted": True, "history": history}
                bar.close()
                skip_steps = 0

                # ---- end of epoch: log, check, save
                if info.distributed:  # epoch means over every process's crops
                    sums["loss"], sums["acc"], sums["n"] = dd.all_reduce_sum(
                        [sums["loss"], sums["acc"], sums["n"]], info)
                seconds = sums["seconds"] + time.perf_counter() - t_epoch
                record = {"epoch": epoch, "loss": sums["loss"] / max(sums["n"], 1),
                          "acc": sums["acc"] / max(sums["n"], 1),
                          "lr": optimizer.param_groups[0]["lr"], "margin": getattr(head, "margin", 0.0),
                          "seconds": round(seconds, 3)}
                check_weights([run.model, run.criterion], epoch, steps_per_epoch, folder)  # never saved if not finite
                record.update(validator.evaluate(run.model, device))  # the model itself, not its DDP wrapper
                history.append(record)
                log(f"Train Stage: {epoch}/{epochs} ===> Loss {record['loss']:.4f} Acc {record['acc']:.2f}%"
                    f"{validator.describe(record)}"
                    f"  (lr {record['lr']:.2e}, {seconds:.1f}s)")
                if info.is_main:
                    run.save_epoch(epoch, history)
                dd.barrier(info)  # every rank waits for rank 0's checkpoint, so each can resume from it

        final = run.finish()
        log(f"done: {len(history)} epochs in {folder}; final checkpoint {final}")
        last = str(history[-1]["epoch"])
        log(f"next, evaluate it: {next_command('EER.py', cfg, '--cp_num', last, sections=EVAL_SECTIONS)}")
        if best_record(history):
            log(f"or its best validation epoch ({best_record(history)['epoch']}): "
                f"{next_command('EER.py', cfg, '--cp_num', 'best', sections=EVAL_SECTIONS)}")
        return {"run_folder": folder, "final_checkpoint": final, "history": history, "interrupted": False}


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
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second Ctrl-C): nothing to save
        print("\ninterrupted; no checkpoint was written by this run", file=sys.stderr)
        return 130
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())

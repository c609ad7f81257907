"""Lab step 3: evaluate a trained checkpoint on the trial list (3.1 embed and score, 3.2 ROC and EER).

    python EER.py --cp_num 30                 # saved_model/000/checkpoint_030.pth; best: lowest validation EER
    python EER.py                             # test.model_path from config.yaml
    python EER.py --baseline                  # no-training baseline: mean+std of raw MFCCs, cosine
    python EER.py --cp_num 30 --score_norm asnorm          # AS-norm with a training-speaker cohort
    python EER.py --cp_num 30 --backend plda --calibrate   # PLDA back-end + calibrated LLRs
    python EER.py --cp_num 30 --save_embeddings --report   # also embeddings.npy and the run report

Prints the lab's line ``Epoch=30 EER= 3.25 Thres= 0.61234 (trials: files/trials.txt)``, writes ``scores.txt``,
``metrics.json``, ``roc.png``, ``det.png``, ``hist.png`` to ``saved_model/<n_folder>/eval_<NNN>/`` (named after
the system, and the trial list when not the run's own: ``svlab/evaluation.py``), all at once. The data and
test settings not given explicitly are the run's own (``config`` recorded in the checkpoint).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve
from tqdm import tqdm

from dataset import SpkTestDataset
from svlab import evaluation, metrics, validation
from svlab.checkpoint import load_checkpoint, run_folder
from svlab.guard import one_line, run_command, say
from svlab.config import CHOICES, config_path_value, load_config, parse_override, resolve_path
from svlab.cpu_runtime import warm_up_vector_math
from svlab.embedding import cli_path, select_device, write_embeddings
from svlab.models import model_from_checkpoint
from svlab.report import write_report
from svlab.scoring_system import fit_or_load_backend, score_trials, scoring_options

SCORE_CHUNK = 1 << 12  # trials scored at once: memory stays bounded for any number of trials


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Score a trial list with a trained checkpoint: EER, minDCF, "
                                             "ROC/DET/score histogram; optional PLDA, AS-norm, calibration.")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--cp_num", type=validation.epoch_arg, default=None, help="epoch of saved_model/<n_folder>/"
                    "checkpoint_<NNN>.pth, or best: the lowest validation EER (default: test.model_path)")
    ap.add_argument("--n_folder", default=None, help="run folder under saved_model/ (default: train.n_folder)")
    ap.add_argument("--checkpoint", default=None, help="explicit checkpoint file (overrides --cp_num)")
    ap.add_argument("--out", default=None, help="output folder (default: saved_model/<n_folder>/eval_<NNN>/)")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU")
    ap.add_argument("--baseline", action="store_true",
                    help="score the no-training baseline (mean+std of raw MFCCs) instead of a checkpoint")
    ap.add_argument("--backend", choices=CHOICES["test.backend"], default=None,
                    help="cosine scoring or a PLDA back-end trained on training-set embeddings (default: test.backend)")
    ap.add_argument("--score_norm", choices=CHOICES["test.score_norm"], default=None,
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
                    help="also write embeddings.npy (float32) + embeddings_index.txt and Kaldi's xvector.ark/.scp")
    ap.add_argument("--report", action="store_true",
                    help="afterwards write report.md / report.html in the checkpoint's run folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return ap


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """3.1: the trained embedding network of ``checkpoint`` (in eval mode) and the checkpoint's contents."""
    # =====> code <=====
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, device)
    # =====> code <=====
    return model, state


@torch.no_grad()
def embed(model: torch.nn.Module, dataset: SpkTestDataset, batch_size: int, device: torch.device) -> np.ndarray:
    """3.1: embeddings ``(n_utterances, embedding_size)`` of the test utterances, in dataset order.

    Only utterances of the same length share a batch (no padding), so batching changes nothing.
    """
    warm_up_vector_math()  # exact float math in the model's first multi-threaded calls (svlab/cpu_runtime.py)
    embeddings = [None] * len(dataset)
    # =====> code <=====
    for batch in tqdm(dataset.equal_length_batches(batch_size), desc="embedding", leave=False, disable=None):
        x = torch.stack([dataset[i][0] for i in batch]).to(device)   # (batch, n_mfcc, frames)
        out = model(x).float().cpu().numpy()                          # (batch, embedding_size)
        for i, e in zip(batch, out):
            embeddings[i] = e
    # =====> code <=====
    return np.stack(embeddings)


def cosine_score(enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """3.1: cosine similarity of each enrolment embedding with its test embedding.

    enroll, test: ``(n_trials, embedding_size)`` float32, row i = trial i -> ``(n_trials,)`` float32.
    """
    # =====> code <=====
    enroll = F.normalize(torch.from_numpy(enroll), dim=1)
    test = F.normalize(torch.from_numpy(test), dim=1)
    scores = (enroll * test).sum(dim=1)
    # =====> code <=====
    return scores.numpy()


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """3.2: the ROC and its EER point: ``(far, frr, eer, threshold)``.

    far / frr: false-accept and false-reject rates when accepting ``score >= t``, for every distinct
    score ``t`` (decreasing). The EER is where FAR = FRR; it lies between two ROC points, where we
    interpolate linearly, and the threshold the same way.
    """
    # =====> code <=====
    scores = np.asarray(scores, dtype=np.float64)
    far, tar, thresholds = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    frr = 1.0 - tar
    diff = frr - far
    k = int(np.argmax(diff <= 0))  # first point where false rejects no longer exceed false accepts
    if diff[k] == 0 or k == 0:
        eer, threshold = far[k], thresholds[k]
    else:
        t = diff[k - 1] / (diff[k - 1] - diff[k])
        eer = far[k - 1] + t * (far[k] - far[k - 1])
        if np.isinf(thresholds[k - 1]):  # the first ROC point accepts nothing: threshold +inf
            threshold = thresholds[k]
        else:
            threshold = thresholds[k - 1] + t * (thresholds[k] - thresholds[k - 1])
    # =====> code <=====
    return far, frr, float(eer), float(threshold)


def evaluate(cfg: dict, checkpoint: Path | None, out_dir: Path | None = None, device=None, log=say,
             baseline: bool = False, *, backend: str | None = None, score_norm: str | None = None,
             asnorm_top_n: int | None = None, center: bool | None = None, calibrate: bool | None = None,
             retrain_backend: bool = False, save_embeddings: bool = False, report: bool = False) -> dict:
    """Embed the test utterances, score every trial, compute EER/minDCF, write outputs; return metrics.

    Keyword options default to the ``test.*`` config keys (``backend``, ``score_norm``, ``asnorm_top_n``,
    ``center``, ``calibrate``); the ``data`` and ``test`` keys the user did not give come from the run
    (``evaluation.with_run_settings``). The output folder changes only once everything is written.
    """
    device, state, model = device or torch.device("cpu"), None, None
    checkpoint = None if baseline else Path(checkpoint)
    if not baseline:
        model, state = load_model(checkpoint, device)                                  # 3.1
        log(f"checkpoint: {checkpoint} ({one_line(state.get('tag', 'model'))}, epoch {state['epoch']})")
        cfg = evaluation.with_run_settings(cfg, state, checkpoint, log)
    opts = scoring_options(cfg, backend, score_norm, asnorm_top_n, center, calibrate)
    batch_size = cfg["test"]["batch_size"]
    test = evaluation.read_test_trials(cfg, log)
    out_dir = Path(out_dir) if out_dir is not None else \
        evaluation.evaluation_folder(checkpoint, opts, cfg, evaluation.trials_tag(test, state))
    with evaluation.EvaluationFolder(out_dir, test, log) as work:  # refused here if out_dir must not be replaced
        if baseline:
            feat_cfg = cfg["features"]
            system = "baseline (MFCC mean+std)"
            t0 = time.perf_counter()
            rows, root = test.needed, config_path_value(cfg, "test.root")
            emb = evaluation.mfcc_stats_embeddings(test.audio_paths(root, rows), feat_cfg)
        else:
            feat_cfg = evaluation.checkpoint_settings(cfg, state, checkpoint, test, log)
            system = f"{state.get('tag', 'model')} epoch {state['epoch']}"
            t0 = time.perf_counter()
            dataset = SpkTestDataset({**cfg, "features": feat_cfg}, log=log, relpaths=test.needed)
            emb = embed(model, dataset, batch_size, device)                            # 3.1
            rows = [u.relpath for u in dataset.utterances]
        t_embed = time.perf_counter() - t0

        embed_paths = evaluation.training_embedder(model, feat_cfg, batch_size, device, log,
                                                   max_frames=cfg["test"]["batch_frames"])
        fb, backend_details = fit_or_load_backend(opts, cfg, state, checkpoint, feat_cfg, out_dir, retrain_backend,
                                                  embed_paths, log, save_dir=work.path)
        index = {r: i for i, r in enumerate(rows)}
        enroll_idx = np.array([index[t.enroll] for t in test.trials], dtype=np.int64)
        test_idx = np.array([index[t.test] for t in test.trials], dtype=np.int64)
        labels = np.array([t.label for t in test.trials], dtype=np.int64)
        t1 = time.perf_counter()
        if opts.plain:  # the lab's system: cosine similarity of the embeddings (3.1)
            scores = np.concatenate([cosine_score(emb[enroll_idx[s:s + SCORE_CHUNK]], emb[test_idx[s:s + SCORE_CHUNK]])
                                     for s in range(0, len(labels), SCORE_CHUNK)])
        else:  # centering, PLDA, AS-norm
            scores = score_trials(fb, opts, emb, enroll_idx, test_idx)
        t_score = time.perf_counter() - t1

        result = metrics.summary(scores, labels)  # minDCF and trial counts (and a clear error for a one-class list)
        far, frr, eer, threshold = roc(scores, labels)                                 # 3.2
        result.update(eer=eer, threshold=threshold, **evaluation.bootstrap_intervals(cfg, test, scores, labels))
        result.update(evaluation.describe_run(opts, checkpoint, state, test, len(emb), f"{system}, {opts.label}",
                                              t_embed, t_score))
        result.update(backend_details)
        llr = None
        if opts.calibrate:
            llr, calibration = evaluation.calibration_metrics(fb, scores, labels)
            result.update(calibration)
        evaluation.write_outputs(work.path, test, scores, labels, far, frr, result, opts, checkpoint, llr)
        if save_embeddings:
            write_embeddings(work.path / "embeddings.npy", emb, rows, kaldi_at=out_dir, log=log)
        if checkpoint is not None:  # right after the new folder is in place
            work.after_commit.append(lambda: evaluation.record_evaluation(checkpoint, out_dir / "metrics.json",
                                                                          result, log))
    result["out_dir"] = str(out_dir)
    log(f"Epoch={state['epoch'] if state else '-'} EER= {eer * 100:.2f} Thres= {threshold:.5f} "
        f"(trials: {evaluation.display_path(test.trials_path)})")
    evaluation.log_details(result, opts, out_dir, log, embeddings=len(emb) if save_embeddings else None)
    if report:
        if checkpoint is None:
            log("note: --report needs a checkpoint's run folder; no report for the baseline")
        else:
            result["report"] = str(write_report(checkpoint.parent, log=log)[1])
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # a user error: one line 'error: ...', exit 2; Ctrl-C / SIGTERM: one line, exit 130, folder unchanged
    return run_command(lambda: run(args), evaluation.interruption_note())


def run(args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(s) for s in args.set)
    if args.n_folder is not None:  # (None would also drop a --set train.n_folder=...)
        overrides["train.n_folder"] = args.n_folder
    cfg = load_config(args.config, overrides)
    if args.baseline:
        checkpoint = None
    elif args.checkpoint:
        checkpoint = cli_path(args.checkpoint)
    elif args.cp_num is not None:
        checkpoint = validation.checkpoint_path(run_folder(cfg), args.cp_num, say)  # an epoch, or "best"
    else:
        checkpoint = config_path_value(cfg, "test.model_path")
    return evaluate(cfg, checkpoint, resolve_path(args.out) if args.out else None, device=select_device(args.gpu),
                    baseline=args.baseline, backend=args.backend, score_norm=args.score_norm,
                    asnorm_top_n=args.asnorm_top_n, center=args.center, calibrate=args.calibrate,
                    retrain_backend=args.retrain_backend, save_embeddings=args.save_embeddings, report=args.report)


if __name__ == "__main__":
    sys.exit(main())

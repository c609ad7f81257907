"""Evaluate a checkpoint on the trial list (lab steps 3.1-3.2): embeddings, cosine scores, EER, ROC.

    python EER.py --cp_num 30                 # saved_model/000/checkpoint_030.pth
    python EER.py                             # test.model_path from config.yaml
    python EER.py --baseline                  # no-training baseline: mean+std of raw MFCCs, cosine

Prints the lab's line ``Epoch=30 EER= 3.25 Thres= 0.61234`` and writes, in
``saved_model/<n_folder>/eval_<NNN>/``: ``scores.txt`` (ENROLL TEST SCORE), ``metrics.json`` and
``roc.png`` (ROC with the EER point).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import metrics
from checkpoint import CheckpointError, atomic_write, epoch_checkpoint_path, load_checkpoint
from config import ConfigError, config_path_value, load_config, parse_override, resolve_path
from dataset import DataError, SpkTestDataset, feature_signature, load_audio, mfcc, read_trials
from demo_corpus import ensure_demo_corpus
from speaker_model import model_from_checkpoint


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Score a trial list with a trained checkpoint: EER, threshold, ROC.")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--cp_num", type=int, default=None,
                    help="epoch of saved_model/<n_folder>/checkpoint_<NNN>.pth (default: test.model_path)")
    ap.add_argument("--n_folder", default=None, help="run folder under saved_model/ (default: train.n_folder)")
    ap.add_argument("--checkpoint", default=None, help="explicit checkpoint file (overrides --cp_num)")
    ap.add_argument("--out", default=None, help="output folder (default: saved_model/<n_folder>/eval_<NNN>/)")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU")
    ap.add_argument("--baseline", action="store_true",
                    help="score the no-training baseline (mean+std of raw MFCCs, cosine) instead of a checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return ap


def resolve_checkpoint(cfg: dict, cp_num: int | None, checkpoint: str | None) -> Path:
    if checkpoint:
        return resolve_path(checkpoint)
    if cp_num is not None:
        return epoch_checkpoint_path(config_path_value(cfg, "train.save_dir") / str(cfg["train"]["n_folder"]), cp_num)
    return config_path_value(cfg, "test.model_path")


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


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: SpkTestDataset, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """Embeddings ``(n_utts, embedding_size)`` in dataset order; equal-length batches, so exact."""
    from tqdm import tqdm
    out = None
    for idx in tqdm(dataset.equal_length_batches(batch_size), desc="embedding", unit="batch", leave=False,
                    file=sys.stderr, disable=None):
        x = torch.stack([torch.from_numpy(dataset.features[i]) for i in idx]).to(device)
        e = model(x).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(dataset), e.shape[1]), dtype=np.float32)
        out[idx] = e
    return out


def cosine_scores(emb: np.ndarray, enroll_idx: np.ndarray, test_idx: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Cosine similarity of embedding pairs, vectorised in chunks (memory bounded for huge trial lists)."""
    e = F.normalize(torch.from_numpy(np.asarray(emb, dtype=np.float32)), dim=1)
    a = torch.from_numpy(np.asarray(enroll_idx, dtype=np.int64))
    b = torch.from_numpy(np.asarray(test_idx, dtype=np.int64))
    scores = torch.empty(a.numel(), dtype=torch.float32)
    for s in range(0, a.numel(), chunk):
        scores[s:s + chunk] = (e[a[s:s + chunk]] * e[b[s:s + chunk]]).sum(dim=1)
    return scores.numpy()


def mfcc_stats_embeddings(paths: list[Path], feat_cfg: dict) -> np.ndarray:
    """No-training baseline: mean and standard deviation of raw (not mean-normalised) MFCCs."""
    rows = []
    for p in paths:
        f = mfcc(load_audio(p, feat_cfg["sample_rate"]), feat_cfg, mean_norm=False)
        rows.append(np.concatenate([f.mean(axis=1), f.std(axis=1)]))
    return np.stack(rows).astype(np.float32)


def _write_outputs(out_dir: Path, trials, scores: np.ndarray, result: dict, curve, label: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{t.enroll} {t.test} {s:.6f}\n" for t, s in zip(trials, scores))
    atomic_write(out_dir / "scores.txt", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    from plots import plot_roc
    plot_roc(curve.fpr, curve.fnr, result["eer"], result["threshold"], out_dir / "roc.png", label=label,
             title=f"ROC: {label}")


def evaluate(cfg: dict, checkpoint: Path | None, out_dir: Path | None = None, device=None, log=print,
             baseline: bool = False) -> dict:
    """Embed the test utterances, score every trial, compute EER/minDCF, write outputs; return metrics."""
    device = device or torch.device("cpu")
    ensure_demo_corpus(cfg["test"]["root"], log=log)
    trials_path = config_path_value(cfg, "test.trials")
    manifest = config_path_value(cfg, "test.test_manifest")
    trials = read_trials(trials_path, key="test.trials")
    if baseline:
        state, feat_cfg, label = None, cfg["features"], "baseline (MFCC mean+std, cosine)"
    else:
        state = load_checkpoint(checkpoint)
        feat_cfg = {**cfg["features"], **state["config"]["features"],
                    "cache_dir": cfg["features"]["cache_dir"]}
        if feature_signature(feat_cfg) != feature_signature(cfg["features"]):
            log("note: using the checkpoint's feature settings, which differ from the config's")
        label = f"{state.get('tag', 'model')} epoch {state['epoch']}"
    eval_cfg = {**cfg, "features": feat_cfg}
    from dataset import read_manifest
    test_utts = {u.relpath for u in read_manifest(manifest, key="test.test_manifest")}
    needed = trial_utterances(trials, test_utts, trials_path, manifest)

    t0 = time.perf_counter()
    if baseline:
        root = config_path_value(cfg, "test.root")
        emb = mfcc_stats_embeddings([root / r for r in needed], feat_cfg)
        index = {r: i for i, r in enumerate(needed)}
    else:
        dataset = SpkTestDataset(eval_cfg, log=log, relpaths=needed)
        model = model_from_checkpoint(state, device)
        emb = embed_dataset(model, dataset, cfg["test"]["batch_size"], device)
        index = dataset.index
    t_embed = time.perf_counter() - t0
    enroll_idx = np.array([index[t.enroll] for t in trials])
    test_idx = np.array([index[t.test] for t in trials])
    labels = np.array([t.label for t in trials])
    t1 = time.perf_counter()
    scores = cosine_scores(emb, enroll_idx, test_idx)
    t_score = time.perf_counter() - t1

    eer, thr = metrics.compute_eer(scores, labels)
    dcf01, dcf01_thr = metrics.min_dcf(scores, labels, p_target=0.01)
    dcf001, dcf001_thr = metrics.min_dcf(scores, labels, p_target=0.001)
    result = {
        "eer": eer, "threshold": thr,
        "min_dcf_0.01": dcf01, "min_dcf_0.01_threshold": dcf01_thr,
        "min_dcf_0.001": dcf001, "min_dcf_0.001_threshold": dcf001_thr,
        "n_target": int(labels.sum()), "n_nontarget": int((labels == 0).sum()), "n_utterances": int(len(emb)),
        "checkpoint": str(checkpoint) if checkpoint else None, "epoch": state["epoch"] if state else None,
        "trials": str(trials_path), "backend": "cosine", "system": label,
        "embed_seconds": round(t_embed, 3), "score_seconds": round(t_score, 4),
    }
    if out_dir is None:
        if baseline:
            out_dir = config_path_value(cfg, "train.save_dir") / "baseline"
        else:
            out_dir = Path(checkpoint).parent / f"eval_{Path(checkpoint).stem.replace('checkpoint_', '')}"
    curve = metrics.error_curve(scores, labels)
    _write_outputs(Path(out_dir), trials, scores, result, curve, label)
    result["out_dir"] = str(out_dir)
    epoch_text = state["epoch"] if state else "-"
    log(f"Epoch={epoch_text} EER= {eer * 100:.2f} Thres= {thr:.5f}")
    log(f"minDCF(0.01)= {dcf01:.4f} minDCF(0.001)= {dcf001:.4f} | {result['n_target']} target / "
        f"{result['n_nontarget']} non-target trials | ROC: {Path(out_dir) / 'roc.png'}")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        overrides["train.n_folder"] = args.n_folder
        cfg = load_config(args.config, overrides)
        from train import select_device
        device = select_device(args.gpu)
        checkpoint = None if args.baseline else resolve_checkpoint(cfg, args.cp_num, args.checkpoint)
        evaluate(cfg, checkpoint, resolve_path(args.out) if args.out else None, device=device,
                 baseline=args.baseline)
    except (ConfigError, DataError, CheckpointError, metrics.MetricError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

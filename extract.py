"""Embed any audio with a trained checkpoint (whole utterances, the checkpoint's own feature settings).

    python extract.py --checkpoint saved_model/000/checkpoint_030.pth --list files.txt --out emb.npy
    python extract.py --list files.txt --root F:/DataSet/Aishell/ALL --out emb.npy   # test.model_path

``files.txt`` lists one audio path per line, relative to ``--root`` (default: the folder the list is
in) or absolute. Any sample rate and mono or stereo: audio is averaged to mono and resampled to the
rate the model was trained at. Writes ``emb.npy`` (float32, one row per listed file, in list order)
and ``emb_index.txt`` (the path of each row, as written in the list).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError, atomic_write, load_checkpoint
from config import ConfigError, config_path_value, load_config, parse_override, resolve_path
from dataset import DataError, feature_signature, load_features


def cli_path(text: str) -> Path:
    """A path given on the command line: relative to the working directory if it exists there, else
    relative to the project folder (like config paths)."""
    here = resolve_path(text, base=Path.cwd())
    return here if here.exists() else resolve_path(text)


def checkpoint_features(cfg: dict, state: dict, log=print, cache: bool = True) -> dict:
    """Feature settings to embed with: the checkpoint's recorded ones (a model only works with the
    features it was trained on); the disk cache folder comes from ``cfg`` (``cache=False``: none)."""
    feat_cfg = {**cfg["features"], **state["config"]["features"],
                "cache_dir": cfg["features"]["cache_dir"] if cache else ""}
    if feature_signature(feat_cfg) != feature_signature(cfg["features"]):
        log("note: using the checkpoint's feature settings, which differ from the config's")
    return feat_cfg


def equal_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by identical length (batched embedding without padding is exact)."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(int(n), []).append(i)
    return [idx[j:j + batch_size] for _, idx in sorted(by_len.items()) for j in range(0, len(idx), batch_size)]


@torch.no_grad()
def embed_features(model: torch.nn.Module, features: list[np.ndarray], batch_size: int,
                   device: torch.device | str = "cpu", desc: str = "embedding") -> np.ndarray:
    """Embeddings ``(n, embedding_size)`` float32 of whole-utterance features ``(n_mfcc, frames)``."""
    from tqdm import tqdm
    device = torch.device(device)
    out = None
    batches = equal_length_batches([f.shape[1] for f in features], batch_size)
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=None):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(features[i])) for i in idx]).to(device)
        e = model(x).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(features), e.shape[1]), dtype=np.float32)
        out[idx] = e
    if out is None:
        raise DataError("nothing to embed: no utterances")
    return out


def embed_files(model: torch.nn.Module, paths: list[Path], feat_cfg: dict, batch_size: int = 64,
                device: torch.device | str = "cpu", policy: str = "error", log=print,
                desc: str = "MFCC") -> tuple[np.ndarray, list[int], list[str]]:
    """Embed audio files: ``(embeddings of the usable files, their indices in paths, problems)``.

    ``policy="error"`` raises one DataError listing every unusable file; ``"skip"`` leaves them out.
    """
    feats, kept, problems = load_features([Path(p) for p in paths], feat_cfg, policy=policy, log=log, desc=desc)
    if not feats:
        raise DataError(f"none of the {len(paths)} audio file(s) could be used: {'; '.join(problems[:5])}")
    return embed_features(model, feats, batch_size, device), kept, problems


def read_list(list_path: Path, root: Path | None = None) -> tuple[list[str], list[Path]]:
    """Entries of an audio list (one path per line; blank lines and ``#`` comments ignored) and the
    resolved paths (relative ones against ``root``, default the list's folder)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"audio list not found: {list_path}")
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{list_path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not entries:
        raise DataError(f"{list_path}: the list has no audio paths")
    base = Path(root) if root is not None else list_path.resolve().parent
    return entries, [resolve_path(e, base=base) for e in entries]


def index_path(out: Path) -> Path:
    """``emb.npy`` -> ``emb_index.txt``."""
    out = Path(out)
    return out.with_name(out.stem + "_index.txt")


def write_embeddings(out: Path, emb: np.ndarray, names: list[str]) -> Path:
    """Atomically write ``out`` (float32 .npy) and its index file (one name per row); returns the index path."""
    out = Path(out)

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(emb, dtype=np.float32))
    atomic_write(out, write_npy)
    idx = index_path(out)
    atomic_write(idx, lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names), encoding="utf-8"))
    return idx


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Embed a list of audio files with a trained checkpoint.")
    ap.add_argument("--checkpoint", default=None, help="checkpoint file (default: test.model_path)")
    ap.add_argument("--list", required=True, help="text file: one audio path per line")
    ap.add_argument("--root", default=None, help="folder relative list paths start from (default: the list's folder)")
    ap.add_argument("--out", required=True, help="output .npy (float32, one row per listed file)")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU")
    ap.add_argument("--batch_size", type=int, default=None, help="utterances per batch (default: test.batch_size)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, dict(parse_override(s) for s in args.set))
        ckpt = cli_path(args.checkpoint) if args.checkpoint else config_path_value(cfg, "test.model_path")
        state = load_checkpoint(ckpt)
        from speaker_model import model_from_checkpoint
        from train import select_device
        device = select_device(args.gpu)
        entries, paths = read_list(resolve_path(args.list, base=Path.cwd()),
                                   resolve_path(args.root, base=Path.cwd()) if args.root else None)
        feat_cfg = checkpoint_features(cfg, state, cache=False)
        model = model_from_checkpoint(state, device)
        emb, _, _ = embed_files(model, paths, feat_cfg, args.batch_size or cfg["test"]["batch_size"], device)
        out = resolve_path(args.out, base=Path.cwd())
        idx = write_embeddings(out, emb, entries)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(emb)} embeddings of size {emb.shape[1]} -> {out} (rows listed in {idx})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

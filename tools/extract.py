"""Embed any audio with a trained checkpoint (whole utterances, the checkpoint's own feature settings).

    python tools/extract.py --checkpoint saved_model/000/checkpoint_030.pth --list files.txt --out emb.npy
    python tools/extract.py --list files.txt --root F:/DataSet/Aishell/ALL --out emb.npy   # test.model_path
    python tools/extract.py --checkpoint model.onnx --list files.txt --out emb.npy   # onnxruntime, no torch
    python tools/extract.py --pretrained --list files.txt --out emb.npy              # svlab/pretrained/

``files.txt`` lists one audio path per line, relative to ``--root`` (default: the folder the list is
in) or absolute. Any sample rate and mono or stereo: audio is averaged to mono and resampled to the
rate the model was trained at. Writes ``emb.npy`` (float32, one row per listed file, in list order)
and ``emb_index.txt`` (the path of each row, as written in the list).

With an ``.onnx`` model (``tools/export.py``) only numpy, soundfile, librosa and onnxruntime are
imported, never torch, and no config file is read; torch is imported on the ``.pth`` path only.
Embeddings are raw (not length-normalised).

On the ``.pth`` path the listed files' features go to an on-disk feature store in ``features.cache_dir``
(``features.store: true``, the default; ``svlab.feature_store``), written as they are extracted and read one
file at a time when embedded: memory holds the embeddings, not the features, however long the list; a second
run over the same files reuses the store (checked, as training's is). ``--set features.store=false`` keeps
every file's features in RAM instead (no files written); the embeddings are the same.

``--kaldi`` also writes Kaldi's ``xvector.ark`` / ``xvector.scp`` in ``--out``'s folder (keys: the list's
entries, whitespace as ``_``; ``svlab.kaldi_data.write_xvectors``), for ``ivector-plda-scoring`` or ``kaldiio``
(that module imports torch, also beside an ``.onnx`` model). The ``.onnx`` and ``--pretrained`` paths compute the
whole list's features in RAM (``SpeakerEncoder.embed``).

``--out`` may replace only an earlier output of this command (a float32 ``.npy`` with its
``_index.txt`` of as many lines); the list, the checkpoint, the config, a listed audio file or any
other existing file is refused with one line before any work (with ``--kaldi``, an existing
``xvector.ark``/``.scp`` too, unless it sits beside an earlier output of this command).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.config import resolve_path  # noqa: E402
from svlab.embedding_files import index_path, save_embeddings  # noqa: E402
from svlab.encoder import add_model_arguments, command_encoder, command_model, is_onnx  # noqa: E402
from svlab.errors import DataError  # noqa: E402
from svlab.files import npy_header, refuse_overwrite, shown  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402


def read_list(list_path: Path, root: Path | None = None) -> tuple[list[str], list[Path]]:
    """Entries of an audio list (one path per line; blank lines and ``#`` comments ignored) and the
    resolved paths (relative ones against ``root``, default the list's folder)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"audio list not found: {shown(list_path)}")
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{shown(list_path)}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not entries:
        raise DataError(f"{shown(list_path)}: the list has no audio paths")
    base = Path(root) if root is not None else list_path.resolve().parent
    return entries, [resolve_path(e, base=base) for e in entries]


def earlier_output(out: Path) -> bool:
    """Whether ``out`` and its index file are what this command wrote: a 2-D float32 ``.npy`` and an
    ``_index.txt`` with one line per row."""
    head, idx = npy_header(out), index_path(out)
    if head is None or head[1] != "float32" or len(head[0]) != 2 or not idx.is_file():
        return False
    try:
        with open(idx, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) == head[0][0]
    except OSError:
        return False


def check_out(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an ``--out`` (or its index file) that is an input or an existing file not written here."""
    how = "a float32 .npy with its _index.txt of as many lines"
    refuse_overwrite(out, inputs=inputs, ours=lambda _: earlier_output(out), command="tools/extract.py",
                     recognised_by=how)
    refuse_overwrite(index_path(out), inputs=inputs, ours=lambda _: earlier_output(out),
                     flag="the index file of --out", command="tools/extract.py", recognised_by=how)


def check_kaldi_out(out: Path, inputs: list[tuple[str, Path]], entries: list[str]) -> None:
    """``--kaldi``: refuse, before any work, entries that would share a Kaldi key and an ``xvector.ark``/``.scp``
    that is an input or an existing file not beside an earlier output of this command."""
    from svlab.kaldi_data import XVECTOR_ARK, XVECTOR_SCP, kaldi_key
    seen: dict[str, str] = {}
    for e in entries:
        if seen.setdefault(kaldi_key(e), e) != e:
            raise DataError(f"--kaldi: {shown(seen[kaldi_key(e)])} and {shown(e)} are both Kaldi key "
                            f"{shown(kaldi_key(e))} (whitespace becomes '_'); rename one, or leave out --kaldi")
    for name in (XVECTOR_ARK, XVECTOR_SCP):
        refuse_overwrite(out.parent / name, inputs=inputs, ours=lambda _: earlier_output(out),
                         flag=f"--kaldi's {name}", command="tools/extract.py",
                         recognised_by="beside an earlier --out of this command")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Embed a list of audio files with a trained checkpoint.")
    add_model_arguments(ap)
    ap.add_argument("--list", required=True, help="text file: one audio path per line")
    ap.add_argument("--root", default=None, help="folder relative list paths start from (default: the list's folder)")
    ap.add_argument("--out", required=True, help="output .npy (float32, one row per listed file)")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU")
    ap.add_argument("--batch_size", type=int, default=None, help="utterances per batch (default: test.batch_size)")
    ap.add_argument("--kaldi", action="store_true",
                    help="also write Kaldi's xvector.ark / xvector.scp in --out's folder, keyed by the list's entries")
    return ap


def embed_pth(ckpt: Path, cfg: dict, paths: list[Path], gpu, batch_size: int | None):
    """The PyTorch path (torch imported here): embeddings of ``paths`` with checkpoint ``ckpt``."""
    from svlab.checkpoint import load_checkpoint
    from svlab.embedding import checkpoint_features, embed_files, select_device
    from svlab.models import model_from_checkpoint
    state = load_checkpoint(ckpt)
    device = select_device(gpu)
    feat_cfg = checkpoint_features(cfg, state, cache=bool(cfg["features"].get("store")))  # the store, or all in RAM
    model = model_from_checkpoint(state, device)
    return embed_files(model, paths, feat_cfg, batch_size or cfg["test"]["batch_size"], device,
                       max_frames=cfg["test"]["batch_frames"])[0]


def run(args: argparse.Namespace) -> Path:
    ckpt, cfg = command_model(args)
    list_path = resolve_path(args.list, base=Path.cwd())
    entries, paths = read_list(list_path, resolve_path(args.root, base=Path.cwd()) if args.root else None)
    out = resolve_path(args.out, base=Path.cwd())
    inputs = [("the audio list given with --list", list_path), ("the model", ckpt),
              ("the config file", (cfg or {}).get("_config_path"))]
    inputs += [("an audio file of the list", p) for p in paths]
    check_out(out, inputs)                     # before any work
    if args.kaldi:
        check_kaldi_out(out, inputs, entries)
    if ckpt is not None and not is_onnx(ckpt):
        emb = embed_pth(ckpt, cfg, paths, args.gpu, args.batch_size)
    else:                                      # onnxruntime (or the pretrained model): no torch, no config
        enc = command_encoder(ckpt, log=say)
        emb = enc.embed(paths, batch_size=args.batch_size or 64)
    check_out(out, inputs)                     # again: embedding may have taken long
    if args.kaldi:
        from svlab.kaldi_data import write_xvectors
        check_kaldi_out(out, inputs, entries)
        ark, _ = write_xvectors(out.parent, emb, entries, log=say)
        say(f"Kaldi vectors -> {shown(ark)} (.scp beside it)")
    idx = save_embeddings(out, emb, entries)
    say(f"{len(emb)} embeddings of size {emb.shape[1]} -> {shown(out)} (rows listed in {shown(idx)})")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130

if __name__ == "__main__":
    sys.exit(main())

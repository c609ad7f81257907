"""Cosine similarity of two recordings: how alike their speaker embeddings are (-1 to 1).

    python tools/similarity.py a.wav b.wav --checkpoint saved_model/000/checkpoint_030.pth
    python tools/similarity.py a.wav b.wav --checkpoint model.onnx    # onnxruntime; torch never imported
    python tools/similarity.py a.wav b.wav --pretrained               # the model shipped in svlab/pretrained/

Prints the score only; for a decision (same speaker or not, at a threshold that says where it came
from) use ``tools/verify.py``. Any sample rate, mono or stereo (averaged to mono, resampled to the
model's rate, as ``svlab.encoder.SpeakerEncoder`` does).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # two files: a progress bar is noise

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.config import resolve_path  # noqa: E402
from svlab.encoder import add_model_arguments, command_encoder, command_model  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Cosine similarity of the speaker embeddings of two recordings.")
    ap.add_argument("files", nargs=2, metavar="WAV", help="two recordings")
    add_model_arguments(ap)
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return ap


def run(args: argparse.Namespace) -> float:
    path, _ = command_model(args)
    enc = command_encoder(path, log=lambda msg: print(msg, file=sys.stderr))
    a, b = (resolve_path(p, base=Path.cwd()) for p in args.files)
    score = enc.similarity(a, b)
    say(f"{score:.5f}")
    return score


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained checkpoint to ONNX, to run without PyTorch (onnxruntime; ``svlab.encoder``).

    python tools/export.py --checkpoint saved_model/000/checkpoint_030.pth --out model.onnx
    python tools/export.py --checkpoint CKPT.pth --out model.onnx --threshold 0.57   # your own threshold

Batch and time are dynamic; the feature settings, the model, the cosine decision threshold (the EER
threshold of the checkpoint's evaluation on its run's own trial list, when ``EER.py`` has made one)
and the LLR calibration go into the file's metadata, which ``tools/extract.py``, ``tools/verify.py``,
``tools/similarity.py`` and ``SpeakerEncoder`` read. The export is checked against PyTorch before it is
written (write-then-rename); ``--out`` never replaces the checkpoint or a file that is not an earlier
export. How and why: ``svlab/onnx_export.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.config import resolve_path  # noqa: E402
from svlab.embedding_files import cli_path  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Export a trained checkpoint (.pth) to ONNX (.onnx) for onnxruntime.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint file (.pth) to export")
    ap.add_argument("--out", required=True, help="ONNX file to write (e.g. model.onnx)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="cosine decision threshold to store (default: the EER threshold of the checkpoint's "
                         "evaluation on its run's own trial list, if EER.py has made one)")
    return ap


def run(args: argparse.Namespace) -> dict:
    from svlab.onnx_export import export
    out = resolve_path(args.out, base=Path.cwd())
    result = export(cli_path(args.checkpoint), out, threshold=args.threshold, log=say)
    thr = result["threshold"]
    say(f"wrote {out} ({result['bytes'] / 1e6:.1f} MB); onnxruntime matches PyTorch to {result['parity']:.1e}")
    say(f"threshold: {'none stored' if thr is None else f'{thr:.5f}'} ({result['threshold_source']})")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130


if __name__ == "__main__":
    sys.exit(main())

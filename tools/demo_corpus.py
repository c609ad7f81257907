"""Generate the embedded synthetic demo corpus by hand (train.py and EER.py generate it on first use).

    python tools/demo_corpus.py                     # data/demo_corpus/, as train.py would
    python tools/demo_corpus.py --files files       # also restore the demo's manifests in files/

Relative paths are taken from the project folder. The synthesis itself is ``svlab/demo_corpus.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.config import resolve_path  # noqa: E402
from svlab.demo_corpus import DEFAULTS, DEMO_ROOT, generate  # noqa: E402
from svlab.guard import run_command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python tools/demo_corpus.py",
                                 description="Generate the synthetic demo corpus and its manifests.")
    ap.add_argument("--root", default=str(DEMO_ROOT), help="output folder (default: %(default)s)")
    ap.add_argument("--files", default=None, help="also write the manifests into this folder (e.g. files)")
    for key, value in DEFAULTS.items():
        ap.add_argument(f"--{key}", type=type(value), default=value, help=f"default: {value}")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    params = {k: getattr(args, k) for k in DEFAULTS}

    def run() -> None:
        generate(resolve_path(args.root), params, files_dir=resolve_path(args.files) if args.files else None)
        print(f"demo corpus written to {args.root}")
    return run_command(run)  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130


if __name__ == "__main__":
    raise SystemExit(main())

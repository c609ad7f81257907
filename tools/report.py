"""Write the hand-in report of a training run: report.html, report.pdf and report.md in the run folder.

    python tools/report.py --n_folder 000          # saved_model/000/report.html + report.pdf + report.md
    python tools/report.py --n_folder 000 --lang zh   # in Chinese (figures too, with a CJK font)
    python tools/report.py --run_dir path/to/run   # any run folder
    python EER.py --cp_num 30 --report             # evaluate, then write the report (English)

report.html is one self-contained page (pictures inside) with print styles for A4; report.pdf is that
page printed by headless Chromium (without Chromium: the HTML alone, said in one line). What the report
holds: see ``svlab/report.py``. Evaluations are compared per trial list, the run's own (from its
``config.yaml``) first; ``--set test.trials=...`` puts another one first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.checkpoint import run_folder  # noqa: E402
from svlab.guard import run_command  # noqa: E402
from svlab.config import config_path_value, explicit_keys, load_config, parse_override, resolve_path  # noqa: E402
from svlab.report import write_report  # noqa: E402
from svlab.report_text import LANGUAGES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Write report.html, report.pdf and report.md for a training run.")
    ap.add_argument("--n_folder", default=None, help="run folder under train.save_dir (default: train.n_folder)")
    ap.add_argument("--run_dir", default=None, help="explicit run folder (overrides --n_folder)")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--lang", choices=tuple(LANGUAGES), default="en",
                    help="language of the headings, labels and figures (zh: Chinese; default: en)")
    ap.add_argument("--no_pdf", action="store_true", help="write report.html and report.md only")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), lambda: "interrupted; no report file is half-written (each is the old "
                                                  "one or the new one): run it again")


def run(args: argparse.Namespace) -> None:
    overrides = dict(parse_override(s) for s in args.set)
    if args.n_folder is not None:  # (None would also drop a --set train.n_folder=...)
        overrides["train.n_folder"] = args.n_folder
    cfg = load_config(args.config, overrides)
    run_dir = resolve_path(args.run_dir, base=Path.cwd()) if args.run_dir else run_folder(cfg)
    # the run's own trial list comes first (from its config.yaml), unless one was given explicitly
    trials = config_path_value(cfg, "test.trials") if "test.trials" in explicit_keys(cfg) else None
    write_report(run_dir, trials=trials, lang=args.lang, pdf=not args.no_pdf)


if __name__ == "__main__":
    sys.exit(main())

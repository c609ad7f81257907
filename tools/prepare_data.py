"""Prepare a speaker corpus for the lab: find its layout, choose speakers, write the manifests.

    python tools/prepare_data.py --root /data/aishell              # folder holding data_aishell/ (or data_aishell, or its wav/)
    python tools/prepare_data.py --root /data/aishell --extract    # AISHELL-1 as downloaded: unpack wav/SXXXX.tar.gz first
    python tools/prepare_data.py --root F:\\DataSet\\Aishell\\ALL --write_config   # the handout's ALL/SXXXX/ folders
    python tools/prepare_data.py --root ../shared/data/aishell_sample --train_speakers 1 --test_speakers 1

The layouts it recognises are listed in ``svlab/corpora.py``; the speaker choice and the manifests are
``svlab/corpora_split.py``; the config edit of ``--write_config`` is ``svlab/corpora_config.py``.

Outputs in ``--out`` (default: the project's ``files/``), paths relative to ``--root`` with ``/``:
``split_train_set.txt`` and ``test_set.txt`` (``SPEAKER RELPATH``), ``trials.txt`` (``ENROLL TEST LABEL``,
1 = same speaker). The same seed gives the same files. Then set the config keys it prints, or pass
``--write_config`` to have them set in ``config.yaml`` (comments and every other key are kept).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.config import DEFAULT_CONFIG, FILES_DIR, resolve_path  # noqa: E402
from svlab.corpora import DUPLICATE_POLICIES, TEST_NAME, TRAIN_NAME, TRIALS_NAME  # noqa: E402
from svlab.corpora_config import CONFIG_KEYS, check_config_target, config_snippet, write_config  # noqa: E402
from svlab.corpora_split import prepare, prepare_eval_only  # noqa: E402
from svlab.errors import OutputError, PrepareError  # noqa: E402
from svlab.files import shown  # noqa: E402
from svlab.guard import run_command  # noqa: E402
from svlab.text import printable  # noqa: E402

EPILOG = """examples:
  python tools/prepare_data.py --root /data/aishell --extract        # AISHELL-1 as downloaded (wav/SXXXX.tar.gz)
  python tools/prepare_data.py --root /data/aishell/data_aishell --write_config
  python tools/prepare_data.py --root F:\\DataSet\\Aishell\\ALL --write_config
  python tools/prepare_data.py --root /data/aishell --train_speakers 340 --utts_per_speaker 0 --out files/aishell1_full
  python tools/prepare_data.py --root ../shared/data/aishell_sample --train_speakers 1 --test_speakers 1 --dry_run

Layouts: AISHELL-1 release ([data_aishell/][wav/]{train,dev,test}/SXXXX/*.wav), its archives
(wav/SXXXX.tar.gz, data_aishell.tgz: need --extract), speaker folders (ALL/SXXXX/*.wav), a flat
folder of AISHELL-named files (BAC009S0150W0001.wav), any ROOT/<speaker>/**/*.{wav,flac}.

The same utterance twice (a folder holding two copies of a corpus, e.g. data_aishell/ and ALL/: same
speaker and file name, or same name, size and bytes) would put a recording and its own copy into one
trial. By default the run stops and names the two folders, so you can pass the one you mean as --root;
--duplicates keep_first uses one copy of each (the one in the folder with more audio files) and says
which folder was kept.

Nothing is replaced that this command did not write: the manifests in --out replace only its own
earlier manifests (recorded in --out/.svlab-written.json, unchanged since) or the demo's; --extract
never unpacks over a file that unpacking the same archive did not create (those members are listed
and left out). Exit status 2 with a one-line message when the corpus cannot give what was asked."""


def _nonneg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be 2 or more (one target and one non-target trial), got {value}")
    return value



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find a speaker corpus's layout under --root, choose disjoint training and test speakers "
                    "(seeded), and write split_train_set.txt, test_set.txt and trials.txt for train.py / EER.py.")
    ap.add_argument("--root", required=True,
                    help="corpus folder: the one holding data_aishell/, data_aishell itself or its wav/, "
                         "the handout's ALL/ folder, or any <speaker>/ folders corpus")
    ap.add_argument("--out", default=None,
                    help=f"folder for the three manifests (default: the project's files/, {FILES_DIR})")
    ap.add_argument("--seed", type=int, default=0, help="random seed for speakers, utterances, trials (default 0)")
    ap.add_argument("--train_speakers", type=_positive, default=300, help="training speakers (default 300)")
    ap.add_argument("--utts_per_speaker", type=_nonneg, default=10,
                    help="utterances per training speaker, 0 = all (default 10)")
    ap.add_argument("--test_speakers", type=_positive, default=20, help="test speakers (default 20)")
    ap.add_argument("--test_utts_per_speaker", type=_nonneg, default=10,
                    help="utterances per test speaker, 0 = all (default 10)")
    ap.add_argument("--max_trials", type=_at_least_two, default=None,
                    help="at most this many trials, half target / half non-target, seeded (default: all pairs)")
    ap.add_argument("--write_config", nargs="?", const=str(DEFAULT_CONFIG), default=None, metavar="PATH",
                    help="set data.root, data.train_manifest, test.root, test.test_manifest, test.trials in "
                         "PATH (default: the project's config.yaml), keeping its comments; a new PATH is "
                         "created as a small user config for --config")
    ap.add_argument("--extract", action="store_true",
                    help="unpack archives found under --root (AISHELL-1's wav/SXXXX.tar.gz, data_aishell.tgz) "
                         "next to themselves; members that would land outside are refused")
    ap.add_argument("--dry_run", action="store_true", help="show what would be chosen; write and unpack nothing")
    ap.add_argument("--duplicates", choices=DUPLICATE_POLICIES, default="stop",
                    help="an utterance found twice under --root (two copies of a corpus): stop and name the "
                         "folders to choose from (default), or keep_first: use one copy of each")
    ap.add_argument("--eval_only", action="store_true",
                    help="write only test_set.txt and trials.txt, with every speaker under --root as a test "
                         "speaker (to score a trained model on another corpus); uses --test_utts_per_speaker "
                         "(0 = all), --max_trials, --seed")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130


def run(args: argparse.Namespace) -> None:
    """The work of one run: the manifests (or --eval_only's), then the config keys to set."""
    root = Path(os.path.abspath(resolve_path(args.root, base=Path.cwd())))
    out = Path(os.path.abspath(resolve_path(args.out, base=Path.cwd()))) if args.out else FILES_DIR
    config_target = (Path(os.path.abspath(resolve_path(args.write_config, base=Path.cwd())))
                     if args.write_config else None)
    inputs = [("the --write_config file", config_target)] if config_target else []
    if args.eval_only:
        if not args.out:
            raise PrepareError("--eval_only needs --out (a folder of its own, so files/ keeps its manifests)")
        prepare_eval_only(root, out, seed=args.seed, test_utts_per_speaker=args.test_utts_per_speaker,
                          max_trials=args.max_trials, duplicates=args.duplicates, inputs=inputs)
        return
    if config_target and not args.dry_run:     # before any work: the config must be editable
        _config_is_not_a_manifest(config_target, out)
        check_config_target(config_target)
    summary = prepare(root, out, seed=args.seed, train_speakers=args.train_speakers,
                      utts_per_speaker=args.utts_per_speaker, test_speakers=args.test_speakers,
                      test_utts_per_speaker=args.test_utts_per_speaker, max_trials=args.max_trials,
                      extract=args.extract, dry_run=args.dry_run, duplicates=args.duplicates, inputs=inputs)
    if "config" not in summary:
        return
    values = summary["config"]
    if out == FILES_DIR and not args.dry_run and config_target != DEFAULT_CONFIG:
        print(f"note: {shown(FILES_DIR)} held the demo corpus's manifests; point config.yaml at the new data "
              "(keys below) or restore the demo's manifests with: python tools/demo_corpus.py --files files")
    if args.write_config and not args.dry_run:
        write_config(config_target, values)
        print(f"set {', '.join(CONFIG_KEYS)} in {shown(config_target)}")
    else:
        where = "config.yaml (or a user config for --config)"
        print(f"set these keys in {where}, or run again with --write_config:")
        print(printable(config_snippet(values)))


def _config_is_not_a_manifest(config_target: Path, out: Path) -> None:
    """--write_config naming one of the manifests this run writes: refused before any work."""
    for name in (TRAIN_NAME, TEST_NAME, TRIALS_NAME):
        if os.path.normcase(config_target) == os.path.normcase(out / name):
            raise OutputError(f"--write_config {shown(config_target)} is one of the manifests written to --out; "
                              "name the config file (e.g. config.yaml)")


if __name__ == "__main__":
    raise SystemExit(main())

"""Manifests and trial lists: the text files that say which audio files a run uses.

A manifest has ``SPEAKER RELPATH`` lines; a trial list ``ENROLL_RELPATH TEST_RELPATH LABEL`` lines
(1 target, 0 non-target). RELPATHs are relative to the configured root and may use ``/`` or ``\\``.
UTF-8 with or without BOM, LF or CRLF; blank lines are ignored.

Every problem of a file is reported together, with its line number, in one DataError: a student
fixes the whole file in one go instead of one line per run.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from svlab.config import DEFAULT_CONFIG, config_path_value, key_source, normalize_relpath, resolve_path
from svlab.errors import DataError
from svlab.text import printable

#: Problems listed in one message; the rest are counted.
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Utterance:
    speaker: str
    relpath: str          # normalised with forward slashes, the utterance's key
    line: int             # line number in the manifest (1-based)


@dataclass(frozen=True)
class Trial:
    enroll: str
    test: str
    label: int
    line: int


def _read_lines(path: Path, what: str, key: str | None, source: str | None = None) -> list[str]:
    if not path.is_file():
        where = f" (config key '{key}'" + (f", set in {source})" if source else ")") if key else ""
        raise DataError(f"{what} not found: {path}{where}; fix the path or create the file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _raise_problems(path: Path, problems: list[str], fix: str) -> None:
    if problems:
        shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{path}: {len(problems)} bad line(s): {shown}{more}. {fix}")


def read_manifest(path: Path, key: str | None = None, source: str | None = None) -> list[Utterance]:
    """Parse a ``SPEAKER RELPATH`` manifest; all problems (with line numbers) are reported together.

    ``key``/``source``: the config key that named the file and where it was set, for the message.
    """
    path = Path(path)
    items, problems, seen = [], [], {}
    for n, raw in enumerate(_read_lines(path, "manifest", key, source), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            problems.append(f"line {n}: expected 'SPEAKER RELPATH', got {line[:60]!r}")
            continue
        rel = normalize_relpath(parts[1])
        if rel in seen:
            problems.append(f"line {n}: {rel} already listed on line {seen[rel]}")
            continue
        seen[rel] = n
        items.append(Utterance(parts[0], rel, n))
    _raise_problems(path, problems, "Each line must be 'SPEAKER RELPATH', each file listed once")
    if not items:
        raise DataError(f"{path}: the manifest lists no utterances")
    return items


def read_trials(path: Path, key: str | None = None, source: str | None = None) -> list[Trial]:
    """Parse an ``ENROLL TEST LABEL`` trial list; all problems (with line numbers) are reported together.

    Besides malformed lines, a trial listed twice (it would count twice in the EER) and an utterance
    compared with itself (a trivially perfect score) are errors.
    """
    path = Path(path)
    trials, problems, seen = [], [], {}
    for n, raw in enumerate(_read_lines(path, "trial list", key, source), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            problems.append(f"line {n}: expected 'ENROLL TEST LABEL', got {len(parts)} fields")
            continue
        if parts[2] not in ("0", "1"):
            problems.append(f"line {n}: label must be 1 (target) or 0 (non-target), got {parts[2]!r}")
            continue
        enroll, test = normalize_relpath(parts[0]), normalize_relpath(parts[1])
        if enroll == test:
            problems.append(f"line {n}: {enroll} is compared with itself")
            continue
        pair = (enroll, test)
        if pair in seen:
            first, first_label = seen[pair]
            clash = f" with the other label ({first_label})" if first_label != int(parts[2]) else ""
            problems.append(f"line {n}: the same pair as line {first}{clash}")
            continue
        seen[pair] = (n, int(parts[2]))
        trials.append(Trial(enroll, test, int(parts[2]), n))
    _raise_problems(path, problems, "Each line must be 'ENROLL_RELPATH TEST_RELPATH 0|1', each pair listed once")
    if not trials:
        raise DataError(f"{path}: the trial list has no trials")
    return trials


def check_root(root: Path, utts: list[Utterance], key: str, manifest: Path, source: str | None = None) -> None:
    """Fail early when the root is missing or holds none of the manifest's files.

    ``source``: where ``key`` was set (the config file), named in the message.
    """
    where = f" (set in {source})" if source else ""
    if not root.is_dir():
        raise DataError(f"config key '{key}' = {root}{where} is not a folder; set it to the folder the paths in "
                        f"{manifest} are relative to")
    sample = utts[: min(len(utts), 50)]
    if sample and not any((root / u.relpath).is_file() for u in sample):
        head = (f"none of the first {len(sample)} files of {printable(manifest)} exist under {key} = "
                f"{printable(root)}{where} (e.g. {printable(root / sample[0].relpath)})")
        if _lists_demo_corpus(sample) and _holds_files(root):
            raise DataError(f"{head}: {printable(manifest)} still lists the demo corpus, not the files in "
                            f"{printable(root)}. Write manifests for your corpus and point the config at them: "
                            f"{prepare_command(root, source)}")
        empty = "" if _holds_files(root) else " (the folder holds no files)"
        raise DataError(f"{head}{empty}; is '{key}' the right folder?")


def _lists_demo_corpus(utts: list[Utterance]) -> bool:
    """True when every one of ``utts`` is a file of the embedded demo corpus (the shipped manifests)."""
    from svlab import demo_corpus
    params = demo_corpus.DEFAULTS
    lists = demo_corpus.manifests(params)
    demo = {line.split()[1] for name in (demo_corpus.TRAIN_NAME, demo_corpus.TEST_NAME) for line in lists[name]}
    return all(u.relpath in demo for u in utts)


def _holds_files(root: Path, budget: int = 2000) -> bool:
    """True when ``root`` holds at least one file (looking at no more than ``budget`` entries)."""
    stack, seen = [root], 0
    while stack and seen < budget:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if entry.is_file():
                        return True
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    if seen >= budget:
                        break
        except OSError:
            continue
    return False


def prepare_command(root: Path, source: str | None = None) -> str:
    """The ``tools/prepare_data.py`` command that writes manifests for the corpus in ``root`` and sets
    the data and test keys in ``source`` (a user config; the shipped ``config.yaml`` otherwise)."""
    def arg(text: str) -> str:
        text = printable(text)
        if os.name == "nt":
            return f'"{text}"' if any(c in text for c in ' &()^;') else text
        return shlex.quote(text)
    target = ""
    if source and Path(source).suffix in (".yaml", ".yml") and Path(source).resolve() != DEFAULT_CONFIG.resolve():
        target = " " + arg(source)
    return f"python tools/prepare_data.py --root {arg(str(root))} --write_config{target}"


def check_training_data(opts: dict) -> list[Utterance]:
    """Cheap checks of the training data before any heavy work: the manifest parses and ``data.root``
    holds its files. Returns the manifest's utterances. Messages name the key and its config file."""
    manifest = config_path_value(opts, "data.train_manifest")
    utts = read_manifest(manifest, key="data.train_manifest", source=key_source(opts, "data.train_manifest"))
    check_root(config_path_value(opts, "data.root"), utts, "data.root", manifest, key_source(opts, "data.root"))
    return utts


def overlapping_speakers(train_utts, test_utts) -> list[str]:
    """Sorted speakers found in both lists (``Utterance`` objects or plain speaker names).

    Test speakers seen in training make a verification result optimistic: the model was taught
    to tell exactly those voices apart.
    """
    def speakers(items) -> set[str]:
        return {getattr(x, "speaker", x) for x in items}
    return sorted(speakers(train_utts) & speakers(test_utts))


def overlap_warning(train_manifest: Path | str | None, test_utts: list[Utterance]) -> str | None:
    """A warning line when the test set shares speakers (or files) with the training manifest, else
    None. A missing or unreadable training manifest gives None: evaluation does not need it."""
    if not train_manifest:
        return None
    try:
        train = read_manifest(resolve_path(train_manifest))
    except (DataError, OSError, ValueError):
        return None
    shared = overlapping_speakers(train, test_utts)
    files = sorted({u.relpath for u in train} & {u.relpath for u in test_utts})
    if not shared and not files:
        return None
    text = (f"warning: {len(shared)} test speaker(s) also appear in the training data "
            f"{train_manifest} ({', '.join(shared[:10])}{', ...' if len(shared) > 10 else ''})")
    if files:
        text += f"; {len(files)} test file(s) are training files (e.g. {files[0]})"
    return text + ". The EER is optimistic: the model was trained on these voices"

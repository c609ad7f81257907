"""Manifests and trial lists: the text files that say which audio files a run uses.

A manifest has ``SPEAKER RELPATH`` lines; a trial list ``ENROLL_RELPATH TEST_RELPATH LABEL`` lines
(1 target, 0 non-target). RELPATHs are relative to the configured root and may use ``/`` or ``\\``.
UTF-8 with or without BOM, LF or CRLF; blank lines are ignored.

Every problem of a file is reported together, with its line number, in one DataError: a student
fixes the whole file in one go instead of one line per run.

Several training corpora (``data.corpora``: a list of ``{name, root, train_manifest}``, instead of
``data.root`` + ``data.train_manifest``): ``check_training_data`` reads each manifest against its own
root and returns one list, each speaker prefixed with its corpus's name (``sc:022cd682``), so two
corpora that use the same speaker id never merge into one class, and each utterance's ``relpath``
is then its file's absolute path (``root / relpath`` is that file whatever ``root`` is: feature
caches key on it, ``svlab.feature_cache``).
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from svlab.audio import audio_file
from svlab.config import DEFAULT_CONFIG, config_path_value, key_source, normalize_relpath, resolve_path
from svlab.errors import DataError
from svlab.text import printable

#: Problems listed in one message; the rest are counted.
MAX_LISTED_PROBLEMS = 20
#: A trial's label as written: ours (1/0) or Kaldi's (target/nontarget; the ids are then utterance ids).
LABELS = {"1": "1", "0": "0", "target": "1", "nontarget": "0"}


@dataclass(frozen=True)
class Utterance:
    speaker: str
    relpath: str          # normalised with forward slashes, the utterance's key
    line: int             # line number in the manifest (1-based)
    audio: str = ""       # where the audio is, when not at relpath: a Kaldi data folder's (svlab.kaldi_data)

    def path(self, root: Path) -> Path:
        """The utterance's audio under ``root`` (an absolute ``audio`` ignores it; it may carry a
        ``#t=`` time range, ``svlab.audio.split_range``)."""
        return Path(root) / (self.audio or self.relpath)


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
    A Kaldi data folder (``wav.scp``, ``utt2spk``, ...) works too (``svlab.kaldi_data``): utterance ids
    are the keys.
    """
    path = Path(path)
    if path.is_dir():
        from svlab import kaldi_data
        return [Utterance(spk, utt, line, audio) for spk, utt, line, audio in kaldi_data.read_data_dir(path)]
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
        if parts[2] not in LABELS:  # Kaldi's trials files say target / nontarget
            problems.append(f"line {n}: label must be 1 (target) or 0 (non-target), got {parts[2]!r}")
            continue
        parts[2] = LABELS[parts[2]]
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
    if sample and not any(audio_file(u.path(root)).is_file() for u in sample):
        head = (f"none of the first {len(sample)} files of {printable(manifest)} exist under {key} = "
                f"{printable(root)}{where} (e.g. {printable(sample[0].path(root))})")
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


def corpus_speaker(corpus: str, speaker: str) -> str:
    """A speaker's class name in a run on several corpora: ``sc:022cd682``."""
    return f"{corpus}:{speaker}"


def training_roots(data: dict) -> list[str]:
    """The folders a ``data`` section trains on: each corpus's root with ``data.corpora``, else ``data.root``
    (``data.root`` keeps its default beside ``data.corpora``, and must not generate the demo corpus)."""
    return [c["root"] for c in data["corpora"]] if data.get("corpora") else [data["root"]]


def read_corpora(corpora: list[dict], source: str | None = None) -> list[Utterance]:
    """The utterances of several training corpora (``data.corpora``, checked by ``svlab.config``): each
    manifest read against its own root (problems name ``data.corpora[i].train_manifest`` / ``.root``
    and ``source``, the config file), speakers prefixed with the corpus name (``corpus_speaker``),
    relpaths made absolute. A file listed by two corpora is a ``DataError``."""
    out: list[Utterance] = []
    seen: dict[str, str] = {}
    for i, corpus in enumerate(corpora):
        key, name = f"data.corpora[{i}]", corpus["name"]
        manifest, root = resolve_path(corpus["train_manifest"]), resolve_path(corpus["root"])
        utts = read_manifest(manifest, key=f"{key}.train_manifest", source=source)
        check_root(root, utts, f"{key}.root", manifest, source)
        for u in utts:
            path = u.path(root).as_posix()  # a Kaldi folder's audio path, else root / relpath
            if path in seen:
                raise DataError(f"{printable(path)} is listed by corpus '{seen[path]}' and by corpus '{name}' "
                                f"({printable(manifest)} line {u.line}); list each file in one corpus of data.corpora")
            seen[path] = name
            out.append(Utterance(corpus_speaker(name, u.speaker), path, u.line))
    return out


def corpora_record(cfg: dict, speakers: list[str]) -> list[dict]:
    """What a checkpoint records of ``data.corpora``: per corpus its name, root, manifest and how many of
    the run's classes (``speakers``, prefixed names) are its speakers."""
    return [{"name": c["name"], "root": str(c["root"]), "train_manifest": str(c["train_manifest"]),
             "speakers": sum(s.startswith(c["name"] + ":") for s in speakers)} for c in cfg["data"]["corpora"]]


def check_training_data(opts: dict) -> list[Utterance]:
    """Cheap checks of the training data before any heavy work: the manifest parses and ``data.root``
    holds its files (each corpus's, with ``data.corpora``: ``read_corpora``). Returns the manifest's
    utterances. Messages name the key and its config file."""
    if opts["data"].get("corpora"):
        return read_corpora(opts["data"]["corpora"], key_source(opts, "data.corpora"))
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


def overlap_warning(train_manifest: Path | str | dict | None, test_utts: list[Utterance]) -> str | None:
    """A warning line when the test set shares speakers (or files) with the training manifest, else
    None. A missing or unreadable training manifest gives None: evaluation does not need it.
    ``train_manifest`` may be a run's ``data`` section: with ``data.corpora`` each corpus's speakers are
    compared without their corpus prefix."""
    corpora = train_manifest.get("corpora") if isinstance(train_manifest, dict) else None
    if isinstance(train_manifest, dict):
        train_manifest = train_manifest.get("train_manifest")
    if not train_manifest and not corpora:
        return None
    try:
        if corpora:
            train = [Utterance(u.speaker.split(":", 1)[1], u.relpath, u.line) for u in read_corpora(corpora)]
            train_manifest = ", ".join(str(c["train_manifest"]) for c in corpora)
        else:
            train = read_manifest(resolve_path(train_manifest))
    except (DataError, OSError, ValueError, KeyError, TypeError):
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

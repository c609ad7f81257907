"""Prepare a speaker corpus for the lab: find its layout, choose speakers, write the manifests.

    python prepare_data.py --root /data/aishell                 # folder holding data_aishell/ (or data_aishell, or its wav/)
    python prepare_data.py --root /data/aishell --extract       # AISHELL-1 as downloaded: unpack wav/SXXXX.tar.gz first
    python prepare_data.py --root F:\\DataSet\\Aishell\\ALL --write_config   # the handout's ALL/SXXXX/ folders
    python prepare_data.py --root ../shared/data/aishell_sample --train_speakers 1 --test_speakers 1

Layouts found by themselves (``detect_layout``):

``aishell1-release``         AISHELL-1 as distributed and unpacked: ``[data_aishell/][wav/]{train,dev,test}/SXXXX/*.wav``.
                             Test speakers come from ``test``, training speakers from ``train`` (then ``dev``).
``aishell1-archives``        AISHELL-1 as downloaded: ``data_aishell/wav/SXXXX.tar.gz`` (and/or ``data_aishell.tgz``);
                             unpacked (safely, next to the archives) only with ``--extract``.
``aishell-speaker-folders``  one folder per speaker, all speakers together (the handout's ``ALL/SXXXX/*.wav``).
``aishell-flat``             one folder of AISHELL-named files, the speaker in the name (``BAC009S0150W0001.wav``).
``generic``                  any ``ROOT/<speaker>/**/*.{wav,flac}`` corpus (speaker = first folder level).

With AISHELL speaker numbers the official AISHELL-1 split decides which speakers test and which train
(folder names when present, otherwise the numbers: train S0002-S0723, dev S0724-S0763, test S0764-S0916),
so a model is never tested on a speaker it trained on, and results are comparable with other AISHELL-1 work.

Outputs in ``--out`` (default: the project's ``files/``), paths relative to ``--root`` with ``/``:
``split_train_set.txt`` and ``test_set.txt`` (``SPEAKER RELPATH``), ``trials.txt`` (``ENROLL TEST LABEL``,
1 = same speaker). The same seed gives the same files. Then set the config keys it prints, or pass
``--write_config`` to have them set in ``config.yaml`` (comments and every other key are kept).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import soundfile as sf
import yaml

from checkpoint import CheckpointError, atomic_write
from config import DEFAULT_CONFIG, PROJECT_ROOT, ConfigError, resolve_path

FILES_DIR = PROJECT_ROOT / "files"
TRAIN_NAME, TEST_NAME, TRIALS_NAME = "split_train_set.txt", "test_set.txt", "trials.txt"
AUDIO_EXTENSIONS = (".wav", ".flac")
ARCHIVE_EXTENSIONS = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
AISHELL_NAME = re.compile(r"(S\d{4})W\d{4}")          # BAC009S0150W0001 -> S0150
SPEAKER_ARCHIVE = re.compile(r"^(S\d{4})\.tar\.gz$")   # data_aishell/wav/S0002.tar.gz
SPLIT_FOLDERS = ("train", "dev", "test")
# AISHELL-1 (OpenSLR 33) speaker numbers per official split: 340 / 40 / 20 speakers.
AISHELL1_RANGES = (("train", 2, 723), ("dev", 724, 763), ("test", 764, 916))
# Which official splits test and training speakers are drawn from, in order of preference.
TEST_PREFERENCE = ("test", "dev", "train", "other")
TRAIN_PREFERENCE = ("train", "dev", "other", "test")
CONFIG_KEYS = ("data.root", "data.train_manifest", "test.root", "test.test_manifest", "test.trials")
ENUMERATE_LIMIT = 5_000_000        # above this many candidate pairs, sample trials without listing them all
MANY_TRIALS = 1_000_000            # warn (suggest --max_trials) above this many trials
LISTED = 20                        # speakers named in messages before "... and N more"


class PrepareError(ValueError):
    """Data preparation cannot go on; the message says why and what to do (exit status 2)."""


@dataclass
class Layout:
    """What ``detect_layout`` found under ``root``."""
    kind: str                                   # aishell1-release | aishell1-archives | aishell-speaker-folders | aishell-flat | generic
    root: Path
    description: str
    speakers: dict[str, list[str]] = field(default_factory=dict)    # speaker -> sorted RELPATHs (relative to root)
    splits: dict[str, str] = field(default_factory=dict)            # speaker -> train | dev | test | other ('' generic)
    pending_archives: list[Path] = field(default_factory=list)      # archives that still need --extract
    unassigned: list[str] = field(default_factory=list)             # audio files without a recognisable speaker

    @property
    def n_utterances(self) -> int:
        return sum(len(v) for v in self.speakers.values())

    @property
    def aishell(self) -> bool:
        return self.kind.startswith("aishell")


# --------------------------------------------------------------------------- finding the corpus
def aishell1_split(speaker: str) -> str:
    """Official AISHELL-1 split of a speaker id such as ``S0764`` (``other`` outside AISHELL-1's ranges)."""
    try:
        number = int(speaker[1:])
    except ValueError:
        return "other"
    for name, low, high in AISHELL1_RANGES:
        if low <= number <= high:
            return name
    return "other"


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_EXTENSIONS)


def _scan(root: Path) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Relative path parts of every audio file and every archive under ``root`` (hidden entries skipped)."""
    audio, archives, seen = [], [], set()
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:                    # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(current).relative_to(root).parts
        for name in files:
            if name.startswith("."):        # ._BAC009... macOS resource forks, our own temp files
                continue
            low = name.lower()
            if low.endswith(AUDIO_EXTENSIONS):
                audio.append(rel + (name,))
            elif _is_archive(low):
                archives.append(rel + (name,))
    audio.sort()
    archives.sort()
    return audio, archives


def _common_prefix(seqs) -> tuple[str, ...]:
    seqs = list(seqs)
    if not seqs:
        return ()
    prefix = seqs[0]
    for s in seqs[1:]:
        n = 0
        while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
            n += 1
        prefix = prefix[:n]
        if not prefix:
            break
    return tuple(prefix)


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def detect_layout(root: str | os.PathLike) -> Layout:
    """Find the corpus layout under ``root`` and every utterance's speaker (see the module docstring)."""
    root = Path(root)
    if root.is_file() and _is_archive(root.name):
        raise PrepareError(f"--root {root} is an archive; pass the folder that contains it and add --extract")
    if not root.is_dir():
        raise PrepareError(f"--root {root} is not a folder; pass the folder holding the corpus")
    audio, archives = _scan(root)
    rel = lambda parts: "/".join(parts)  # noqa: E731

    named = [(parts, AISHELL_NAME.search(_stem(parts[-1]))) for parts in audio]
    n_named = sum(1 for _, m in named if m)
    speakers: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    unassigned: list[str] = []
    if audio and n_named * 2 >= len(audio):
        split_dirs, in_own_folder = set(), 0
        for parts, m in named:
            if not m:
                unassigned.append(rel(parts))
                continue
            spk = m.group(1)
            speakers.setdefault(spk, []).append(rel(parts))
            if len(parts) >= 3 and parts[-3].lower() in SPLIT_FOLDERS:
                splits.setdefault(spk, parts[-3].lower())
                split_dirs.add(rel(parts[:-3]))
            if len(parts) >= 2 and parts[-2] == spk:
                in_own_folder += 1
        for spk in speakers:
            splits.setdefault(spk, aishell1_split(spk))
        if split_dirs:
            kind = "aishell1-release"
            where = ", ".join(f"{d}/" if d else "./" for d in sorted(split_dirs))
            description = (f"AISHELL-1 release layout ({where}{{train,dev,test}}/SXXXX/*.wav): "
                           "test speakers from test, training speakers from train (then dev)")
        elif in_own_folder * 2 >= n_named:
            kind = "aishell-speaker-folders"
            description = ("AISHELL speaker folders (SXXXX/*.wav, all speakers together): test speakers "
                           "preferably from the official AISHELL-1 test speakers S0764-S0916")
        else:
            kind = "aishell-flat"
            description = ("flat folder(s) of AISHELL-named files (speaker from the name: "
                           "BAC009S0150W0001.wav -> S0150)")
    elif audio:
        prefix = _common_prefix(parts[:-2] for parts in audio)
        for parts in audio:
            if len(parts) >= len(prefix) + 2:
                speakers.setdefault(parts[len(prefix)], []).append(rel(parts))
            else:
                unassigned.append(rel(parts))
        splits = {spk: "" for spk in speakers}
        kind = "generic"
        base = rel(prefix) + "/" if prefix else ""
        description = f"generic speaker folders ({base}<speaker>/**/*.wav|flac, speaker = first folder level)"
    else:
        kind, description = "aishell1-archives", ""

    pending = []
    for parts in archives:
        path = root.joinpath(*parts)
        m = SPEAKER_ARCHIVE.match(parts[-1])
        if m:
            if m.group(1) not in speakers:
                pending.append(path)
        elif parts[-1] == "resource_aishell.tgz":
            continue                      # lexicon and speaker info: no audio
        elif parts[-1] == "data_aishell.tgz":
            if not (path.parent / "data_aishell").is_dir():
                pending.append(path)
        elif not audio:
            pending.append(path)
    if not audio:
        if not pending:
            raise PrepareError(f"no .wav or .flac files (and no archives) under {root}; "
                               "check --root (it should be the folder holding the corpus)")
        aishell_archives = any(SPEAKER_ARCHIVE.match(p.name) or p.name == "data_aishell.tgz" for p in pending)
        kind = "aishell1-archives" if aishell_archives else "archives"
        description = (f"{len(pending)} archive(s) not unpacked yet (e.g. {_relposix(pending[0], root)})"
                       + (": AISHELL-1 as downloaded" if aishell_archives else ""))
    for spk in speakers:
        speakers[spk].sort()
    return Layout(kind, root, description, dict(sorted(speakers.items())), splits, pending, unassigned)


def collect(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{speaker: [RELPATH, ...]}`` for every utterance under ``root`` (paths relative to root, ``/``)."""
    return detect_layout(root).speakers


def _relposix(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- archives
def safe_extract(archive: Path, dest: Path) -> int:
    """Unpack ``archive`` into ``dest``; refuse any member that would land outside ``dest``.

    Links, devices and other special members are skipped; Python's ``data`` extraction filter is used
    where available. Files are unpacked into a hidden temporary folder first and moved into place, so an
    interrupted run leaves no half-unpacked speaker behind. Returns the number of files unpacked.
    """
    archive, dest = Path(archive), Path(dest)
    tmp = dest / f".extract-{archive.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = []
                for m in tf.getmembers():
                    name = m.name.replace("\\", "/")
                    parts = PurePosixPath(name).parts
                    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                        raise PrepareError(f"{archive}: member {m.name!r} would be written outside {dest}; "
                                           "refusing to unpack this archive")
                    if m.isfile() or m.isdir():
                        members.append(m)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise PrepareError(f"cannot unpack {archive}: {e} (corrupt or incomplete download?)") from None
        count = 0
        tmp_real = os.path.realpath(tmp)
        for current, _dirs, files in os.walk(tmp):
            if not os.path.realpath(current).startswith(tmp_real):
                raise PrepareError(f"{archive}: unexpected link while unpacking; refusing")
            for name in files:
                src = Path(current) / name
                target = dest / src.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, target)
                count += 1
        return count
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_pending(layout: Layout, log) -> list[Path]:
    done = []
    for i, archive in enumerate(layout.pending_archives, 1):
        n = safe_extract(archive, archive.parent)
        log(f"  unpacked {_relposix(archive, layout.root)} ({n} files) [{i}/{len(layout.pending_archives)}]")
        done.append(archive)
    return done


# --------------------------------------------------------------------------- choosing speakers and utterances
def _names(items, limit: int = LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _choose(rng: random.Random, groups: list[list[str]], n: int) -> list[str]:
    """``n`` speakers, taking whole groups in order of preference and a seeded sample of the last one."""
    chosen: list[str] = []
    for group in groups:
        need = n - len(chosen)
        if need <= 0:
            break
        group = sorted(set(group) - set(chosen))
        chosen += group if len(group) <= need else rng.sample(group, need)
    return sorted(chosen)


def _pick_utterances(relpaths: list[str], k: int, seed: int, speaker: str) -> list[str]:
    if k <= 0 or k >= len(relpaths):
        return sorted(relpaths)
    return sorted(random.Random(f"{seed}/{speaker}").sample(sorted(relpaths), k))


def _split_counts(speakers, splits) -> str:
    counts = {}
    for s in speakers:
        counts[splits.get(s) or "other"] = counts.get(splits.get(s) or "other", 0) + 1
    return ", ".join(f"{counts[k]} {k}" for k in ("train", "dev", "test", "other") if k in counts)


def select_speakers(speakers: dict[str, list[str]], splits: dict[str, str], aishell: bool, seed: int,
                    train_speakers: int, need_train: int, test_speakers: int, need_test: int):
    """Seeded, disjoint choice: test speakers first (official test split preferred), then training ones.

    Returns ``(train, test, ok_train, ok_test)``: the chosen speakers (sorted) and the speakers with
    enough utterances for each role.
    """
    ok_train = {s for s, u in speakers.items() if len(u) >= need_train}
    ok_test = {s for s, u in speakers.items() if len(u) >= need_test}
    rng = random.Random(seed)

    def groups(pool, order):
        if not aishell:
            return [sorted(pool)]
        return [[s for s in sorted(pool) if (splits.get(s) or "other") == k] for k in order]
    test = _choose(rng, groups(ok_test, TEST_PREFERENCE), test_speakers)
    train = _choose(rng, groups(ok_train - set(test), TRAIN_PREFERENCE), train_speakers)
    return train, test, ok_train, ok_test


def _suggest(speakers, splits, aishell, seed, train_speakers, need_train, test_speakers, need_test) -> str | None:
    """Flags that would work: fewer utterances per speaker (same speaker counts), else fewer speakers,
    else both."""
    pick = lambda k_train, n_test, k_test: select_speakers(  # noqa: E731
        speakers, splits, aishell, seed, train_speakers, k_train, n_test, k_test)
    k_test = next((k for k in range(need_test, 0, -1) if len(pick(1, test_speakers, k)[1]) == test_speakers), None)
    if k_test is not None:
        k_train = next((k for k in range(need_train, 0, -1)
                        if len(pick(k, test_speakers, k_test)[0]) == train_speakers), None)
        if k_train is not None:
            flags = [f"--utts_per_speaker {k_train}"] if k_train != need_train else []
            flags += [f"--test_utts_per_speaker {k_test}"] if k_test != need_test else []
            if flags:
                return " ".join(flags)
    for k in range(max(need_train, need_test), 0, -1):
        k_train, k_test = min(need_train, k), min(need_test, k)
        n_any = len({s for s, u in speakers.items() if len(u) >= min(k_train, k_test)})
        for n_test in dict.fromkeys((test_speakers, max(min(2, n_any - 1), min(test_speakers, n_any // 5)))):
            if n_test < 1:
                continue
            train, test, _, _ = select_speakers(speakers, splits, aishell, seed, train_speakers, k_train, n_test, k_test)
            if len(test) == n_test and train:
                flags = []
                if len(train) < train_speakers or n_test != test_speakers:
                    flags.append(f"--train_speakers {len(train)}")
                if n_test != test_speakers:
                    flags.append(f"--test_speakers {n_test}")
                if k_train != need_train:
                    flags.append(f"--utts_per_speaker {k_train}")
                if k_test != need_test:
                    flags.append(f"--test_utts_per_speaker {k_test}")
                return " ".join(flags)
    return None


# --------------------------------------------------------------------------- trials
def _pairs_within(blocks: list[tuple[int, int]]):
    for a, b in blocks:
        for i in range(a, b):
            for j in range(i + 1, b):
                yield i, j


def _pairs_across(owner: list[int]):
    n = len(owner)
    for i in range(n):
        for j in range(i + 1, n):
            if owner[i] != owner[j]:
                yield i, j


def _sample_pairs(rng, want, total, enumerate_fn, draw_fn) -> list[tuple[int, int]]:
    if want >= total:
        return list(enumerate_fn())
    if total <= ENUMERATE_LIMIT:
        return rng.sample(list(enumerate_fn()), want)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < want:
        pair = draw_fn()
        if pair is not None:
            chosen.add(pair)
    return list(chosen)


def trial_pairs(test_speakers: list[str], max_trials: int | None, rng: random.Random):
    """Index pairs ``(i, j, label)`` (i < j) over the test utterances, speakers given per utterance.

    All unordered pairs, or, with ``max_trials``, a seeded sample of at most that many with half
    target and half non-target trials (the rarer class whole when it has fewer). Returns
    ``(iterator, n_target, n_nontarget)``; utterances of one speaker must be contiguous.
    """
    n = len(test_speakers)
    blocks, owner, start = [], [], 0
    for i in range(1, n + 1):
        if i == n or test_speakers[i] != test_speakers[start]:
            blocks.append((start, i))
            start = i
    for b, (a, e) in enumerate(blocks):
        owner += [b] * (e - a)
    n_target = sum((e - a) * (e - a - 1) // 2 for a, e in blocks)
    n_non = n * (n - 1) // 2 - n_target
    if max_trials is None or max_trials >= n_target + n_non:
        def every():
            for i in range(n):
                for j in range(i + 1, n):
                    yield i, j, int(owner[i] == owner[j])
        return every(), n_target, n_non
    want_t = min(n_target, max_trials // 2)
    want_n = min(n_non, max_trials - want_t)
    want_t = min(n_target, max_trials - want_n)

    def draw_target():
        a, e = blocks[rng.randrange(len(blocks))]
        if e - a < 2:
            return None
        i, j = sorted(rng.sample(range(a, e), 2))
        return i, j

    def draw_non():
        i, j = sorted(rng.sample(range(n), 2))
        return (i, j) if owner[i] != owner[j] else None

    targets = _sample_pairs(rng, want_t, n_target, lambda: _pairs_within(blocks), draw_target)
    nons = _sample_pairs(rng, want_n, n_non, lambda: _pairs_across(owner), draw_non)
    pairs = sorted([(i, j, 1) for i, j in targets] + [(i, j, 0) for i, j in nons])
    return iter(pairs), len(targets), len(nons)


# --------------------------------------------------------------------------- config keys
def _config_value(path: Path) -> str:
    """How a path is written in config.yaml: relative to the project folder when inside it."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(PROJECT_ROOT).as_posix() or "."
    except ValueError:
        return str(path)


def config_values(root: Path, out: Path) -> dict[str, str]:
    out = Path(out)
    return {
        "data.root": _config_value(root),
        "data.train_manifest": _config_value(out / TRAIN_NAME),
        "test.root": _config_value(root),
        "test.test_manifest": _config_value(out / TEST_NAME),
        "test.trials": _config_value(out / TRIALS_NAME),
    }


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML string scalar: plain when that reads back the same, else single-quoted."""
    try:
        plain_ok = (value == value.strip() and "#" not in value
                    and yaml.safe_load(f"k: {value}") == {"k": value})
    except yaml.YAMLError:
        plain_ok = False
    return value if plain_ok else "'" + value.replace("'", "''") + "'"


def config_snippet(values: dict[str, str]) -> str:
    lines, section = [], None
    for key, value in values.items():
        sec, name = key.split(".", 1)
        if sec != section:
            lines.append(f"{sec}:")
            section = sec
        lines.append(f"  {name}: {_yaml_scalar(value)}")
    return "\n".join(lines)


_SECTION = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)\s*:\s*(#.*)?$")
_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>[A-Za-z_][\w-]*)(?P<colon>\s*:)(?P<rest>(\s.*)?)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """``' value   # note'`` -> (``' value   '``, ``'# note'``), minding quoted values."""
    stripped = rest.lstrip()
    start = len(rest) - len(stripped)
    i = start
    if stripped[:1] in ("'", '"'):
        quote, i = stripped[0], start + 1
        while i < len(rest):
            if rest[i] == quote:
                if quote == "'" and rest[i + 1:i + 2] == "'":
                    i += 2
                    continue
                break
            i += 2 if (quote == '"' and rest[i] == "\\") else 1
    for k in range(i, len(rest)):
        if rest[k] == "#" and (k == 0 or rest[k - 1] in " \t"):
            return rest[:k], rest[k:]
    return rest, ""


def edit_config_text(text: str, values: dict[str, str]) -> str:
    """Set the dotted ``values`` in YAML ``text`` line by line; comments, order and other keys stay.

    Raises PrepareError when the file's shape does not allow a safe line edit (flow style, block
    scalars) or when the result would change anything but the requested keys.
    """
    lines = text.splitlines(keepends=True)
    wanted = {tuple(k.split(".", 1)): v for k, v in values.items()}
    done: set[tuple[str, str]] = set()
    section, child_indent = None, None
    last_line_of: dict[str, int] = {}
    out = list(lines)
    for n, line in enumerate(lines):
        body = line.rstrip("\r\n")
        eol = line[len(body):]
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        if not body[0].isspace():
            m = _SECTION.match(body)
            section, child_indent = (m.group("key"), None) if m else (None, None)
            if section:
                last_line_of[section] = n
            continue
        if section is None:
            continue
        last_line_of[section] = n
        m = _KEY.match(body)
        if not m:
            continue
        if child_indent is None:
            child_indent = m.group("indent")
        if m.group("indent") != child_indent or (section, m.group("key")) not in wanted:
            continue
        value_part, comment = _split_comment(m.group("rest"))
        if not value_part.strip() or value_part.strip()[0] in "|>&*!{[":
            raise PrepareError(f"cannot edit '{section}.{m.group('key')}' line by line (line {n + 1}); set it by hand")
        new_value = " " + _yaml_scalar(wanted[(section, m.group("key"))])
        if comment:
            new_value = new_value.ljust(len(value_part)) if len(new_value) + 2 <= len(value_part) else new_value + "  "
        out[n] = f"{m.group('indent')}{m.group('key')}{m.group('colon')}{new_value}{comment}{eol}"
        done.add((section, m.group("key")))
    newline = "\r\n" if "\r\n" in text else "\n"
    inserts: dict[int, list[str]] = {}
    new_sections: dict[str, list[str]] = {}
    for (sec, key), value in wanted.items():
        if (sec, key) in done:
            continue
        if sec in last_line_of:
            entry = f"{_child_indent(lines, sec) or '  '}{key}: {_yaml_scalar(value)}{newline}"
            inserts.setdefault(last_line_of[sec], []).append(entry)
        else:
            new_sections.setdefault(sec, []).append(f"  {key}: {_yaml_scalar(value)}{newline}")
    result = []
    for n, line in enumerate(out):
        if n in inserts and not line.endswith(("\n", "\r")):
            line += newline
        result.append(line)
        result.extend(inserts.get(n, []))
    for sec, entries in new_sections.items():
        if result and not result[-1].endswith(("\n", "\r")):
            result[-1] += newline
        result += [newline, f"{sec}:{newline}", *entries]
    new_text = "".join(result)
    _verify_edit(text, new_text, values)
    return new_text


def _child_indent(lines: list[str], section: str) -> str | None:
    inside = False
    for line in lines:
        body = line.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        if not body[0].isspace():
            m = _SECTION.match(body)
            inside = bool(m and m.group("key") == section)
            continue
        if inside:
            return body[:len(body) - len(body.lstrip())]
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _verify_edit(old_text: str, new_text: str, values: dict[str, str]) -> None:
    try:
        old_data, new_data = yaml.safe_load(old_text) or {}, yaml.safe_load(new_text) or {}
    except yaml.YAMLError as e:
        raise PrepareError(f"the config is not valid YAML or would not stay valid ({e}); set the keys by hand") from None
    if not isinstance(old_data, dict) or not isinstance(new_data, dict):
        raise PrepareError("the config is not a mapping of sections (data:, test:, ...); set the keys by hand")
    old, new = _flatten(old_data), _flatten(new_data)
    expected = {**old, **values}
    if new != expected:
        bad = sorted(k for k in set(new) | set(expected) if new.get(k) != expected.get(k))
        raise PrepareError(f"a line edit of the config would change {', '.join(bad)} unexpectedly; "
                           "set the keys by hand (file left unchanged)")


def write_config(path: str | os.PathLike, values: dict[str, str]) -> Path:
    """Set ``values`` (dotted keys) in the YAML config at ``path``, keeping comments; atomic.

    A missing file is created as a small user config (``python train.py --config PATH``).
    """
    path = Path(path)
    if path.exists():
        raw = path.read_bytes()
        bom = raw.startswith(b"\xef\xbb\xbf")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PrepareError(f"{path} is not UTF-8 text; set the keys by hand") from None
        new_text = edit_config_text(text, values)
        data = (b"\xef\xbb\xbf" if bom else b"") + new_text.encode("utf-8")
    else:
        new_text = ("# Data paths written by prepare_data.py; use with: python train.py --config "
                    f"{path.name}\n" + config_snippet(values) + "\n")
        _verify_edit("", new_text, values)
        data = new_text.encode("utf-8")
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except CheckpointError as e:
        raise PrepareError(str(e)) from None
    return path


# --------------------------------------------------------------------------- the whole preparation
def _hours(root: Path, relpaths: list[str], problems: list[str]) -> float:
    seconds = 0.0
    for rel in relpaths:
        try:
            seconds += sf.info(str(root / rel)).duration
        except Exception as e:  # soundfile raises several types for unreadable files
            problems.append(f"{rel} ({str(e).strip()[:80]})")
    return seconds / 3600.0


def _write_lines(path: Path, lines) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
    try:
        atomic_write(path, write)
    except CheckpointError as e:
        raise PrepareError(str(e)) from None


def prepare(root: str | os.PathLike, out: str | os.PathLike = FILES_DIR, *, seed: int = 0,
            train_speakers: int = 300, utts_per_speaker: int = 10, test_speakers: int = 20,
            test_utts_per_speaker: int = 10, max_trials: int | None = None, extract: bool = False,
            dry_run: bool = False, log=print) -> dict:
    """Detect the layout under ``root``, choose speakers and utterances, write the three manifests.

    ``utts_per_speaker`` / ``test_utts_per_speaker`` 0 means all utterances of each chosen speaker.
    Returns a summary dict (layout, chosen speakers, counts, hours, trial counts, warnings, config keys).
    Raises PrepareError (message for the user) when the corpus cannot give what was asked.
    """
    root, out = Path(root), Path(out)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log(f"warning: {msg}")

    layout = detect_layout(root)
    extracted: list[Path] = []
    if layout.pending_archives:
        names = _names([_relposix(p, root) for p in layout.pending_archives], 5)
        if extract and not dry_run:
            log(f"unpacking {len(layout.pending_archives)} archive(s) next to themselves: {names}")
            for _ in range(3):      # data_aishell.tgz holds wav/SXXXX.tar.gz: unpack those next
                extracted += _extract_pending(layout, log)
                layout = detect_layout(root)
                if not layout.pending_archives:
                    break
        elif extract:
            log(f"dry run: would unpack {len(layout.pending_archives)} archive(s): {names}")
        elif not layout.speakers:
            raise PrepareError(f"found {len(layout.pending_archives)} archive(s) under {root} ({names}) but no "
                               "unpacked audio; add --extract to unpack them (next to the archives, safely)")
        else:
            warn(f"{len(layout.pending_archives)} archive(s) not unpacked and ignored: {names}; "
                 "add --extract to unpack and use them")
    if not layout.speakers:
        if dry_run and layout.pending_archives:
            log("dry run: nothing written (the audio is still in archives)")
            return {"layout": layout.kind, "description": layout.description, "dry_run": True,
                    "pending_archives": layout.pending_archives, "warnings": warnings}
        raise PrepareError(f"no speakers found under {root}: {len(layout.unassigned)} audio file(s) but none in a "
                           "speaker folder or with an AISHELL name; see prepare_data.py --help for the layouts")

    spk_utts = layout.speakers
    splits = layout.splits
    log(f"layout: {layout.kind}: {layout.description}")
    log(f"found: {len(spk_utts)} speakers, {layout.n_utterances} utterances under {root}"
        + (f" ({_split_counts(spk_utts, splits)} speakers by official split)" if layout.aishell else ""))
    if layout.unassigned:
        warn(f"{len(layout.unassigned)} audio file(s) without a recognisable speaker ignored, "
             f"e.g. {_names(layout.unassigned, 3)}")

    need_train, need_test = max(1, utts_per_speaker), max(1, test_utts_per_speaker)
    choice = (spk_utts, splits, layout.aishell, seed)
    chosen_train, chosen_test, ok_train, ok_test = select_speakers(*choice, train_speakers, need_train,
                                                                   test_speakers, need_test)
    skipped_train = {s: len(u) for s, u in spk_utts.items() if s not in ok_train}
    skipped_test = {s: len(u) for s, u in spk_utts.items() if s not in ok_test}

    def report_skipped(skipped: dict, need: int, role: str) -> None:
        if skipped:
            listed = _names([f"{s} ({n})" for s, n in skipped.items()])
            log(f"skipped for {role}: {len(skipped)} speaker(s) with fewer than {need} utterances: {listed}")

    if skipped_train == skipped_test:
        report_skipped(skipped_train, need_train, "training and test")
    else:
        report_skipped(skipped_train, need_train, "training")
        report_skipped(skipped_test, need_test, "test")

    if len(chosen_test) < test_speakers or not chosen_train:
        n_both = len(ok_train | ok_test)
        listed = f" ({_names(sorted(ok_train | ok_test), 5)})" if n_both else ""
        if need_train == need_test:
            what = (f"asked for {train_speakers} training + {test_speakers} test speakers with >= {need_train} "
                    f"utterances each, but {root} has only {n_both}{listed}")
        else:
            what = (f"asked for {train_speakers} training speakers with >= {need_train} utterances and "
                    f"{test_speakers} test speakers with >= {need_test}, but {root} has {len(ok_train)} and "
                    f"{len(ok_test)} such speakers{listed}")
        flags = _suggest(*choice, train_speakers, need_train, test_speakers, need_test)
        hint = (f"run with e.g. {flags}" if flags else
                f"a train/test split needs at least 2 speakers with utterances ({len(spk_utts)} found)")
        raise PrepareError(f"not enough speakers: {what}; {hint}")
    if len(chosen_train) < train_speakers:
        warn(f"only {len(chosen_train)} of the {train_speakers} requested training speakers are available "
             f"(with >= {need_train} utterances, not used for testing); using all of them")

    test_rows = [(s, r) for s in chosen_test for r in _pick_utterances(spk_utts[s], test_utts_per_speaker, seed, s)]
    train_rows = [(s, r) for s in chosen_train for r in _pick_utterances(spk_utts[s], utts_per_speaker, seed, s)]
    assert not set(chosen_test) & set(chosen_train)

    problems: list[str] = []
    train_hours = _hours(root, [r for _, r in train_rows], problems)
    test_hours = _hours(root, [r for _, r in test_rows], problems)
    if problems:
        warn(f"{len(problems)} file(s) soundfile cannot read (training stops on them unless "
             f"data.bad_audio: skip): {_names(problems, 5)}")

    def per(k: int) -> str:
        return "all" if k <= 0 else str(k)

    origin = lambda chosen: f" [{_split_counts(chosen, splits)}]" if layout.aishell else ""  # noqa: E731
    log(f"test:  {len(chosen_test)} speaker(s) x {per(test_utts_per_speaker)} utterances = {len(test_rows)} "
        f"({test_hours:.2f} h){origin(chosen_test)}: {_names(chosen_test)}")
    log(f"train: {len(chosen_train)} speaker(s) x {per(utts_per_speaker)} utterances = {len(train_rows)} "
        f"({train_hours:.2f} h){origin(chosen_train)}: {_names(chosen_train)}")

    log(f"total: {len(train_rows) + len(test_rows)} utterances, {train_hours + test_hours:.2f} h of audio")
    pairs, n_target, n_non = trial_pairs([s for s, _ in test_rows], max_trials, random.Random(f"{seed}/trials"))
    log(f"trials: {n_target + n_non} ({n_target} target, {n_non} non-target)"
        + ("" if max_trials is None else f", at most {max_trials} requested"))
    if n_target == 0:
        warn("no target trials (one utterance per test speaker): use --test_utts_per_speaker 2 or more")
    if n_non == 0:
        warn("no non-target trials (one test speaker): an EER needs both kinds; use --test_speakers 2 or more")
    if n_target + n_non > MANY_TRIALS:
        warn(f"{n_target + n_non} trials is slow to score; consider --max_trials 100000")

    values = config_values(root, out)
    summary = {
        "layout": layout.kind, "description": layout.description, "root": root, "out": out, "seed": seed,
        "train_speakers": chosen_train, "test_speakers": chosen_test,
        "train_utterances": len(train_rows), "test_utterances": len(test_rows),
        "train_hours": train_hours, "test_hours": test_hours,
        "trials": n_target + n_non, "target_trials": n_target, "nontarget_trials": n_non,
        "skipped_train": skipped_train, "skipped_test": skipped_test,
        "extracted": extracted, "pending_archives": layout.pending_archives, "unreadable": problems,
        "warnings": warnings, "config": values, "dry_run": dry_run, "written": [],
    }
    if dry_run:
        log("dry run: nothing written")
        return summary
    _write_lines(out / TRAIN_NAME, (f"{s} {r}" for s, r in train_rows))
    _write_lines(out / TEST_NAME, (f"{s} {r}" for s, r in test_rows))
    _write_lines(out / TRIALS_NAME, (f"{test_rows[i][1]} {test_rows[j][1]} {label}" for i, j, label in pairs))
    summary["written"] = [out / TRAIN_NAME, out / TEST_NAME, out / TRIALS_NAME]
    log(f"wrote {', '.join(str(p) for p in summary['written'])}")
    return summary


# --------------------------------------------------------------------------- command line
EPILOG = """examples:
  python prepare_data.py --root /data/aishell --extract        # AISHELL-1 as downloaded (wav/SXXXX.tar.gz)
  python prepare_data.py --root /data/aishell/data_aishell --write_config
  python prepare_data.py --root F:\\DataSet\\Aishell\\ALL --write_config
  python prepare_data.py --root /data/aishell --train_speakers 340 --utts_per_speaker 0 --out files/aishell1_full
  python prepare_data.py --root ../shared/data/aishell_sample --train_speakers 1 --test_speakers 1 --dry_run

Layouts: AISHELL-1 release ([data_aishell/][wav/]{train,dev,test}/SXXXX/*.wav), its archives
(wav/SXXXX.tar.gz, data_aishell.tgz: need --extract), speaker folders (ALL/SXXXX/*.wav), a flat
folder of AISHELL-named files (BAC009S0150W0001.wav), any ROOT/<speaker>/**/*.{wav,flac}.
Exit status 2 with a one-line message when the corpus cannot give what was asked."""


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


def prepare_eval_only(root: Path, out: Path, seed: int = 0, test_utts_per_speaker: int = 0,
                      max_trials: int | None = None, log=print) -> dict:
    """An evaluation set from every speaker under ``root``: ``test_set.txt`` and ``trials.txt`` only.

    For scoring a trained model on another corpus (e.g. the AISHELL sample): all speakers are test
    speakers, ``test_utts_per_speaker`` (0 = all) of their utterances in name order, all pairs (or a
    balanced sample of ``max_trials``). Returns ``{"speakers", "utterances", "n_target", "n_nontarget"}``.
    """
    speakers = collect(root)
    rows = [(spk, rel) for spk in sorted(speakers)
            for rel in sorted(speakers[spk])[: test_utts_per_speaker or None]]
    if len({spk for spk, _ in rows}) < 2:
        raise PrepareError(f"{root}: an evaluation set needs at least 2 speakers, found {len(speakers)}")
    pairs, n_t, n_n = trial_pairs([spk for spk, _ in rows], max_trials, random.Random(seed))
    out.mkdir(parents=True, exist_ok=True)
    _write_lines(out / "test_set.txt", (f"{spk} {rel}" for spk, rel in rows))
    _write_lines(out / "trials.txt", (f"{rows[i][1]} {rows[j][1]} {lab}" for i, j, lab in pairs))
    log(f"evaluation set: {len(speakers)} speakers, {len(rows)} utterances, {n_t} target / {n_n} non-target "
        f"trials in {out}; score it with: python EER.py --set test.root={root} "
        f"--set test.test_manifest={out / 'test_set.txt'} --set test.trials={out / 'trials.txt'} ...")
    return {"speakers": sorted(speakers), "utterances": len(rows), "n_target": n_t, "n_nontarget": n_n}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prepare_data.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    ap.add_argument("--eval_only", action="store_true",
                    help="write only test_set.txt and trials.txt, with every speaker under --root as a test "
                         "speaker (to score a trained model on another corpus); uses --test_utts_per_speaker "
                         "(0 = all), --max_trials, --seed")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = Path(os.path.abspath(resolve_path(args.root, base=Path.cwd())))
        out = Path(os.path.abspath(resolve_path(args.out, base=Path.cwd()))) if args.out else FILES_DIR
        if args.eval_only:
            if not args.out:
                raise PrepareError("--eval_only needs --out (a folder of its own, so files/ keeps its manifests)")
            prepare_eval_only(root, out, seed=args.seed, test_utts_per_speaker=args.test_utts_per_speaker,
                              max_trials=args.max_trials)
            return 0
        summary = prepare(root, out, seed=args.seed, train_speakers=args.train_speakers,
                          utts_per_speaker=args.utts_per_speaker, test_speakers=args.test_speakers,
                          test_utts_per_speaker=args.test_utts_per_speaker, max_trials=args.max_trials,
                          extract=args.extract, dry_run=args.dry_run)
        if "config" not in summary:
            return 0
        values = summary["config"]
        config_target = (Path(os.path.abspath(resolve_path(args.write_config, base=Path.cwd())))
                         if args.write_config else None)
        if out == FILES_DIR and not args.dry_run and config_target != DEFAULT_CONFIG:
            print(f"note: {FILES_DIR} held the demo corpus's manifests; point config.yaml at the new data (keys "
                  "below) or restore the demo's manifests with: python demo_corpus.py --files files")
        if args.write_config and not args.dry_run:
            write_config(config_target, values)
            print(f"set {', '.join(CONFIG_KEYS)} in {config_target}")
        else:
            where = "config.yaml (or a user config for --config)"
            print(f"set these keys in {where}, or run again with --write_config:")
            print(config_snippet(values))
    except (PrepareError, ConfigError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

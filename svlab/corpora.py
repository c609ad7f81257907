"""Finding a speaker corpus on disk: its layout, every utterance's speaker, and unpacking its archives.

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
Choosing the speakers and writing the manifests is ``svlab.corpora_split``.
"""
from __future__ import annotations

import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from svlab.errors import PrepareError

# The lab's three manifests (in ``svlab.config.FILES_DIR`` unless told otherwise).
TRAIN_NAME, TEST_NAME, TRIALS_NAME = "split_train_set.txt", "test_set.txt", "trials.txt"
AUDIO_EXTENSIONS = (".wav", ".flac")
ARCHIVE_EXTENSIONS = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
AISHELL_NAME = re.compile(r"(S\d{4})W\d{4}")          # BAC009S0150W0001 -> S0150
SPEAKER_ARCHIVE = re.compile(r"^(S\d{4})\.tar\.gz$")   # data_aishell/wav/S0002.tar.gz
SPLIT_FOLDERS = ("train", "dev", "test")
# AISHELL-1 (OpenSLR 33) speaker numbers per official split: 340 / 40 / 20 speakers.
AISHELL1_RANGES = (("train", 2, 723), ("dev", 724, 763), ("test", 764, 916))


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
        description = (f"{len(pending)} archive(s) not unpacked yet (e.g. {relative_posix(pending[0], root)})"
                       + (": AISHELL-1 as downloaded" if aishell_archives else ""))
    for spk in speakers:
        speakers[spk].sort()
    return Layout(kind, root, description, dict(sorted(speakers.items())), splits, pending, unassigned)


def collect(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{speaker: [RELPATH, ...]}`` for every utterance under ``root`` (paths relative to root, ``/``)."""
    return detect_layout(root).speakers


def relative_posix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` (as manifests write it), or whole when outside ``root``."""
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


def extract_pending(layout: Layout, log) -> list[Path]:
    """Unpack every archive ``layout`` still has, each next to itself; returns the archives unpacked."""
    done = []
    for i, archive in enumerate(layout.pending_archives, 1):
        n = safe_extract(archive, archive.parent)
        log(f"  unpacked {relative_posix(archive, layout.root)} ({n} files) [{i}/{len(layout.pending_archives)}]")
        done.append(archive)
    return done


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

Duplicates (``find_duplicates``): a folder holding a corpus twice (``data_aishell/...`` and ``ALL/...``)
would put the same utterance into the manifests twice, and trials would compare a file with its own copy.
Two files are copies when they have the same speaker and file name (AISHELL layouts), or the same file
name and size and identical bytes (checked on a sample of each pair of folders, so it stays cheap).
``resolve_duplicates`` stops with the folders to pass as ``--root`` instead, or keeps one copy of each.

Archives are unpacked by ``safe_extract`` into a fresh hidden folder next to them, and only members whose
destination is free (or was created by an earlier unpacking of the same archive, as recorded in
``.svlab-extracted/``) are moved in: an archive never replaces a file it did not create.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from svlab.errors import PrepareError
from svlab.files import atomic_write, shown
from svlab.files import read_json_index

# The lab's three manifests (in ``svlab.config.FILES_DIR`` unless told otherwise).
TRAIN_NAME, TEST_NAME, TRIALS_NAME = "split_train_set.txt", "test_set.txt", "trials.txt"
AUDIO_EXTENSIONS = (".wav", ".flac")
ARCHIVE_EXTENSIONS = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
AISHELL_NAME = re.compile(r"(S\d{4})W\d{4}")          # BAC009S0150W0001 -> S0150
SPEAKER_ARCHIVE = re.compile(r"^(S\d{4})\.tar\.gz$")   # data_aishell/wav/S0002.tar.gz
SPLIT_FOLDERS = ("train", "dev", "test")
# AISHELL-1 (OpenSLR 33) speaker numbers per official split: 340 / 40 / 20 speakers.
AISHELL1_RANGES = (("train", 2, 723), ("dev", 724, 763), ("test", 764, 916))
DUPLICATE_POLICIES = ("stop", "keep_first")    # what --duplicates may say
CONTENT_SAMPLE = 3          # byte comparisons per pair of folders whose files share a name and a size
EXTRACTED_RECORD = ".svlab-extracted"           # folder next to unpacked archives: what each one created
LISTED = 20                 # files named in a message before "... and N more"


@dataclass
class Duplicate:
    """One utterance found more than once: the copy used and the others (RELPATHs)."""
    kept: str
    others: list[str]
    reason: str             # "name" (same speaker and file name) | "content" (same name, size and bytes)


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
    duplicates: list[Duplicate] = field(default_factory=list)       # utterances found more than once
    dropped: list[str] = field(default_factory=list)                # copies left out (resolve_duplicates)
    audio: list[tuple[str, ...]] = field(default_factory=list, repr=False)     # every audio file's path parts
    archives: list[tuple[str, ...]] = field(default_factory=list, repr=False)  # every archive's path parts

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
    """Find the corpus layout under ``root``, every utterance's speaker, and the utterances found more
    than once (``Layout.duplicates``; see the module docstring)."""
    root = Path(root)
    if root.is_file() and _is_archive(root.name):
        raise PrepareError(f"--root {shown(root)} is an archive; pass the folder that contains it and add --extract")
    if not root.is_dir():
        raise PrepareError(f"--root {shown(root)} is not a folder; pass the folder holding the corpus")
    audio, archives = _scan(root)
    layout = _classify(root, audio, archives)
    layout.duplicates = find_duplicates(root, audio, layout.aishell)
    return layout


def _classify(root: Path, audio: list[tuple[str, ...]], archives: list[tuple[str, ...]]) -> Layout:
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
            raise PrepareError(f"no .wav or .flac files (and no archives) under {shown(root)}; "
                               "check --root (it should be the folder holding the corpus)")
        aishell_archives = any(SPEAKER_ARCHIVE.match(p.name) or p.name == "data_aishell.tgz" for p in pending)
        kind = "aishell1-archives" if aishell_archives else "archives"
        description = (f"{len(pending)} archive(s) not unpacked yet (e.g. {relative_posix(pending[0], root)})"
                       + (": AISHELL-1 as downloaded" if aishell_archives else ""))
    for spk in speakers:
        speakers[spk].sort()
    return Layout(kind, root, description, dict(sorted(speakers.items())), splits, pending, unassigned,
                  audio=list(audio), archives=list(archives))


def collect(root: str | os.PathLike, duplicates: str = "stop", log=print) -> dict[str, list[str]]:
    """``{speaker: [RELPATH, ...]}`` for every utterance under ``root`` (paths relative to root, ``/``);
    utterances found more than once are handled by ``resolve_duplicates(..., duplicates)``."""
    return resolve_duplicates(detect_layout(root), duplicates, log).speakers


# --------------------------------------------------------------------------- the same utterance twice
def _top(parts: tuple[str, ...], other: tuple[str, ...]) -> str:
    """The folder (or file) where ``parts`` leaves ``other``: ``ALL`` for ALL/S0002/x.wav vs data_aishell/..."""
    i = 0
    while i < min(len(parts), len(other)) - 1 and parts[i] == other[i]:
        i += 1
    return "/".join(parts[:i + 1]) + ("/" if i + 1 < len(parts) else "")


def find_duplicates(root: Path, audio: list[tuple[str, ...]], aishell: bool) -> list[Duplicate]:
    """Utterances present more than once under ``root``: the same speaker and file name (AISHELL names,
    any folder), or the same file name and size with identical bytes (compared on up to
    ``CONTENT_SAMPLE`` pairs of each pair of folders: when they all match, the folders are copies). The
    copy kept is the one in the top folder with more audio files, then the first in path order."""
    root = Path(root)
    groups: list[tuple[list[tuple[str, ...]], str]] = []
    claimed: set[tuple[str, ...]] = set()
    if aishell:
        by_id: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for parts in audio:
            m = AISHELL_NAME.search(_stem(parts[-1]))
            if m:
                by_id.setdefault((m.group(1), _stem(parts[-1]).lower()), []).append(parts)
        for copies in by_id.values():
            if len(copies) > 1:
                groups.append((copies, "name"))
                claimed.update(copies)
    by_name: dict[str, list[tuple[str, ...]]] = {}
    for parts in audio:
        if parts not in claimed:
            by_name.setdefault(parts[-1].lower(), []).append(parts)
    by_folders: dict[tuple[str, str], list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
    for same_name in by_name.values():
        if len(same_name) < 2:
            continue
        by_size: dict[int, list[tuple[str, ...]]] = {}
        for parts in same_name:
            try:
                by_size.setdefault(os.stat(root.joinpath(*parts)).st_size, []).append(parts)
            except OSError:
                continue
        for same in by_size.values():
            for a, b in _partners(same):
                by_folders.setdefault((_top(a, b), _top(b, a)), []).append((a, b))
    parent: dict[tuple[str, ...], tuple[str, ...]] = {}     # copies joined into groups (union-find)

    def first_copy(p: tuple[str, ...]) -> tuple[str, ...]:
        while parent[p] != p:
            p = parent[p]
        return p
    for pairs in by_folders.values():
        sample = pairs[:CONTENT_SAMPLE]
        equal = [(a, b) for a, b in sample if _same_bytes(root.joinpath(*a), root.joinpath(*b))]
        for a, b in (pairs if len(equal) == len(sample) else equal):
            parent.setdefault(a, a)
            parent.setdefault(b, b)
            ra, rb = first_copy(a), first_copy(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    content: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for p in sorted(parent):
        content.setdefault(first_copy(p), []).append(p)
    groups += [(copies, "content") for copies in content.values()]
    top_count = Counter(parts[0] if len(parts) > 1 else "" for parts in audio)
    found = []
    for copies, reason in groups:
        copies = sorted(copies, key=lambda p: (-top_count[p[0] if len(p) > 1 else ""], p))
        found.append(Duplicate("/".join(copies[0]), ["/".join(c) for c in copies[1:]], reason))
    return sorted(found, key=lambda d: d.kept)


def _partners(files: list[tuple[str, ...]]):
    """Each file (after the first) with the earlier file sharing the longest end of its path: for
    ``copyB/bert/s1/000.wav`` that is ``copyA/bert/s1/000.wav``, not ``copyA/anna/s1/000.wav``."""
    seen: dict[tuple[str, ...], tuple[str, ...]] = {}
    for parts in sorted(files):
        for k in range(len(parts), 0, -1):
            if parts[-k:] in seen:
                yield seen[parts[-k:]], parts
                break
        for k in range(1, len(parts) + 1):
            seen.setdefault(parts[-k:], parts)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _folder_pairs(duplicates: list[Duplicate]) -> Counter:
    """``{(folder of the kept copy, folder of the other copy): count}``."""
    pairs: Counter = Counter()
    for d in duplicates:
        kept = tuple(d.kept.split("/"))
        for other in d.others:
            o = tuple(other.split("/"))
            pairs[(_top(kept, o), _top(o, kept))] += 1
    return pairs


def resolve_duplicates(layout: Layout, policy: str = "stop", log=print) -> Layout:
    """``layout`` with each utterance once: ``stop`` raises PrepareError naming the copies and the
    narrower ``--root`` to pass; ``keep_first`` keeps one copy of each (``find_duplicates`` says which),
    logs one line saying which folder was kept, and finds the layout again without the other copies."""
    if not layout.duplicates:
        return layout
    if policy not in DUPLICATE_POLICIES:
        raise PrepareError(f"--duplicates must be one of {', '.join(DUPLICATE_POLICIES)}")
    n_extra = sum(len(d.others) for d in layout.duplicates)
    first = layout.duplicates[0]
    how = {"name": "same speaker and file name", "content": "same name and identical bytes"}[first.reason]
    example = f"e.g. {shown(first.kept)} and {shown(first.others[0])} ({how})"
    pairs = _folder_pairs(layout.duplicates).most_common()
    folders = "; ".join(f"{shown(a)} and {shown(b)} ({n})" for (a, b), n in pairs[:3])
    folders += f"; ... and {len(pairs) - 3} more pairs of folders" if len(pairs) > 3 else ""
    what = (f"{len(layout.duplicates)} utterance(s) found more than once under {shown(layout.root)} "
            f"({n_extra} extra copies; {example}), in {folders}")
    if policy == "stop":
        (a, b), _ = pairs[0]
        narrower = [layout.root / f.rstrip("/") for f in (a, b) if f.endswith("/")]
        hint = (f"pass one copy as --root ({' or '.join(shown(p) for p in narrower)}), or "
                if len(narrower) == 2 and len(pairs) == 1 else "")
        raise PrepareError(f"{what}: the same recording twice would compare a file with its own copy in "
                           f"the trials; {hint}add --duplicates keep_first to use one copy of each")
    dropped = {o for d in layout.duplicates for o in d.others}
    audio = [parts for parts in layout.audio if "/".join(parts) not in dropped]
    kept_in = Counter(a for (a, _), n in pairs for _ in range(n))
    left_in = Counter(b for (_, b), n in pairs for _ in range(n))
    log(f"warning: {what}; kept the copies in " + ", ".join(f"{shown(f)} ({n})" for f, n in kept_in.most_common(3))
        + ", left out those in " + ", ".join(f"{shown(f)} ({n})" for f, n in left_in.most_common(3))
        + " (--duplicates keep_first)")
    new = _classify(layout.root, audio, layout.archives)
    new.dropped = sorted(dropped)
    return new


def relative_posix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` (as manifests write it), or whole when outside ``root``."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- archives
def _fingerprint(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a regular file (not following links), None otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def _record_path(archive: Path, dest: Path) -> Path:
    return dest / EXTRACTED_RECORD / f"{archive.name}.json"


def _load_record(path: Path, log=print) -> dict[str, list[int]]:
    """The files an earlier unpacking of one archive created (RELPATH -> fingerprint); {} when none."""
    # unreadable: kept aside by name (it is rewritten right after); its files then count as the user's
    data = read_json_index(path, valid=lambda d: isinstance(d.get("files"), dict), log=log, keep_aside=True)
    return {k: v for k, v in data.get("files", {}).items() if isinstance(v, list)}


def _save_record(path: Path, archive: Path, files: dict[str, list[int]]) -> None:
    text = json.dumps({"archive": archive.name, "about": "files that unpacking this archive created here "
                       "(tools/prepare_data.py --extract may replace these, and nothing else)",
                       "files": files}, indent=0, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _move_new(src: Path, target: Path) -> bool:
    """Move ``src`` to ``target`` only if nothing is there (hard link then unlink: no race); False if taken."""
    try:
        os.link(src, target)
    except FileExistsError:
        return False
    except OSError:                 # no hard links on this file system (FAT, some network drives)
        if os.path.lexists(target):
            return False
        try:
            os.rename(src, target)  # (Windows: fails rather than replace)
        except FileExistsError:
            return False
        return True
    os.unlink(src)
    return True


def safe_extract(archive: Path, dest: Path, conflicts: list[str] | None = None) -> int:
    """Unpack ``archive`` into ``dest`` without replacing any file it did not create; returns the number
    of files unpacked.

    Members that would land outside ``dest`` make it refuse the archive; links, devices and other special
    members are skipped (Python's ``data`` extraction filter is used where available). Everything is
    unpacked into a fresh hidden folder in ``dest`` first, then each file is moved into place only where
    nothing is (or where an earlier unpacking of this same archive created the file, unchanged since, as
    recorded in ``dest/.svlab-extracted/<archive>.json``). Members in the way of another file (the
    archive itself, a sibling archive, a user's file) are appended to ``conflicts`` and left out.
    """
    archive, dest = Path(archive), Path(dest)
    conflicts = [] if conflicts is None else conflicts
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.name}.", suffix=".tmp", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = []
                for m in tf.getmembers():
                    name = m.name.replace("\\", "/")
                    parts = PurePosixPath(name).parts
                    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                        raise PrepareError(f"{shown(archive)}: member {shown(m.name)!r} would be written outside "
                                           f"{shown(dest)}; refusing to unpack this archive")
                    if m.isfile() or m.isdir():
                        members.append(m)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise PrepareError(f"cannot unpack {shown(archive)}: {shown(e)} "
                               "(corrupt or incomplete download?)") from None
        unpacked: list[tuple[Path, str]] = []
        tmp_real = os.path.realpath(tmp)
        for current, dirs, files in os.walk(tmp):
            if not os.path.realpath(current).startswith(tmp_real):
                raise PrepareError(f"{shown(archive)}: unexpected link while unpacking; refusing")
            dirs.sort()
            for name in sorted(files):
                src = Path(current) / name
                unpacked.append((src, src.relative_to(tmp).as_posix()))
        record_path = _record_path(archive, dest)
        earlier = _load_record(record_path)
        plan: list[tuple[Path, str, bool]] = []
        for src, rel in unpacked:
            target = dest / rel
            if rel.split("/", 1)[0] == EXTRACTED_RECORD:
                conflicts.append(rel)
            elif not os.path.lexists(target):
                plan.append((src, rel, False))
            elif earlier.get(rel) is not None and earlier.get(rel) == _fingerprint(target):
                plan.append((src, rel, True))
            else:
                conflicts.append(rel)
        created = {**earlier, **{rel: _fingerprint(src) for src, rel, _ in plan}}
        _save_record(record_path, archive, created)        # before moving: an interruption leaves it known
        count = 0
        for src, rel, replace in plan:
            target = dest / rel
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if replace:
                    os.replace(src, target)
                    moved = True
                else:
                    moved = _move_new(src, target)
            except (FileExistsError, NotADirectoryError):   # a file where the archive has a folder
                moved = False
            except OSError as e:
                raise PrepareError(f"cannot unpack {shown(archive)} into {shown(dest)}: {shown(e.strerror or e)} "
                                   f"({count} files moved in so far; run again to continue)") from None
            if moved:
                count += 1
                continue
            conflicts.append(rel)
            if rel in earlier:
                created[rel] = earlier[rel]
            else:
                created.pop(rel, None)
        _save_record(record_path, archive, created)
        return count
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_pending(layout: Layout, log, conflicts: list[str] | None = None) -> list[Path]:
    """Unpack every archive ``layout`` still has, each next to itself; returns the archives unpacked.

    Members left out because a file the unpacking did not create is in the way are logged, one line
    each (at most ``LISTED``, then a count), and appended to ``conflicts`` as ``ARCHIVE: RELPATH``."""
    done = []
    for i, archive in enumerate(layout.pending_archives, 1):
        blocked: list[str] = []
        n = safe_extract(archive, archive.parent, blocked)
        name = shown(relative_posix(archive, layout.root))
        log(f"  unpacked {name} ({n} files) [{i}/{len(layout.pending_archives)}]")
        if blocked:
            log(f"  {name}: {len(blocked)} member(s) not unpacked: a file that unpacking this archive did not "
                "create is already there (kept as it is):")
            for rel in blocked[:LISTED]:
                log(f"    {shown(relative_posix(archive.parent / rel, layout.root))}")
            if len(blocked) > LISTED:
                log(f"    ... and {len(blocked) - LISTED} more")
        if conflicts is not None:
            conflicts += [f"{relative_posix(archive, layout.root)}: {rel}" for rel in blocked]
        done.append(archive)
    return done

"""Writing files safely: write to a temporary file, then rename it over the target; never replace
what is not ours.

Readers never see a half-written file, and a failure (full disk, Ctrl-C, crash) leaves the previous
file intact. Every file the project writes goes through ``atomic_write``.

A command that writes to a path the user named first calls ``refuse_overwrite``: the target may not be
one of the command's inputs (the same file, through links too), and an existing file there may only be
replaced when it is recognisably an earlier output of the same command (by its format, e.g. an ``.npy``
with its index file, or by ``WrittenFiles``, a record of what a command wrote into a folder).
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from svlab.errors import FileWriteError, OutputError
from svlab.text import printable

# Epoch checkpoints count as targets of a temporary file whatever list of names a caller passes:
# a run folder's checkpoint names are not known in advance.
_EPOCH_CHECKPOINT = re.compile(r"^checkpoint_(\d{3,})\.pth$")


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    A failure (full disk, Ctrl-C, crash) leaves any previous file at ``path`` untouched and removes
    the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _silent_unlink(tmp)
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        hint = "; free some disk space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise FileWriteError(f"could not write {path}: {e.strerror or e} ({kept}){hint}") from e
    except BaseException:
        _silent_unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the rename durable (a power cut right after must not bring back the old file)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(folder: Path, names: list[str] | None = None) -> list[Path]:
    """Temporary files ``atomic_write`` left in ``folder`` when its process was killed outright
    (SIGKILL, power cut): ``.<name>.<random>.tmp``, optionally only those for targets in ``names``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            target = p.name[1:-4].rsplit(".", 1)[0]
            if names is None or target in names or _EPOCH_CHECKPOINT.match(target):
                found.append(p)
    return sorted(found)


def _silent_unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


# --------------------------------------------------------------------------- never replacing an input or a user's file
def shown(path: object) -> str:
    """A file name for a one-line message: ``printable``, with newlines and tabs escaped as well."""
    return printable(str(path)).replace("\n", "\\n").replace("\t", "\\t")


def same_file(a: os.PathLike | str, b: os.PathLike | str) -> bool:
    """Whether ``a`` and ``b`` are one file (symbolic and hard links included); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _named_inputs(inputs) -> list[tuple[str, Path]]:
    if isinstance(inputs, Mapping):
        inputs = inputs.items()
    named = []
    for item in inputs or ():
        if isinstance(item, tuple):
            label, path = item
        else:
            label, path = "an input of this command", item
        if path is not None:
            named.append((label, Path(path)))
    return named


def refuse_overwrite(path: os.PathLike | str, *, inputs: Iterable | Mapping = (),
                     ours: Callable[[Path], bool] | None = None, flag: str | None = "--out",
                     command: str = "this command", recognised_by: str = "",
                     fix: str = "choose another file name, or move that file away first") -> None:
    """Raise ``OutputError`` (one line) unless writing ``path`` can at most replace an earlier output.

    Refused: ``path`` is one of ``inputs`` (``os.path.samefile``: symbolic and hard links included);
    ``path`` is a folder or a symbolic link, or lies under a file; ``path`` exists and ``ours(path)`` does not recognise it as
    an earlier output of ``command`` (``ours=None``: nothing existing may be replaced). ``inputs`` holds
    paths, ``(description, path)`` pairs or a ``{description: path}`` mapping; ``recognised_by`` says in
    the message how an earlier output is recognised, ``fix`` what to do. Call it before the work starts
    (and again right before writing, when the work takes long).
    """
    path = Path(path)
    label = f"{flag} {shown(path)}" if flag else shown(path)
    for description, source in _named_inputs(inputs):
        if same_file(path, source):
            extra = "" if os.path.abspath(path) == os.path.abspath(source) else f", {shown(source)}"
            raise OutputError(f"{label} is {description}{extra}; an output never replaces an input: "
                              "name another output")
    if os.path.islink(path):
        raise OutputError(f"{label} is a symbolic link (to {shown(os.readlink(path))}); "
                          "name a new file instead")
    if path.is_dir():
        raise OutputError(f"{label} is a folder; name a file (in it, or elsewhere)")
    for above in path.parents:
        if os.path.lexists(above):
            if not above.is_dir():
                raise OutputError(f"{label}: {shown(above)} is a file, not a folder; name a file in a folder")
            break
    if os.path.lexists(path) and (ours is None or not ours(path)):
        how = f" ({recognised_by})" if recognised_by else ""
        raise OutputError(f"{label} already exists and is not an earlier output of {command}{how}; {fix}")


def refuse_file_as_folder(folder: os.PathLike | str, flag: str | None = "--out") -> None:
    """``OutputError`` when an output folder's path is an existing file (or a broken link)."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        label = f"{flag} {shown(folder)}" if flag else shown(folder)
        raise OutputError(f"{label} is a file, not a folder; name a folder for the outputs")


def json_with_keys(path: os.PathLike | str, keys: Iterable[str], max_bytes: int = 64 << 20) -> bool:
    """Whether ``path`` is a JSON object holding every one of ``keys`` (how a command recognises its own
    earlier JSON output); False for anything unreadable or larger than ``max_bytes``."""
    try:
        if os.path.getsize(path) > max_bytes:
            return False
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def npy_header(path: os.PathLike | str) -> tuple[tuple[int, ...], str] | None:
    """``(shape, dtype name)`` from an ``.npy`` file's header (the data is not read); None if not one."""
    import numpy as np
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if reader is None:
                return None
            shape, _fortran, dtype = reader(f)
    except (OSError, ValueError, SyntaxError, TypeError):
        return None
    return tuple(int(n) for n in shape), np.dtype(dtype).name


def file_sha256(path: os.PathLike | str) -> str | None:
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


class WrittenFiles:
    """The files a command wrote into one folder, by content hash, in a hidden record file there.

    ``wrote(path)`` is True only for a file whose bytes still hash to what the command recorded (an
    earlier output, untouched since), so ``refuse_overwrite(..., ours=record.wrote)`` lets a command
    replace its own earlier outputs and nothing else. ``write_bytes`` records the new hash before the
    file is replaced and drops the old one after, so an interrupted run leaves recognised content.
    """

    NAME = ".svlab-written.json"

    def __init__(self, folder: os.PathLike | str, command: str, log=print):
        self.folder, self.command, self.log = Path(folder), command, log
        self.path = self.folder / self.NAME

    def _load(self, keep_aside: bool = False) -> dict:
        """The record; an unreadable one counts as empty (nothing is then recognised as ours, so
        nothing is replaced) and is kept aside under its own name before a new one is written."""
        data = read_json_index(self.path, valid=lambda d: isinstance(d.get("files"), dict),
                               log=self.log, keep_aside=keep_aside)
        return data.get("files", {})

    def _save(self, files: dict) -> None:
        text = json.dumps({"about": "files that svlab commands wrote in this folder and may replace",
                           "files": files}, indent=1, sort_keys=True) + "\n"
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def wrote(self, path: os.PathLike | str) -> bool:
        path = Path(path)
        entry = self._load().get(path.name)
        if not isinstance(entry, dict) or entry.get("by") != self.command or not path.is_file():
            return False
        return file_sha256(path) in (entry.get("sha256") or [])

    def _set(self, name: str, hashes: list[str]) -> None:
        files = self._load(keep_aside=True)
        files[name] = {"by": self.command, "sha256": hashes}
        self._save(files)

    def write(self, path: os.PathLike | str, write_fn) -> None:
        """``atomic_write(path, write_fn)`` (``path`` in this folder), recording the result as this
        command's output: the new hash is recorded before the rename, the old one dropped after it."""
        path = Path(path)
        old = file_sha256(path) if self.wrote(path) else None
        new: list[str] = []

        def write_and_record(tmp: Path) -> None:
            write_fn(tmp)
            new.append(file_sha256(tmp))
            self._set(path.name, new + ([old] if old and old != new[0] else []))
        atomic_write(path, write_and_record)
        self._set(path.name, new)

    def write_bytes(self, path: os.PathLike | str, data: bytes) -> None:
        self.write(path, lambda tmp: Path(tmp).write_bytes(data))


# --------------------------------------------------------------------------------------------------
# An index read back and rewritten
# --------------------------------------------------------------------------------------------------
def unused_name(path: Path, separator: str = "") -> Path:
    """``path`` if nothing is there, else the first free ``<path><separator>2``, ``...3``, ...: a file set
    aside never replaces an earlier one."""
    kept, n = path, 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}{separator}{n}")
    return kept


def set_aside(path: Path, why: str, log=print) -> Path:
    """Rename an unreadable ``path`` to ``<name>.unreadable-<time>`` (never over another file), say so
    in one line, and return the new name."""
    path = Path(path)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    kept = unused_name(path.with_name(f"{path.name}.unreadable-{stamp}"), "-")
    try:
        os.rename(path, kept)
    except OSError as e:
        raise FileWriteError(f"{path} is unreadable ({why}) and could not be moved aside "
                             f"({e.strerror or e}); move it away yourself and run again") from None
    log(f"note: {printable(path)} is unreadable ({printable(why)}); kept as {printable(kept.name)}, "
        "starting a new one")
    return kept


def read_json_index(path: Path, valid=None, log=print, keep_aside: bool = True) -> dict:
    """The JSON object in ``path`` ({} when there is none). ``valid(data) -> bool`` checks its shape.

    An unreadable file (truncated, not UTF-8, not JSON, not a valid index) is renamed aside with
    ``set_aside`` when ``keep_aside`` (the caller is about to write a new index), else only noted;
    either way {} is returned. A file that cannot even be opened (no permission) stops with one line.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
        why = None if isinstance(data, dict) and (valid is None or valid(data)) else "not the expected kind of index"
    except UnicodeDecodeError as e:
        why = f"not UTF-8 text at byte {e.start}"
    except json.JSONDecodeError as e:
        why = f"not valid JSON: {e.msg} at line {e.lineno}" + (", probably cut short" if e.pos >= len(text) - 1 else "")
    except IsADirectoryError:
        raise FileWriteError(f"{path} is a folder, not an index file; move it away and run again") from None
    except OSError as e:
        raise FileWriteError(f"cannot read {path}: {e.strerror or e}") from None
    if why is None:
        return data
    if keep_aside:
        set_aside(path, why, log)
    else:
        log(f"note: {printable(path)} is unreadable ({why}); ignoring it")
    return {}

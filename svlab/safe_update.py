"""Updating results already on disk without ever leaving them half old, half new, or losing them.

``StagedFolder``: a folder of results (an evaluation) is written into a hidden sibling
(``.<name>.new-<pid>``) and swapped in with renames only once every file is written. A failure
before that (full disk, Ctrl-C, an error) removes the sibling and leaves the old folder exactly as it
was; the old folder is kept aside (``.<name>.old-<pid>``) until the new one is in place. Files in the
old folder that the program does not make (a student's notes or screenshots) move into the new one.
A process killed outright (SIGKILL, power cut) in the middle of the swap leaves the sibling folders
behind; the next ``StagedFolder`` on the same target puts the old folder back (or finishes the move
of the user's files) before it starts.

An index read back and rewritten (``evaluations.json``) is kept aside by name when unreadable:
``svlab.files.read_json_index``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path

from svlab.errors import FileWriteError
from svlab.files import fsync_dir
from svlab.text import printable

NEW_TAG, OLD_TAG = ".new-", ".old-"


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C / SIGTERM arrived while the new folder was being swapped in: the swap was finished first,
    so the new results are complete in ``target``."""

    def __init__(self, target: Path):
        super().__init__(str(target))
        self.target = Path(target)


# --------------------------------------------------------------------------------------------------
# A folder replaced all at once
# --------------------------------------------------------------------------------------------------
def _sibling(target: Path, tag: str, pid: int | None = None) -> Path:
    return target.parent / f".{target.name}{tag}{pid if pid is not None else os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call that failed: nothing of ours is running now
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _leftovers(target: Path, tag: str) -> list[Path]:
    """Sibling folders of ``target`` with ``tag`` left by processes that no longer run."""
    prefix = f".{target.name}{tag}"
    if not target.parent.is_dir():
        return []
    found = []
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and p.is_dir():
            if not _pid_alive(int(p.name[len(prefix):])):
                found.append(p)
    return sorted(found)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # svlab.files.atomic_write's temporary files


def _move_entries(src: Path, dst: Path, made: set[str]) -> list[str]:
    """Move what ``src`` holds besides the files the program makes (``made``) into ``dst``; returns the
    names that could not be moved (a name clash or a failed rename)."""
    left = []
    for p in sorted(src.iterdir()):
        if p.name in made or _is_temp(p.name):
            continue
        if (dst / p.name).exists():
            left.append(p.name)
            continue
        try:
            os.rename(p, dst / p.name)
        except OSError:
            left.append(p.name)
    return left


def recover_folder(target: Path, made: set[str], log=print) -> None:
    """Undo or finish a swap that a killed process left half done (see the module docstring)."""
    target = Path(target)
    for p in _leftovers(target, NEW_TAG):
        shutil.rmtree(p, ignore_errors=True)  # never complete in place: the old folder (if any) still rules
    for p in _leftovers(target, OLD_TAG):
        if not target.exists():
            os.rename(p, target)
            log(f"note: {printable(target)} was put back from {printable(p.name)}, left by an interrupted run")
            continue
        left = _move_entries(p, target, made)
        if left:
            log(f"note: {printable(p)} holds files of yours that are also in {printable(target)} "
                f"({printable(', '.join(left[:5]))}); it is kept, look there")
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM wait until the block is over (a swap is never left half done by Ctrl-C);
    yields a list that holds the signals that arrived."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):
            pass
    try:
        yield pending
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class StagedFolder:
    """``with StagedFolder(target, made) as st: write into st.path``; on a clean exit the new folder
    replaces ``target`` (``made``: the names of the files the program writes there; anything else in
    the old folder is the user's and moves into the new one). ``st.after_commit`` callables run right
    after the swap, with Ctrl-C deferred too (e.g. recording the new folder in an index)."""

    def __init__(self, target: Path, made: set[str], what: str = "results", log=print):
        self.target, self.made, self.what, self.log = Path(target), set(made), what, log
        self.path = _sibling(self.target, NEW_TAG)
        self.after_commit: list = []

    def __enter__(self) -> "StagedFolder":
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            recover_folder(self.target, self.made, self.log)
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
        except OSError as e:
            raise FileWriteError(f"could not write the {self.what} into {self.target}: {e.strerror or e}"
                                 f"{self._unchanged()}") from None
        return self

    def _unchanged(self) -> str:
        return f" ({self.target} is unchanged)" if self.target.exists() else " (nothing was written)"

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(exc, FileWriteError):  # name the real folder, not the hidden sibling
                raise FileWriteError(str(exc).replace(str(self.path), str(self.target)).rstrip(".")
                                     + f"; {self.what} folder {self.target}: "
                                     + ("unchanged" if self.target.exists() else "not written")) from None
            if isinstance(exc, OSError):
                raise FileWriteError(f"could not write the {self.what} into {self.target}: "
                                     f"{exc.strerror or exc}{self._unchanged()}") from None
            return False
        with _signals_deferred() as pending:
            try:
                self._swap_in()
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise
            for fn in self.after_commit:
                fn()
        if pending:
            raise InterruptedAfterCommit(self.target)
        return False

    def _swap_in(self) -> None:
        target, aside = self.target, _sibling(self.target, OLD_TAG)
        had_old = target.exists()
        try:
            if had_old:
                os.rename(target, aside)
        except OSError as e:
            raise FileWriteError(f"could not put the new {self.what} in place of {target}: {e.strerror or e}"
                                 f" ({target} is unchanged)") from None
        try:
            os.rename(self.path, target)
        except OSError as e:
            why = e.strerror or e
            try:
                if had_old:
                    os.rename(aside, target)
            except OSError:
                raise FileWriteError(f"could not put the new {self.what} in place of {target}: {why}; the "
                                     f"previous one is in {aside}: rename it back to {target.name}") from None
            raise FileWriteError(f"could not put the new {self.what} in place of {target}: {why}"
                                 f"{self._unchanged()}") from None
        fsync_dir(target.parent)
        if had_old:
            left = _move_entries(aside, target, self.made)
            if left:
                self.log(f"note: kept {printable(aside)}: it holds files of yours that could not move into the "
                         f"new {printable(target)} ({printable(', '.join(left[:5]))})")
            else:
                shutil.rmtree(aside, ignore_errors=True)

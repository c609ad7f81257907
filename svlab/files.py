"""Writing files safely: write to a temporary file, then rename it over the target.

Readers never see a half-written file, and a failure (full disk, Ctrl-C, crash) leaves the previous
file intact. Every file the project writes goes through ``atomic_write``.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from svlab.errors import FileWriteError

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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
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

"""The feature caches' file format: numpy arrays in an .npz with a CRC-32 of each, read back without
trusting its headers (``svlab.feature_cache``'s clean and augmented caches).

A truncated, bit-flipped or otherwise unreadable file is named in one log line, deleted and reported
as missing (``read_cache`` returns None), so the caller computes it again; its array headers cannot
make the reader allocate more than the file holds.
"""
from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from svlab.audio import one_line
from svlab.files import atomic_write
from svlab.text import excerpt, printable


class Damaged(Exception):
    """A cache file that cannot be used, and why."""


def checksum(arrays: dict) -> np.ndarray:
    """CRC-32 of each array's name, dtype, shape and bytes, in name order."""
    out = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(f"{name}|{a.dtype.str}|{a.shape}".encode())
        out.append(zlib.crc32(a.reshape(-1).view(np.uint8), crc))
    return np.asarray(out, dtype=np.int64)


def write_npz(path: Path, arrays: dict) -> None:
    """``arrays`` as an .npz file (written atomically) with their checksum."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays, checksum=checksum(arrays))
    atomic_write(path, write)


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One array of an .npz, allocating no more than the member holds (a damaged header cannot make
    it allocate what it claims)."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise Damaged(f"{info.filename}: unknown array format {version}")
        if dtype.hasobject:
            raise Damaged(f"{info.filename} holds Python objects")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise Damaged(f"{info.filename} claims {nbytes} bytes in a member of {info.file_size}")
        buf = np.empty(nbytes, dtype=np.uint8)
        pos = 0
        while pos < nbytes:
            chunk = f.read(min(1 << 24, nbytes - pos))
            if not chunk:
                raise Damaged(f"{info.filename} is cut short")
            buf[pos:pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            pos += len(chunk)
        if f.read(1):  # reading to the end also makes zipfile check the member's CRC
            raise Damaged(f"{info.filename} has bytes after its array")
    return buf.view(dtype).reshape(shape, order="F" if fortran else "C")


def read_cache(path: Path, names: tuple[str, ...], check, log) -> dict | None:
    """The arrays ``names`` of a cache file, verified (sizes, checksum, then ``check(arrays)``, which
    raises ``Damaged``), or None: no such file, or a damaged one, which is then deleted with one line
    naming it, so that the caller computes and writes it again."""
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info for info in zf.infolist()}
            wanted = [f"{n}.npy" for n in names]
            if "checksum.npy" not in members and all(w in members for w in wanted):
                raise Damaged("it has no checksum: written by an older version")
            if sorted(members) != sorted(wanted + ["checksum.npy"]):
                raise Damaged(f"it holds {excerpt(sorted(members), 120)}, not {sorted(wanted + ['checksum.npy'])}")
            arrays = {n: read_member(zf, members[f"{n}.npy"]) for n in names}
            stored = read_member(zf, members["checksum.npy"])
        if stored.shape != (len(names),) or not np.array_equal(stored, checksum(arrays)):
            raise Damaged("its checksum does not match its contents")
        check(arrays)
        return arrays
    except Exception as e:  # zipfile.BadZipFile, zlib.error, OSError, ValueError, Damaged, MemoryError, ...
        reason = str(e) if isinstance(e, Damaged) else f"{type(e).__name__}: {one_line(e, 120)}"
        log(f"note: feature cache {printable(path)} is unusable ({reason}); deleted, computing it again")
        try:
            path.unlink()
        except OSError:
            pass
        return None


def check_offsets(offsets: np.ndarray, count: int, data: np.ndarray, rows: int | None) -> None:
    if (data.ndim != 2 or (rows is not None and data.shape[0] != rows) or offsets.ndim != 1
            or len(offsets) != count + 1 or offsets[0] != 0 or offsets[-1] != data.shape[1]
            or np.any(np.diff(offsets) < 0)):
        raise Damaged("its arrays do not fit together")

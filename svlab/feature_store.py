"""The on-disk feature store: features in Kaldi archives, written shard by shard as they are extracted and
read back one crop (training) or one utterance (a test list, ``svlab.embedding.features_to_embed``) at a time,
so memory does not grow with the corpus or the test list.

Layout of a store folder (``features.cache_dir/store_<type>_<key>/``; see docs/large_corpora.md)::

    store.json            format, version, the settings' signature, the corpus identity, shard size
    shard_00000.ark       Kaldi binary float matrices (frames x features), one or more per item
    shard_00000.scp       Kaldi's index of it (``key path:offset``): kaldiio, Kaldi, ESPnet, WeSpeaker read it
    shard_00000.json      the shard's index: its items, each matrix's offset and frames, the audio files'
                          size/mtime/content hash, problems, the ark's length and CRC-32; written last

Shard ``s`` holds items ``s*shard_size ... (s+1)*shard_size - 1`` (contiguous). A shard counts as done
only once its index exists, names this store's corpus, and its archive has the recorded length (and,
with ``features.store_check: content``, the recorded CRC-32); anything else (a missing, truncated,
corrupt shard, one from another corpus, or one whose audio changed) is named in one line and
extracted again, so an interrupted extraction continues where it stopped. A store made with other
settings or for another corpus (``store.json``) is named in one line and rebuilt.

Extraction runs through ``svlab.process_pool.run_jobs`` over all missing shards at once, each result
written to its shard as it arrives (``on_result``): at most the pool's in-flight results are in memory.
``build(store, shards_of_rank(store, rank, world))`` lets torchrun ranks each extract their share.

Reading: ``FeatureRef`` stands for one matrix: ``.shape`` is known from the index, and ``ref[:, a:b]``
reads just those frames with ``os.pread`` (page cache, not the process's RSS as a memory map would
be), returning the ``(features, frames)`` float32 array the in-memory path would have cropped. A read that
fails (a shard cut short or deleted after the start-up check) is one ``ShardReadError`` line naming the shard,
also when it happens in a DataLoader worker.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import zlib
from pathlib import Path

import numpy as np

from svlab.audio import audio_file, one_line
from svlab.errors import DataError
from svlab.files import atomic_write, fsync_dir
from svlab.process_pool import run_jobs
from svlab.text import excerpt, printable

FORMAT = "svlab-feature-store"
VERSION = 1
#: Kaldi's binary float matrix header after ``key ``: ``\0B`` ``FM `` ``\4`` int32 rows ``\4`` int32 cols.
HEADER = struct.Struct("<2s3sBiBi")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- audio and shard identity
def audio_identity(path: Path, content: bool = True) -> list:
    """``[size, mtime_ns, content hash]`` of an audio file (the CRC-32 of its bytes, '' when ``content``
    is False), ``[None, None, 'missing']`` when it cannot be read. CRC-32 rather than a cryptographic
    hash: it is there to notice edits, not attacks, and is several times faster (docs/large_corpora.md)."""
    try:
        path = audio_file(path)  # a #t= time range (Kaldi segments): its recording's identity
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns, f"{_file_crc(path):08x}" if content else ""]
    except OSError:
        return [None, None, "missing"]


def _same_audio(stored: list, now: list, content: bool) -> bool:
    if stored[0] != now[0]:
        return False
    return stored[2] == now[2] if content else stored[1] == now[1]


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def kaldi_key(name: str) -> str:
    """An utterance name as a Kaldi key (no whitespace)."""
    return re.sub(r"\s", "_", name) or "_"


# --------------------------------------------------------------------------- reading
_OPEN: dict = {}   # archive path -> file descriptor, the oldest opened first
MAX_OPEN = 64      # descriptors kept open per process (a store may have thousands of shards)


def _fd(path: str) -> int:
    fd = _OPEN.get(path)
    if fd is None:
        while len(_OPEN) >= MAX_OPEN:
            os.close(_OPEN.pop(next(iter(_OPEN))))
        fd = _OPEN[path] = os.open(path, os.O_RDONLY)
    return fd  # pread never moves a file position: safe to share with forked DataLoader workers


def _forget(path: str) -> None:
    fd = _OPEN.pop(path, None)
    if fd is not None:
        os.close(fd)


class ShardReadError(DataError):
    """A shard that fails while it is read (e.g. cut short after the start-up check passed it).

    Raised in a DataLoader worker (``train.num_workers`` > 0), it reaches the main process rebuilt by torch's
    ``ExceptionWrapper`` as ``ShardReadError("Caught ShardReadError in DataLoader worker process N.\\nOriginal
    Traceback ...")``; the constructor keeps only the worker's own one-line message (the traceback's last
    line), so the command still prints one line naming the shard and the fix, not a worker's traceback."""

    def __init__(self, message: object = ""):
        text = str(message)
        name = type(self).__name__
        if text.startswith(f"Caught {name} ") and "\n" in text:
            text = text.rstrip("\n").rsplit("\n", 1)[-1].split(f"{name}: ", 1)[-1]
        super().__init__(text)


class FeatureRef:
    """One ``(dim, frames)`` float32 feature matrix in a shard, read on demand.

    ``ref[:, a:b]`` (what ``dataset.SpkTrainDataset`` crops) reads frames ``a..b`` only; ``np.asarray(ref)``
    and any other array attribute read it all. Picklable (a path and three numbers), so DataLoader workers
    can take it."""
    __slots__ = ("path", "offset", "frames", "dim")
    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, path: str, offset: int, frames: int, dim: int):
        self.path, self.offset, self.frames, self.dim = path, offset, frames, dim

    def __getstate__(self):
        return (self.path, self.offset, self.frames, self.dim)

    def __setstate__(self, state):
        self.path, self.offset, self.frames, self.dim = state

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.frames)

    def __len__(self) -> int:
        return self.dim

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start..stop`` as a ``(dim, n)`` array."""
        stop = self.frames if stop is None else min(stop, self.frames)
        start = min(max(start, 0), stop)
        out = np.empty((stop - start, self.dim), dtype="<f4")
        pos = self.offset + HEADER.size + start * self.dim * 4
        try:
            got = os.preadv(_fd(self.path), [out], pos) if out.size else 0  # straight into the array
            what = None if got == out.nbytes else f"is cut short (byte {pos + got} of the {pos + out.nbytes} needed)"
        except OSError as e:  # deleted or unreadable since the start-up check
            what = f"cannot be read ({one_line(e, 80)})"
        if what is not None:
            _forget(self.path)
            raise ShardReadError(f"feature store shard {printable(self.path)} {what}; run train.py again to extract "
                                 "that shard again (EER.py or tools/extract.py again for a test list's store)")
        # C-ordered (features, frames) like a crop of the in-memory array: reductions over frames (SpecAugment's
        # mask value) then sum in the same order, to the same bits
        return np.ascontiguousarray(out.T)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if not isinstance(cols, slice) or cols.step not in (None, 1):
            return np.asarray(self)[rows, cols]
        start, stop, _ = cols.indices(self.frames)
        out = self.read(start, max(start, stop))
        return out if rows == slice(None) else out[rows]

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype)

    def __getattr__(self, name: str):
        """Any other ndarray attribute (``tobytes``, ``mean``, ``copy``...) of the whole matrix, read now."""
        if name.startswith("__") or name in FeatureRef.__slots__:
            raise AttributeError(name)
        return getattr(self.read(), name)

    def __repr__(self) -> str:
        return f"FeatureRef({printable(self.path)}@{self.offset}, shape={self.shape})"


# --------------------------------------------------------------------------- the store
class Store:
    """An opened store folder (``open_store``): which shards are done (``index``), which are missing
    (``pending``), and, once all are done, the items (``refs``), ``problems`` and ``infos``."""

    def __init__(self, folder: Path, head: dict, paths: list[Path], keys: list[str], check: str, log):
        self.folder, self.head, self.paths, self.keys, self.check, self.log = folder, head, paths, keys, check, log
        self.shard_size = head["shard_size"]
        self.n_items = head["corpus"]["items"]
        self.n_shards = -(-self.n_items // self.shard_size)
        self.index: dict[int, dict] = {}
        self.pending: list[int] = []

    def items_of(self, s: int) -> range:
        return range(s * self.shard_size, min(self.n_items, (s + 1) * self.shard_size))

    def shard_path(self, s: int, ext: str) -> Path:
        return self.folder / f"shard_{s:05d}.{ext}"

    @property
    def complete(self) -> bool:
        return not self.pending

    def refs(self) -> list:
        """Per item: its list of ``FeatureRef`` (in the order its job returned the arrays), None for a
        file that gave a problem instead."""
        out = []
        for s in range(self.n_shards):
            ix = self.index[s]
            ark = str(self.shard_path(s, "ark"))
            out += [None if e is None else [FeatureRef(ark, int(o), int(f), int(ix["dim"])) for o, f in e]
                    for e in ix["entries"]]
        return out

    @property
    def problems(self) -> list[str]:
        return [p for s in range(self.n_shards) for p in self.index[s]["problems"]]

    @property
    def infos(self) -> list[tuple[int, int]]:
        return [tuple(i) for s in range(self.n_shards) for i in self.index[s]["infos"]]


def corpus_id(paths: list[Path], keys: list[str]) -> str:
    h = hashlib.sha1()
    for p, k in zip(paths, keys):
        h.update(f"{p}\0{k}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _describe_difference(old: dict, new: dict) -> str:
    if old.get("format") != FORMAT or old.get("version") != VERSION:
        return f"it is of another format ({excerpt(old.get('format'))} version {excerpt(old.get('version'))})"
    if old.get("signature") != new["signature"]:
        keys = sorted(k for k in set(old.get("signature") or {}) | set(new["signature"])
                      if (old.get("signature") or {}).get(k) != new["signature"].get(k))
        return f"it was made with other settings ({', '.join(keys[:4]) or 'signature'})"
    if old.get("corpus") != new["corpus"]:
        return "it was made for another corpus (another list of audio files)"
    return f"it has another shard size ({old.get('shard_size')}, now {new['shard_size']})"


def _clear(folder: Path) -> None:
    for p in folder.glob("shard_*"):
        if ".tmp-" not in p.name:
            p.unlink(missing_ok=True)


def _clean_stale_temps(folder: Path) -> None:
    """Remove the partial archives of extractions on this machine that no longer run (killed outright)."""
    host = socket.gethostname()
    for p in folder.glob(f"shard_*.tmp-{host}-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            p.unlink(missing_ok=True)
        except PermissionError:
            pass


def open_store(folder: Path, signature: dict, paths: list[Path], keys: list[str], shard_size: int,
               check: str = "content", log=print, workers: int | None = None) -> Store:
    """Open (or start) the store in ``folder`` for ``paths`` (one item each, named ``keys``) made with
    ``signature`` (the settings its features depend on). A ``store.json`` of other settings, another
    corpus or another shard size: one line, and the store is built again. Each shard is checked
    (``check``: ``content`` hashes the audio and the archive, ``size`` compares sizes and times); the
    ones that fail are named in one line each and left to ``build``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = {"format": FORMAT, "version": VERSION, "signature": signature,
            "corpus": {"items": len(paths), "id": corpus_id(paths, keys)}, "shard_size": int(shard_size)}
    head = json.loads(json.dumps(head))  # as it reads back (tuples become lists)
    meta = folder / "store.json"
    old = None
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log(f"note: feature store {printable(meta)} is unreadable ({one_line(e, 80)}); building the store again")
            _clear(folder)
    if isinstance(old, dict) and old != head:
        log(f"note: feature store {printable(folder)}: {_describe_difference(old, head)}; building it again")
        _clear(folder)
    if old != head:
        atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(head, indent=1) + "\n", encoding="utf-8"))
    _clean_stale_temps(folder)
    store = Store(folder, head, [Path(p) for p in paths], [kaldi_key(k) for k in keys], check, log)
    content = check == "content"
    indexed = {s: _read_index(store, s) for s in range(store.n_shards)}
    to_hash = [i for s, ix in indexed.items() if ix is not None for i in store.items_of(s)]
    files = sorted({audio_file(store.paths[i]) for i in to_hash})  # each recording once (Kaldi segments share one)
    done = dict(zip(files, run_jobs(_identity_job, [(f, content) for f in files], workers, "audio hashes",
                                    what="audio hashing", chunksize=64) if files else []))
    now = {i: done[audio_file(store.paths[i])] for i in to_hash}
    for s, ix in indexed.items():
        if ix is not None:
            changed = [i for i, was in zip(store.items_of(s), ix["audio"]) if not _same_audio(was, now[i], content)]
            if changed:
                log(f"note: {len(changed)} audio file(s) of feature store shard "
                    f"{printable(store.shard_path(s, 'ark'))} changed since it was extracted (e.g. "
                    f"{printable(store.paths[changed[0]])}); extracting it again")
                ix = None
        if ix is None:
            store.pending.append(s)
        else:
            store.index[s] = ix
    return store


def _identity_job(args) -> list:
    return audio_identity(*args)


def _read_index(store: Store, s: int) -> dict | None:
    """The index of shard ``s`` when it and its archive are usable; else None (after one line naming
    what is wrong, unless the shard was simply never written)."""
    path, ark = store.shard_path(s, "json"), store.shard_path(s, "ark")
    if not path.is_file():
        return None
    items = store.items_of(s)
    try:
        ix = json.loads(path.read_text(encoding="utf-8"))
        if ix.get("corpus") != store.head["corpus"]["id"] or ix.get("items") != [items.start, items.stop]:
            raise ValueError("it belongs to another corpus or shard layout")
        if not all(len(ix[k]) == len(items) for k in ("entries", "audio", "infos")):
            raise ValueError("its index does not fit its items")
        size = ark.stat().st_size if ark.is_file() else None
        if size != ix["ark_bytes"]:
            raise ValueError("its archive is missing" if size is None else
                             f"its archive is truncated ({size} of {ix['ark_bytes']} bytes)" if size < ix["ark_bytes"]
                             else f"its archive has {size} bytes, its index says {ix['ark_bytes']}")
        if store.check == "content" and _file_crc(ark) != ix["ark_crc32"]:
            raise ValueError("its archive is corrupt (CRC-32 mismatch)")
        return ix
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        store.log(f"note: feature store shard {printable(ark)} is unusable ({one_line(e, 120)}); extracting it again")
        return None


# --------------------------------------------------------------------------- writing
def shards_of_rank(store: Store, rank: int, world_size: int) -> list[int]:
    """The missing shards process ``rank`` of ``world_size`` extracts: ``rank, rank + world_size, ...``."""
    return [s for s in store.pending if s % world_size == rank]


class _ShardWriter:
    """Writes the results of one shard's items, in order, to a temporary archive; ``finish`` renames it
    into place and writes the scp and (last) the index."""

    def __init__(self, store: Store, s: int):
        self.store, self.s = store, s
        self.items = store.items_of(s)
        self.final = store.shard_path(s, "ark")
        self.tmp = self.final.with_name(f"{self.final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        self.fh = open(self.tmp, "wb")
        self.entries, self.audio, self.infos, self.problems, self.scp = [], [], [], [], []
        self.dim = None

    def add(self, i: int, identity: list, arrays, problem, info) -> None:
        import kaldiio
        self.audio.append(identity)
        self.infos.append(list(info) if info else [0, 0])
        if problem is not None or arrays is None:
            self.entries.append(None)
            self.problems.append(problem or f"{printable(self.store.paths[i])}: no features")
            return
        arrays = arrays if isinstance(arrays, list) else [arrays]
        entry = []
        for j, a in enumerate(arrays):
            key = self.store.keys[i] if len(arrays) == 1 else f"{self.store.keys[i]}-{j}"
            offset = self.fh.tell() + len(key.encode("utf-8")) + 1
            kaldiio.save_ark(self.fh, {key: np.ascontiguousarray(a.T, dtype=np.float32)})
            entry.append([offset, int(a.shape[1])])
            self.scp.append(f"{key} {self.final.resolve()}:{offset}")
            self.dim = int(a.shape[0])
        self.entries.append(entry)

    def finish(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        size = self.tmp.stat().st_size
        crc = _file_crc(self.tmp)
        os.replace(self.tmp, self.final)
        _forget(str(self.final))  # a descriptor of the archive this one replaces must not serve reads
        fsync_dir(self.final.parent)
        text = "".join(line + "\n" for line in self.scp)
        atomic_write(self.store.shard_path(self.s, "scp"), lambda t: t.write_text(text, encoding="utf-8"))
        ix = {"corpus": self.store.head["corpus"]["id"], "items": [self.items.start, self.items.stop],
              "dim": self.dim or 0, "ark_bytes": size, "ark_crc32": crc, "entries": self.entries,
              "audio": self.audio, "infos": self.infos, "problems": self.problems}
        atomic_write(self.store.shard_path(self.s, "json"), lambda t: t.write_text(json.dumps(ix), encoding="utf-8"))
        self.store.index[self.s] = ix
        if self.s in self.store.pending:
            self.store.pending.remove(self.s)

    def abandon(self) -> None:
        try:
            self.fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _run_item(args):
    """Worker: ``(audio identity, fn(job))``: the identity is taken before the audio is read, so an edit
    during extraction shows up as a change next time."""
    fn, path, content, job = args
    return audio_identity(path, content), fn(job)


def build(store: Store, shards: list[int], fn, jobs: list, workers: int | None = None, desc: str = "features",
          initializer=None, initargs=(), log=print) -> None:
    """Extract ``shards`` of ``store`` with ``fn(jobs[i])`` per item ``i`` (returning ``(array or list of
    arrays or None, problem or None[, (rate, channels)])``), in one process pool over all of them, each
    shard written as its items arrive. An interruption keeps the shards finished so far."""
    shards = sorted(shards)
    if not shards:
        return
    content = store.check == "content"
    order = [i for s in shards for i in store.items_of(s)]
    work = [(fn, store.paths[i], content, jobs[i]) for i in order]
    state = {"k": 0, "writer": None}

    def take(result) -> None:
        i = order[state["k"]]
        state["k"] += 1
        s = i // store.shard_size
        if state["writer"] is None:
            state["writer"] = _ShardWriter(store, s)
        identity, out = result
        arrays, problem, *rest = out
        state["writer"].add(i, identity, arrays, problem, rest[0] if rest else None)
        if i == store.items_of(s).stop - 1:
            writer, state["writer"] = state["writer"], None
            writer.finish()

    kw = {} if initializer is None else {"initializer": initializer, "initargs": initargs}
    n_items = len(order)
    log(f"feature store: extracting {len(shards)} of {store.n_shards} shard(s) ({n_items} items) into "
        f"{printable(store.folder)}")
    try:
        run_jobs(_run_item, work, workers, desc, on_result=take, **kw)
    finally:
        if state["writer"] is not None:
            state["writer"].abandon()


def ensure(cache_dir: Path, name: str, signature: dict, paths: list[Path], keys: list[str], fn, jobs: list,
           feat_cfg: dict, share: tuple[int, int] = (0, 1), prepare=None, log=print, workers: int | None = None,
           desc: str = "features") -> Store:
    """The store ``name`` for ``paths`` in ``cache_dir`` (its folder keyed on ``signature`` and the corpus),
    with this process's ``share`` ``(rank, world_size)`` of its missing shards extracted (``fn(jobs[i])``
    per item; ``prepare()``, called only when there is work, returns ``run_jobs`` keywords such as an
    initializer). With the default share every missing shard is extracted: the store is complete."""
    key = hashlib.sha1(json.dumps([signature, corpus_id(paths, keys)], sort_keys=True).encode()).hexdigest()[:16]
    store = open_store(Path(cache_dir) / f"store_{name}_{key}", signature, paths, keys,
                       int(feat_cfg.get("store_shard_size") or 256), feat_cfg.get("store_check") or "content", log,
                       workers)
    mine = shards_of_rank(store, *share)
    if mine:
        build(store, mine, fn, jobs, workers, desc, log=log, **(prepare() if prepare else {}))
    return store

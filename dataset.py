"""Data: manifests and trial lists, audio reading, MFCC features (cached), training and test datasets.

Manifests are text files of ``SPEAKER RELPATH`` lines; trial lists of ``ENROLL_RELPATH TEST_RELPATH
LABEL`` lines (1 target, 0 non-target). RELPATHs are relative to the configured root and may use
``/`` or ``\\``. UTF-8 with or without BOM, LF or CRLF; blank lines are ignored.

Features: librosa MFCCs (25 ms Hann window, 10 ms hop at 16 kHz, ``features.n_mfcc`` coefficients
from ``features.n_mels`` mel bands), per-utterance mean normalisation unless ``features.mean_norm`` is
false, float32 arrays of shape ``(n_mfcc, frames)``. They are computed once per utterance (in
parallel) and cached in memory and on disk (``features.cache_dir``), so an epoch never re-reads audio.

Augmentation (``augment:`` config section, off by default): ``load_training_features`` adds offline
augmented copies of the training utterances (``augment.py``: noise, reverberation, gain, speed),
made once with a fixed seed and cached next to the clean features under a key that includes the
augmentation settings; ``SpkTrainDataset`` crops from the clean or an augmented version and can
apply SpecAugment to the crop. Test utterances are never augmented.

Faults: every manifest/trial problem is listed together with file and line numbers. Unusable
audio (missing, 0 bytes, truncated WAV, not audio, NaN/inf samples, silent, shorter than
``features.min_seconds``) is one problem line per file; ``load_features`` raises one DataError
listing them (``data.bad_audio: error``) or leaves them out and returns them (``skip``). Stereo
and other sample rates are converted and counted in one log line. Failures inside the extraction
process pool come back as one-line problems or one DataError, never as worker tracebacks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

import augment
from config import config_path_value, key_source, normalize_relpath, resolve_path

MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """Bad manifest, trial list or audio, with a message naming the file (and line) and the fix."""


# --------------------------------------------------------------------------- manifests and trials
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


# --------------------------------------------------------------------------- audio and features
def _one_line(text: object, limit: int = 160) -> str:
    """An exception message as one short line (library messages can span several lines)."""
    return " ".join(str(text).split())[:limit]


def _wav_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file whose header declares more audio than the file holds, a description of
    the shortfall (libsndfile would silently read the part that is there); else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = os.fstat(f.fileno()).st_size
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                chunk_id, chunk_len = chunk[:4], int.from_bytes(chunk[4:], "little")
                if chunk_id == b"data":
                    have = size - pos - 8
                    if chunk_len in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                        return None
                    if chunk_len > have:
                        return (f"truncated WAV: the header declares {chunk_len} bytes of audio, the file holds "
                                f"{have} ({100.0 * have / chunk_len:.0f}%); an incomplete copy or download?")
                    return None
                pos += 8 + chunk_len + (chunk_len & 1)
    except OSError:
        return None
    return None


def _read_audio(path: Path, sample_rate: int, min_seconds: float = 0.0) -> tuple[np.ndarray, int, int]:
    """``(mono float32 waveform at sample_rate, original rate, original channel count)``; see load_audio."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: audio file is empty (0 bytes)")
    truncated = _wav_truncation(path)
    if truncated:
        raise DataError(f"{path}: {truncated}")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError for bad files
        raise DataError(f"{path}: not a readable WAV/FLAC file ({_one_line(e, 120)})") from None
    if wav.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples")
    channels = wav.shape[1]
    wav = wav.mean(axis=1) if channels > 1 else wav[:, 0]
    if not np.all(np.isfinite(wav)):
        raise DataError(f"{path}: audio has NaN or infinite samples")
    if sr != sample_rate:
        import librosa
        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
    if float(np.max(np.abs(wav))) == 0.0:
        raise DataError(f"{path}: audio is silent (all samples are zero)")
    if min_seconds and wav.size < min_seconds * sample_rate:
        raise DataError(f"{path}: audio is too short ({wav.size / sample_rate:.3f} s; features.min_seconds is "
                        f"{min_seconds:g} s)")
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr), int(channels)


def load_audio(path: Path, sample_rate: int, min_seconds: float = 0.0) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate`` (stereo is averaged, other rates are resampled).

    Raises DataError naming the file for missing, empty, truncated, unreadable, non-finite, silent
    or (with ``min_seconds``) too short audio.
    """
    return _read_audio(path, sample_rate, min_seconds)[0]


@functools.lru_cache(maxsize=8)
def _mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa's mel filterbank ``(n_mels, 1 + n_fft // 2)``, built once per setting."""
    import librosa
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def mfcc(wav: np.ndarray, feat_cfg: dict, mean_norm: bool | None = None) -> np.ndarray:
    """MFCCs ``(n_mfcc, frames)`` float32.

    ``mean_norm`` (default: ``features.mean_norm``, true when the key is absent) subtracts each
    coefficient's mean over the utterance (cepstral mean normalisation). That removes a fixed
    microphone/room response, and with it whatever the recording channel says about the speaker: keep
    it where enrolment and test come from different channels; switch it off where a speaker's
    recordings share one channel and different speakers' do not (``recipes/speech_commands.yaml``).
    """
    import librosa
    sr = feat_cfg["sample_rate"]
    win = int(round(sr * feat_cfg["win_length_ms"] / 1000))
    hop = int(round(sr * feat_cfg["hop_length_ms"] / 1000))
    n_fft = max(feat_cfg["n_fft"], win)
    # librosa.feature.mfcc(y=wav, ...) step by step, with the same result, for two measured costs
    # (benchmark.py, "MFCC extraction"): it rebuilds the mel filterbank on every call (a third of the
    # time of a 1-s clip), and its filterbank product is a small matrix product that OpenBLAS splits
    # over threads, which costs more than it saves and, beside a training process, spins (8x slower);
    # one BLAS thread per product, parallelism comes from worker processes.
    with _blas_controller().limit(limits=1, user_api="blas"):
        power = np.abs(librosa.stft(wav, n_fft=n_fft, hop_length=hop, win_length=win)) ** 2
        mel = _mel_filterbank(sr, n_fft, feat_cfg["n_mels"], float(feat_cfg["fmin"]),
                              float(min(feat_cfg["fmax"], sr / 2))) @ power
        feats = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=feat_cfg["n_mfcc"])
    if mean_norm is None:
        mean_norm = feat_cfg.get("mean_norm", LEGACY_FEATURE_DEFAULTS["mean_norm"])
    if mean_norm:
        feats -= feats.mean(axis=1, keepdims=True)
    return feats.astype(np.float32)


def _extract_one(args) -> tuple[np.ndarray | None, str | None, tuple[int, int]]:
    """``(features or None, one-line problem or None, (original rate, channels))`` of one file.

    Runs in worker processes: every failure becomes a one-line problem naming the file, never a
    traceback from inside the pool.
    """
    path, feat_cfg = args
    try:
        wav, sr, channels = _read_audio(path, feat_cfg["sample_rate"], feat_cfg.get("min_seconds", 0.0) or 0.0)
        feats = mfcc(wav, feat_cfg)
        if not np.all(np.isfinite(feats)):
            return None, f"{path}: features are not finite (NaN/inf MFCCs)", (sr, channels)
        return feats, None, (sr, channels)
    except DataError as e:
        return None, _one_line(e, 400), (0, 0)
    except Exception as e:  # report any librosa failure as one line, never a worker traceback
        return None, f"{path}: feature extraction failed ({type(e).__name__}: {_one_line(e, 120)})", (0, 0)


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is handled by the main process alone (no traceback per worker), and
    each worker computes with one BLAS/OpenMP thread: N workers x N threads on N cores oversubscribe
    the CPU (measured: 2 workers ran at 0.67x of one process; with one thread each at 1.5x)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:  # optional (comes with scikit-learn); only a speed matter
        pass
    torch.set_num_threads(1)


FEATURE_KEYS = ("sample_rate", "n_mfcc", "n_mels", "win_length_ms", "hop_length_ms", "n_fft", "fmin", "fmax",
                "mean_norm")
#: Values of feature keys added after the first checkpoints were written: what those checkpoints used.
LEGACY_FEATURE_DEFAULTS = {"mean_norm": True}


def feature_signature(feat_cfg: dict) -> dict:
    """The feature settings a trained model depends on (stored in checkpoints, compared at test time)."""
    return {k: feat_cfg[k] if k in feat_cfg else LEGACY_FEATURE_DEFAULTS[k] for k in FEATURE_KEYS}


def _cache_file(paths: list[Path], feat_cfg: dict, cache_dir: Path) -> Path:
    h = hashlib.sha1(json.dumps(feature_signature(feat_cfg), sort_keys=True).encode())
    min_seconds = feat_cfg.get("min_seconds", 0.0) or 0.0
    if min_seconds:  # decides which files are usable, so it is part of the key
        h.update(f"min_seconds={float(min_seconds)!r}\n".encode())
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return cache_dir / f"mfcc_{h.hexdigest()[:20]}.npz"


def _extract_all(paths: list[Path], feat_cfg: dict, workers: int | None = None, desc: str = "MFCC"):
    """``(features or None per path, problems, (original rate, channels) per path)``."""
    jobs = [(Path(p), feat_cfg) for p in paths]
    results = _run_jobs(_extract_one, jobs, workers, desc)
    feats = [r[0] for r in results]
    problems = [r[1] for r in results if r[1] is not None]
    infos = [r[2] for r in results]
    return feats, problems, infos


def _run_jobs(fn, jobs: list, workers: int | None, desc: str, initializer=_ignore_sigint, initargs=()) -> list:
    """``[fn(job) for job in jobs]`` with a progress bar; in a process pool (``initializer(*initargs)``
    in each worker) when ``workers > 1`` (default: up to 8) and there are 64 jobs or more. A dying
    worker or any other pool failure is one DataError."""
    from tqdm import tqdm
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) >= 64:
        import multiprocessing as mp
        from concurrent.futures.process import BrokenProcessPool
        ctx = mp.get_context("fork") if sys.platform != "win32" else None
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer, initargs=initargs)
        try:
            results = list(tqdm(pool.map(fn, jobs, chunksize=16), total=len(jobs),
                                desc=desc, unit="utt", leave=False, file=sys.stderr))
        except BrokenProcessPool as e:
            pool.shutdown(wait=False, cancel_futures=True)
            raise DataError(f"a feature-extraction worker process died ({_one_line(e, 160)}) while reading "
                            f"{len(jobs)} audio files; usually out of memory or a crash inside an audio "
                            "library. Free memory and run again") from None
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        except Exception as e:  # anything else the pool passes back, as one line
            pool.shutdown(wait=False, cancel_futures=True)
            raise DataError(f"feature extraction failed ({type(e).__name__}: {_one_line(e, 200)})") from None
        pool.shutdown(wait=True)
    else:
        results = [fn(j) for j in tqdm(jobs, desc=desc, unit="utt", leave=False, file=sys.stderr)]
    return results


def extract_features(paths: list[Path], feat_cfg: dict, workers: int | None = None,
                     desc: str = "MFCC") -> tuple[list[np.ndarray | None], list[str]]:
    """Features for every path (None where the audio is bad) and the list of problems found.

    With ``workers > 1`` (default: up to 8 processes) and 64 files or more, files are read in a
    process pool; a failure there still comes back as a one-line problem or DataError.
    """
    feats, problems, _ = _extract_all(paths, feat_cfg, workers, desc)
    return feats, problems


def conversion_note(infos, sample_rate: int) -> str | None:
    """One line counting the files that were resampled or averaged to mono (None when none were)."""
    rates: dict[int, int] = {}
    stereo = 0
    for sr, channels in infos:
        if sr and sr != sample_rate:
            rates[int(sr)] = rates.get(int(sr), 0) + 1
        if channels and channels > 1:
            stereo += 1
    parts = []
    if rates:
        detail = ", ".join(f"{n} at {sr} Hz" for sr, n in sorted(rates.items()))
        parts.append(f"{sum(rates.values())} file(s) resampled to {sample_rate} Hz ({detail})")
    if stereo:
        parts.append(f"{stereo} multi-channel file(s) averaged to mono")
    return f"note: {'; '.join(parts)}" if parts else None


def load_features(paths: list[Path], feat_cfg: dict, policy: str = "error",
                  log=print, desc: str = "MFCC", workers: int | None = None
                  ) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Cached features for ``paths``.

    Returns ``(features, kept_indices, problems)``. With ``policy="error"`` any bad file raises one
    DataError listing them all; with ``"skip"`` bad files are dropped and listed in ``problems``.
    Files that had to be resampled or averaged to mono are counted in one ``log`` line.
    """
    paths = [Path(p) for p in paths]
    if policy not in ("error", "skip"):
        raise DataError(f"bad audio policy {policy!r}; use 'error' or 'skip' (data.bad_audio)")
    cache_dir_value = feat_cfg.get("cache_dir", "")
    cache_file = None
    if cache_dir_value:
        cache_file = _cache_file(paths, feat_cfg, resolve_path(cache_dir_value))
        if cache_file.is_file():
            try:
                with np.load(cache_file) as z:
                    data, offsets, kept = z["data"], z["offsets"], z["kept"]
                    problems = [str(s) for s in z["problems"]]
                    infos = [tuple(r) for r in z["infos"].tolist()] if "infos" in z.files else []
                if len(offsets) != len(kept) + 1 or (len(kept) and (kept.max() >= len(paths)
                                                                    or offsets[-1] != data.shape[1])):
                    raise ValueError("inconsistent cache")
                feats = [data[:, offsets[i]:offsets[i + 1]] for i in range(len(kept))]
                if problems and policy == "error":
                    _raise_audio_problems(problems)
                note = conversion_note(infos, feat_cfg["sample_rate"])
                if note:
                    log(note)
                return feats, kept.tolist(), problems
            except (OSError, KeyError, ValueError, EOFError):
                log(f"note: ignoring unreadable feature cache {cache_file}")
    feats, problems, infos = _extract_all(paths, feat_cfg, workers=workers, desc=desc)
    if problems and policy == "error":
        _raise_audio_problems(problems)
    note = conversion_note(infos, feat_cfg["sample_rate"])
    if note:
        log(note)
    kept = [i for i, f in enumerate(feats) if f is not None]
    feats = [feats[i] for i in kept]
    if cache_file is not None and feats:
        from checkpoint import atomic_write  # the project's one write-then-rename helper
        offsets = np.cumsum([0] + [f.shape[1] for f in feats])
        data = np.concatenate(feats, axis=1)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, data=data, offsets=offsets, kept=np.asarray(kept, dtype=np.int64),
                         problems=np.asarray(problems, dtype=str),
                         infos=np.asarray(infos, dtype=np.int64).reshape(-1, 2))
        try:
            atomic_write(cache_file, write)
        except Exception as e:  # a cache that cannot be written only costs time next run
            log(f"note: feature cache not written ({_one_line(e, 200)})")
        feats = [data[:, offsets[i]:offsets[i + 1]] for i in range(len(feats))]
    return feats, kept, problems


def _raise_audio_problems(problems: list[str]) -> None:
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(f"{len(problems)} unusable audio file(s): {shown}{more}. Fix or remove them from the "
                    "manifest, or set data.bad_audio: skip to leave them out of training")


# --------------------------------------------------------------------------- augmented copies
BABBLE_POOL = 32          # training utterances (distinct speakers) that babble noise is mixed from
BABBLE_MAX_SECONDS = 6.0  # each trimmed to this length


def augmentation_active(aug_cfg: dict | None) -> bool:
    """True when the ``augment:`` settings ask for offline copies (``copies > 0``) or speed copies
    as new speakers; False for the defaults (training then runs exactly as without augmentation)."""
    return augment.settings(aug_cfg)["copies"] > 0 or bool(new_speaker_factors(aug_cfg))


def new_speaker_factors(aug_cfg: dict | None) -> list[float]:
    """Speed factors whose copies are new speakers (``augment.speed_as_new_speakers``), 1.0 left out."""
    s = augment.settings(aug_cfg)
    if not s["speed_as_new_speakers"]:
        return []
    out: list[float] = []
    for f in s["speed_factors"]:
        if float(f) != 1.0 and float(f) not in out:
            out.append(float(f))
    return out


def speed_speaker(speaker: str, factor: float) -> str:
    """Name of the new speaker made of ``speaker``'s utterances at ``factor`` speed: ``S0001_sp0.9``."""
    return f"{speaker}_sp{factor:g}"


@dataclass
class TrainingFeatures:
    """Training features with their augmented copies (``load_training_features``).

    ``versions[j]``: the versions of training item ``j``, each ``(n_mfcc, frames)`` float32: the clean
    features first, then the ``augment.copies`` augmented ones. ``items[j]``: ``(index into paths,
    speed factor)``, factor 1.0 for the utterance itself, else a speed copy that is a new speaker.
    ``kept``/``problems`` as from ``load_features``; ``cache_file``: the augmented-copy cache (or None).
    """
    versions: list
    items: list
    kept: list
    problems: list
    cache_file: Path | None = None


_BABBLE_BANK: list = []   # (speaker, waveform) pairs, set in each extraction worker


def _set_babble_bank(bank) -> None:
    """Pool initializer: the babble bank for this worker (and Ctrl-C left to the main process)."""
    global _BABBLE_BANK
    _BABBLE_BANK = list(bank)
    _ignore_sigint()


def _augment_one(args):
    """``(list of feature arrays or None, problem or None)`` for one kept training file: its
    ``copies`` augmented versions, then for each new-speaker speed factor the sped-up clean version and
    its ``copies`` augmented versions. Copy ``k`` of speed version ``j`` (0: original speed) draws from
    ``default_rng((augment.seed, index, j, k))``."""
    index, path, speaker, feat_cfg, aug, factors = args
    try:
        sr = feat_cfg["sample_rate"]
        wav = _read_audio(path, sr)[0]
        others = [w for spk, w in _BABBLE_BANK if spk != speaker]
        out = []
        for j, factor in enumerate([1.0] + list(factors)):
            base = wav if j == 0 else augment.change_speed(wav, factor)
            if j > 0:
                out.append(mfcc(base, feat_cfg))
            for k in range(aug["copies"]):
                rng = np.random.default_rng((aug["seed"], index, j, k))
                out.append(mfcc(augment.augment_waveform(base, rng, aug, others=others, sr=sr), feat_cfg))
        bad = [f for f in out if not np.all(np.isfinite(f))]
        if bad:
            return None, f"{path}: augmented features are not finite (NaN/inf MFCCs)"
        return out, None
    except DataError as e:
        return None, _one_line(e, 400)
    except Exception as e:  # one line, never a worker traceback
        return None, f"{path}: augmentation failed ({type(e).__name__}: {_one_line(e, 120)})"


def _babble_bank(paths: list[Path], speakers: list[str], kept: list[int], feat_cfg: dict, aug: dict) -> list:
    """Up to ``BABBLE_POOL`` clean training utterances of distinct speakers (seeded by ``augment.seed``),
    each at most ``BABBLE_MAX_SECONDS`` long, as ``(speaker, waveform)``; empty when no babble is asked for."""
    if aug["copies"] <= 0 or aug["noise_prob"] <= 0 or "babble" not in aug["noise_types"]:
        return []
    rng = np.random.default_rng((aug["seed"], 7919))
    by_speaker: dict[str, list[int]] = {}
    for i in kept:
        by_speaker.setdefault(speakers[i], []).append(i)
    names = sorted(by_speaker)
    chosen = rng.choice(len(names), size=min(BABBLE_POOL, len(names)), replace=False)
    sr = feat_cfg["sample_rate"]
    bank = []
    for c in sorted(int(c) for c in chosen):
        idx = by_speaker[names[c]]
        i = idx[int(rng.integers(0, len(idx)))]
        wav = _read_audio(paths[i], sr)[0]
        bank.append((names[c], wav[: int(BABBLE_MAX_SECONDS * sr)].copy()))
    return bank


def _aug_cache_file(paths: list[Path], feat_cfg: dict, aug: dict, kept: list[int], speakers: list[str],
                    cache_dir: Path) -> Path:
    """Cache of the augmented copies: keyed on the clean cache's key (files, feature settings) plus the
    offline augmentation settings (``augment.offline_signature``), the kept files and their speakers."""
    h = hashlib.sha1(_cache_file(paths, feat_cfg, cache_dir).name.encode())
    h.update(json.dumps(augment.offline_signature(aug), sort_keys=True).encode())
    h.update(json.dumps([int(i) for i in kept]).encode())
    h.update(json.dumps(list(speakers), ensure_ascii=False).encode())
    return cache_dir / f"mfcc_aug_{h.hexdigest()[:20]}.npz"


def load_training_features(paths: list[Path], speakers: list[str], feat_cfg: dict, aug_cfg: dict | None,
                           policy: str = "error", log=print, desc: str = "MFCC",
                           workers: int | None = None) -> TrainingFeatures:
    """Clean features (``load_features``, its own cache unchanged) plus the offline augmented copies.

    ``speakers[i]``: speaker of ``paths[i]`` (babble noise never mixes in the utterance's own speaker).
    ``aug_cfg``: the ``augment:`` config section. Each kept utterance gets ``copies`` augmented
    versions (random chains of ``augment.augment_waveform``, seeded by ``augment.seed``, the file's
    index and the copy number); with ``speed_as_new_speakers`` every speed factor adds an item (sped
    clean version + its ``copies`` augmented versions). The copies are computed once (in a process
    pool like the clean features) and cached next to the clean features (``features.cache_dir``) in a
    file whose key includes the augmentation settings. With augmentation off every item has one
    version, the clean features themselves.
    """
    paths = [Path(p) for p in paths]
    feats, kept, problems = load_features(paths, feat_cfg, policy=policy, log=log, desc=desc, workers=workers)
    aug = augment.settings(aug_cfg)
    factors = new_speaker_factors(aug)
    items = [(i, 1.0) for i in kept] + [(i, f) for f in factors for i in kept]
    if not augmentation_active(aug):
        return TrainingFeatures([[f] for f in feats], items, kept, problems)
    per_utt = aug["copies"] + len(factors) * (aug["copies"] + 1)
    cache_dir_value = feat_cfg.get("cache_dir", "")
    cache_file = (_aug_cache_file(paths, feat_cfg, aug, kept, speakers, resolve_path(cache_dir_value))
                  if cache_dir_value else None)
    extra = None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                data, offsets, layout = z["data"], z["offsets"], z["layout"]
            if (layout.tolist() != [len(kept), aug["copies"], len(factors)]
                    or len(offsets) != len(kept) * per_utt + 1 or offsets[-1] != data.shape[1]):
                raise ValueError("inconsistent cache")
            extra = [data[:, offsets[j]:offsets[j + 1]] for j in range(len(offsets) - 1)]
        except (OSError, KeyError, ValueError, EOFError):
            log(f"note: ignoring unreadable augmented-feature cache {cache_file}")
    if extra is None:
        bank = _babble_bank(paths, speakers, kept, feat_cfg, aug)
        jobs = [(i, paths[i], speakers[i], feat_cfg, aug, factors) for i in kept]
        what = f"{desc} augmented x{aug['copies']}" + (f" + speed {factors}" if factors else "")
        global _BABBLE_BANK
        saved, _BABBLE_BANK = _BABBLE_BANK, bank  # used directly when the jobs run in this process
        try:
            results = _run_jobs(_augment_one, jobs, workers, what, initializer=_set_babble_bank, initargs=(bank,))
        finally:
            _BABBLE_BANK = saved
        bad = [r[1] for r in results if r[1] is not None]
        if bad:
            raise DataError(f"augmenting {len(bad)} training file(s) failed: {'; '.join(bad[:MAX_LISTED_PROBLEMS])}")
        extra = [f for r in results for f in r[0]]
        if cache_file is not None and extra:
            from checkpoint import atomic_write
            offsets = np.cumsum([0] + [f.shape[1] for f in extra])
            data = np.concatenate(extra, axis=1)

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.savez(fh, data=data, offsets=offsets,
                             layout=np.asarray([len(kept), aug["copies"], len(factors)], dtype=np.int64))
            try:
                atomic_write(cache_file, write)
            except Exception as e:  # only costs time next run
                log(f"note: augmented-feature cache not written ({_one_line(e, 200)})")
            extra = [data[:, offsets[j]:offsets[j + 1]] for j in range(len(extra))]
    k = aug["copies"]
    versions = [[feats[u]] + extra[u * per_utt: u * per_utt + k] for u in range(len(kept))]
    for j in range(len(factors)):
        for u in range(len(kept)):
            first = u * per_utt + k + j * (k + 1)
            versions.append(extra[first: first + k + 1])
    return TrainingFeatures(versions, items, kept, problems, cache_file)


# --------------------------------------------------------------------------- datasets
def repeat_to(feat: np.ndarray, frames: int) -> np.ndarray:
    """Repeat an utterance along time until it has at least ``frames`` frames."""
    if feat.shape[1] >= frames:
        return feat
    reps = -(-frames // feat.shape[1])
    return np.tile(feat, (1, reps))


def equal_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by identical length (batched embedding without padding is exact)."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(int(n), []).append(i)
    return [idx[j:j + batch_size] for _, idx in sorted(by_len.items()) for j in range(0, len(idx), batch_size)]


class SpkTrainDataset(Dataset):
    """Training utterances as random fixed-length MFCC crops with speaker labels.

    ``opts`` is the full configuration (``config.load_config``). Item ``i`` is
    ``(features (n_mfcc, crop_frames) float32 tensor, speaker id)``; crops are drawn from a
    generator seeded by ``(train.seed, epoch, i)`` (see ``set_epoch``), so a run is reproducible and
    a resumed run sees the same crops as an uninterrupted one. Utterances shorter than the crop are
    repeat-padded.

    Augmentation (``augment:`` section, off by default; then all of the above is exactly as without
    it): with ``augment.copies`` K > 0 every utterance has K offline augmented versions besides the
    clean one (``load_training_features``, cached), and each epoch item ``i`` is cropped from one of
    its K + 1 versions, chosen by the same ``(train.seed, epoch, i)`` generator: one item per
    utterance and epoch as before. ``augment.spec_augment`` masks each crop (same generator). With
    ``augment.speed_as_new_speakers`` the speed copies are extra items of new speakers
    (``S0001_sp0.9``): ``speakers`` and the number of items grow.

    Attributes: ``speakers`` (sorted speaker names, index = class id), ``utterances`` (one per item;
    speed copies carry the new speaker name and the original relpath), ``labels``, ``skipped``
    (problems of files left out under ``data.bad_audio: skip``), ``features`` (clean features per
    item), ``versions`` (per item, clean + augmented features; None without offline augmentation),
    ``speeds`` (per item, 1.0 or the new-speaker speed factor).
    """

    def __init__(self, opts: dict, log=print):
        self.root = config_path_value(opts, "data.root")
        utts = check_training_data(opts)
        self.manifest_speakers = {u.speaker for u in utts}
        aug = augment.settings(opts.get("augment"))
        self.versions = None
        self.speeds = None
        paths = [self.root / u.relpath for u in utts]
        if augmentation_active(aug):
            tf = load_training_features(paths, [u.speaker for u in utts], opts["features"], aug,
                                        policy=opts["data"]["bad_audio"], log=log, desc="train MFCC")
            kept, self.skipped = tf.kept, tf.problems
            self.utterances = [utts[i] if f == 1.0 else Utterance(speed_speaker(utts[i].speaker, f), utts[i].relpath,
                                                                  utts[i].line) for i, f in tf.items]
            self.speeds = [f for _, f in tf.items]
            feats = [v[0] for v in tf.versions]
            log(f"augmentation: {aug['copies']} offline cop{'y' if aug['copies'] == 1 else 'ies'} per utterance"
                + (f", speed copies {', '.join(f'{f:g}' for f in new_speaker_factors(aug))} as new speakers"
                   if new_speaker_factors(aug) else "")
                + (", SpecAugment on crops" if aug["spec_augment"] else ""))
        else:
            feats, kept, self.skipped = load_features(paths, opts["features"], policy=opts["data"]["bad_audio"],
                                                      log=log, desc="train MFCC")
            self.utterances = [utts[i] for i in kept]
            if aug["spec_augment"]:
                log("augmentation: SpecAugment on crops")
        if self.skipped:
            log(f"warning: skipped {len(self.skipped)} unusable training file(s) (data.bad_audio: skip)")
        self.speakers = sorted({u.speaker for u in self.utterances})
        index = {s: i for i, s in enumerate(self.speakers)}
        self.labels = [index[u.speaker] for u in self.utterances]
        self.crop_frames = opts["train"]["crop_frames"]
        self.features = [repeat_to(f, self.crop_frames) for f in feats]
        if augmentation_active(aug):
            self.versions = [[self.features[j]] + [repeat_to(f, self.crop_frames) for f in v[1:]]
                             for j, v in enumerate(tf.versions)]
        self.spec_augment = bool(aug["spec_augment"])
        self.spec_masks = dict(n_time_masks=int(aug["time_masks"]), max_time=int(aug["max_time"]),
                               n_freq_masks=int(aug["freq_masks"]), max_freq=int(aug["max_freq"]))
        self.seed = opts["train"]["seed"]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.features)

    def choose(self, i: int) -> tuple[int, int, np.random.Generator]:
        """``(version, crop start, generator)`` of item ``i`` this epoch (version 0 = clean); the
        generator is left where SpecAugment continues drawing."""
        rng = np.random.default_rng((self.seed, self.epoch, i))
        n_versions = 1 if self.versions is None else len(self.versions[i])
        version = 0 if n_versions == 1 else int(rng.integers(0, n_versions))
        feat = self.features[i] if version == 0 else self.versions[i][version]
        high = feat.shape[1] - self.crop_frames
        start = 0 if high <= 0 else int(rng.integers(0, high + 1))
        return version, start, rng

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        version, start, rng = self.choose(i)
        feat = self.features[i] if version == 0 else self.versions[i][version]
        crop = feat[:, start:start + self.crop_frames]
        if self.spec_augment:
            crop = augment.spec_augment(crop, rng, **self.spec_masks)
        return torch.from_numpy(crop), self.labels[i]

    @staticmethod
    def collate_fn(batch):
        """List of ``(feat, label)`` -> ``(batch, n_mfcc, crop_frames)`` tensor, ``(batch,)`` labels."""
        feats, labels = zip(*batch)
        return torch.stack(feats), torch.tensor(labels, dtype=torch.long)


class SpkTestDataset(Dataset):
    """Whole test utterances (no cropping) for embedding.

    ``opts`` is the full configuration. Item ``i`` is ``(features (n_mfcc, frames) tensor, relpath)``.
    ``equal_length_batches`` groups utterances of identical length so that batched embedding is
    exact for every model (no padding at all).
    """

    def __init__(self, opts: dict, log=print, relpaths: list[str] | None = None):
        self.root = config_path_value(opts, "test.root")
        manifest = config_path_value(opts, "test.test_manifest")
        utts = read_manifest(manifest, key="test.test_manifest", source=key_source(opts, "test.test_manifest"))
        if relpaths is not None:
            wanted = set(relpaths)
            utts = [u for u in utts if u.relpath in wanted]
        check_root(self.root, utts, "test.root", manifest, key_source(opts, "test.root"))
        feats, kept, problems = load_features([self.root / u.relpath for u in utts], opts["features"],
                                              policy="error", log=log, desc="test MFCC")
        self.utterances = [utts[i] for i in kept]
        self.features = feats
        self.index = {u.relpath: i for i, u in enumerate(self.utterances)}

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return torch.from_numpy(self.features[i]), self.utterances[i].relpath

    def equal_length_batches(self, batch_size: int) -> list[list[int]]:
        return equal_length_batches([f.shape[1] for f in self.features], batch_size)

    @staticmethod
    def collate_fn(batch):
        """List of ``(feat, relpath)`` -> zero-padded ``(batch, n_mfcc, max_frames)``, lengths, relpaths."""
        feats, keys = zip(*batch)
        lengths = torch.tensor([f.shape[1] for f in feats], dtype=torch.long)
        out = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
        for j, f in enumerate(feats):
            out[j, :, :f.shape[1]] = f
        return out, lengths, list(keys)


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
        raise DataError(f"none of the first {len(sample)} files of {manifest} exist under {key} = {root}{where} "
                        f"(e.g. {root / sample[0].relpath}); is '{key}' the right folder?")


def check_training_data(opts: dict) -> list[Utterance]:
    """Cheap checks of the training data before any heavy work: the manifest parses and ``data.root``
    holds its files. Returns the manifest's utterances. Messages name the key and its config file."""
    from config import key_source
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

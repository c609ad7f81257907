"""Reading audio files: mono float32 waveforms at the configured sample rate, or a one-line DataError.

Unusable audio (missing, 0 bytes, truncated WAV, not audio, NaN/inf samples, silent, shorter than
``features.min_seconds``) raises a DataError naming the file, and so does audio whose header declares
more than ``features.max_seconds`` (or an absurd rate or channel count): refused before it is decoded,
so no header can make a reader fill the memory. Stereo is averaged and other sample
rates are resampled; ``conversion_note`` counts those conversions in one log line.

A path may name a time range of a recording: ``rec.wav#t=1.5,3.25`` (seconds; ``#t=1.5,`` to the end;
the W3C media-fragment form), e.g. a Kaldi ``segments`` line (``svlab.kaldi_data``); ``audio_range``
writes one, ``audio_file`` gives the file it reads. A file whose name really ends that way is read whole.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from svlab.config import LIMITS
from svlab.errors import DataError
from svlab.text import printable

MAX_SAMPLE_RATE = 768_000          # the highest rate of any recording format in use
MAX_CHANNELS = 64
MAX_SAMPLES_PER_SECOND = 192_000   # samples x channels per second of audio decoded at most (96 kHz stereo)


def one_line(text: object, limit: int = 160) -> str:
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


def size_problem(frames: int, sr: int, channels: int, max_seconds: float | None = None) -> str | None:
    """Why audio of ``frames`` samples per channel at ``sr`` Hz cannot be decoded within the limits
    (its length over ``max_seconds``, default ``LIMITS['features.max_seconds']``; a sample rate or
    channel count no recording has; more samples than such a file decodes to), else None. Checked on
    the header, before anything is decoded or resampled."""
    max_seconds = LIMITS["features.max_seconds"] if max_seconds is None else max_seconds
    if not 0 < sr <= MAX_SAMPLE_RATE:
        return f"the header declares a sample rate of {sr} Hz (at most {MAX_SAMPLE_RATE} Hz is read); a damaged file?"
    if not 0 < channels <= MAX_CHANNELS:
        return f"the header declares {channels} channels (at most {MAX_CHANNELS} are read); a damaged file?"
    if frames / sr > max_seconds:
        return (f"the audio is {frames / sr:.0f} s long (header: {frames} samples at {sr} Hz), longer than "
                f"features.max_seconds ({max_seconds:g} s); cut it into shorter files or raise features.max_seconds")
    if frames * channels > max_seconds * MAX_SAMPLES_PER_SECOND:
        return (f"the header declares {frames} samples x {channels} channels, more than {max_seconds:g} s of audio "
                "decodes to; a damaged file?")
    return None


_RANGE = re.compile(r"^(?P<file>.+)#t=(?P<start>\d+(?:\.\d*)?),(?P<end>\d+(?:\.\d*)?)?$")


def audio_range(path, start: float, end: float | None = None) -> Path:
    """The path of seconds ``start`` to ``end`` (None: the end) of the recording ``path``."""
    return Path(f"{path}#t={float(start)!r},{'' if end is None else repr(float(end))}")


def split_range(path) -> tuple[Path, float, float | None]:
    """``(file, start seconds, end seconds or None)`` of a path that may carry a ``#t=`` range."""
    path = Path(path)
    m = _RANGE.match(str(path))
    if m is None or path.is_file():
        return path, 0.0, None
    return Path(m["file"]), float(m["start"]), float(m["end"]) if m["end"] else None


def audio_file(path) -> Path:
    """The file a (possibly ranged) audio path reads: for the caches' size/time/content checks."""
    return split_range(path)[0]


def read_audio(path: Path, sample_rate: int, min_seconds: float = 0.0,
               max_seconds: float | None = None) -> tuple[np.ndarray, int, int]:
    """``(mono float32 waveform at sample_rate, original rate, original channel count)``; see load_audio."""
    name = printable(path)
    path, start, end = split_range(path)
    if not path.is_file():
        raise DataError(f"{name}: audio file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: audio file is empty (0 bytes)")
    truncated = _wav_truncation(path)
    if truncated:
        raise DataError(f"{name}: {truncated}")
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError for bad files
        raise DataError(f"{name}: not a readable WAV/FLAC file ({one_line(e, 120)})") from None
    with f:
        sr, frames = int(f.samplerate), int(f.frames)
        first, frames = _range_frames(name, start, end, sr, frames)
        too_big = size_problem(frames, sr, int(f.channels), max_seconds)
        if too_big:  # refused on the header's word, before a sample is decoded
            raise DataError(f"{name}: {too_big}")
        try:
            if first:
                f.seek(first)
            wav = f.read(frames, dtype="float32", always_2d=True)
        except Exception as e:
            raise DataError(f"{name}: not a readable WAV/FLAC file ({one_line(e, 120)})") from None
    if wav.shape[0] == 0:
        raise DataError(f"{name}: audio file has no samples")
    channels = wav.shape[1]
    wav = wav.mean(axis=1) if channels > 1 else wav[:, 0]
    if not np.all(np.isfinite(wav)):
        raise DataError(f"{name}: audio has NaN or infinite samples")
    if sr != sample_rate:
        import librosa
        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
    if float(np.max(np.abs(wav))) == 0.0:
        raise DataError(f"{name}: audio is silent (all samples are zero)")
    if min_seconds and wav.size < min_seconds * sample_rate:
        raise DataError(f"{name}: audio is too short ({wav.size / sample_rate:.3f} s; features.min_seconds is "
                        f"{min_seconds:g} s)")
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr), int(channels)


#: A range may end this far after the recording (rounding of the times a segmenter wrote); it is cut there.
RANGE_TOLERANCE_S = 0.1


def _range_frames(name: str, start: float, end: float | None, sr: int, frames: int) -> tuple[int, int]:
    """``(first sample, samples)`` of the range ``start``..``end`` seconds of a recording of ``frames``
    samples at ``sr`` Hz (the whole recording for 0..None); a range outside it is one DataError."""
    if start == 0.0 and end is None:
        return 0, frames
    first = int(round(start * sr))
    last = frames if end is None else int(round(end * sr))
    if first >= frames or last > frames + RANGE_TOLERANCE_S * sr or last <= first:
        raise DataError(f"{name}: the time range {start:g}-{'end' if end is None else f'{end:g}'} s is not within "
                        f"the recording ({frames / sr:.2f} s long); fix the segment times")
    return first, min(last, frames) - first


def load_audio(path: Path, sample_rate: int, min_seconds: float = 0.0, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate`` (stereo is averaged, other rates are resampled).

    Raises DataError naming the file for missing, empty, truncated, unreadable, non-finite, silent,
    (with ``min_seconds``) too short or (``size_problem``) too long audio.
    """
    return read_audio(path, sample_rate, min_seconds, max_seconds)[0]


def conversion_note(infos, sample_rate: int) -> str | None:
    """One line counting the files that were resampled or averaged to mono (None when none were).

    ``infos``: ``(original rate, channels)`` per file, as ``read_audio`` returns them.
    """
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

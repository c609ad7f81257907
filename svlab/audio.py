"""Reading audio files: mono float32 waveforms at the configured sample rate, or a one-line DataError.

Unusable audio (missing, 0 bytes, truncated WAV, not audio, NaN/inf samples, silent, shorter than
``features.min_seconds``) raises a DataError naming the file, and so does audio whose header declares
more than ``features.max_seconds`` (or an absurd rate or channel count): refused before it is decoded,
so no header can make a reader fill the memory. Stereo is averaged and other sample
rates are resampled; ``conversion_note`` counts those conversions in one log line.
"""
from __future__ import annotations

import os
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


def read_audio(path: Path, sample_rate: int, min_seconds: float = 0.0,
               max_seconds: float | None = None) -> tuple[np.ndarray, int, int]:
    """``(mono float32 waveform at sample_rate, original rate, original channel count)``; see load_audio."""
    path = Path(path)
    name = printable(path)
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
        too_big = size_problem(frames, sr, int(f.channels), max_seconds)
        if too_big:  # refused on the header's word, before a sample is decoded
            raise DataError(f"{name}: {too_big}")
        try:
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

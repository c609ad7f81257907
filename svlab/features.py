"""MFCC features: what the networks see of an utterance.

librosa MFCCs (25 ms Hann window, 10 ms hop at 16 kHz, ``features.n_mfcc`` coefficients from
``features.n_mels`` mel bands), per-utterance mean normalisation unless ``features.mean_norm`` is
false, float32 arrays of shape ``(n_mfcc, frames)``. ``feature_signature`` is the part of the
``features:`` settings a trained model depends on: checkpoints store it, evaluation compares it.
"""
from __future__ import annotations

import functools

import numpy as np

FEATURE_KEYS = ("sample_rate", "n_mfcc", "n_mels", "win_length_ms", "hop_length_ms", "n_fft", "fmin", "fmax",
                "mean_norm")
#: Values of feature keys added after the first checkpoints were written: what those checkpoints used.
LEGACY_FEATURE_DEFAULTS = {"mean_norm": True}


def feature_signature(feat_cfg: dict) -> dict:
    """The feature settings a trained model depends on (stored in checkpoints, compared at test time)."""
    return {k: feat_cfg[k] if k in feat_cfg else LEGACY_FEATURE_DEFAULTS[k] for k in FEATURE_KEYS}


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
    # librosa.feature.mfcc(y=wav, ...) step by step, with the same result, for two costs that
    # tools/benchmark.py ("MFCC extraction") measures: librosa rebuilds the mel filterbank on every
    # call, and its filterbank product is a small matrix product that OpenBLAS splits over threads,
    # which costs more than it saves and, beside a training process, spins. So one BLAS thread per
    # product; parallelism comes from worker processes.
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

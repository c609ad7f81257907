"""The front ends: what the networks see of an utterance.

``features.type`` picks one, both through librosa with the same STFT (25 ms Hann window, 10 ms hop at
16 kHz, ``features.n_fft`` points, centred frames), so both give the same frames of an utterance:

``mfcc``   (the lab's) ``features.n_mfcc`` cepstral coefficients from ``features.n_mels`` mel bands;
``fbank``  ``features.n_fbank`` log mel filterbank energies (80 in WeSpeaker, SpeechBrain, 3D-Speaker),
           the natural log of the mel-band powers, floored at ``FBANK_LOG_FLOOR``.

Per-utterance mean normalisation unless ``features.mean_norm`` is false; float32 arrays of shape
``(feature_dim(feat_cfg), frames)``, the ``(n_features, frames)`` every model takes. librosa rather than
``kaldi-native-fbank``: it is already the MFCC's library, so the fbank shares its STFT and frame count
(``min_seconds``, the x-vector's context, the caches' frame logic hold for both), and nothing new is
installed; Kaldi-identical features (povey window, pre-emphasis, dither) matter only for loading models
trained elsewhere, which the kit does not do.

``feature_signature`` is the part of the ``features:`` settings a trained model depends on: checkpoints
store it, evaluation compares it, the feature caches are keyed on it.
"""
from __future__ import annotations

import functools

import numpy as np

FEATURE_KEYS = ("type", "sample_rate", "n_mfcc", "n_mels", "n_fbank", "win_length_ms", "hop_length_ms", "n_fft",
                "fmin", "fmax", "mean_norm")
#: Values of feature keys added after the first checkpoints were written: what those checkpoints used
#: (they are MFCC models; ``n_fbank`` is then unused, and is the shipped default).
LEGACY_FEATURE_DEFAULTS = {"mean_norm": True, "type": "mfcc", "n_fbank": 80}
#: Floor of the mel-band power before the log (librosa's ``power_to_db`` floor): digital silence gives
#: log(1e-10) = -23.0 instead of -inf. Powers are of samples in [-1, 1].
FBANK_LOG_FLOOR = 1e-10


def feature_signature(feat_cfg: dict) -> dict:
    """The feature settings a trained model depends on (stored in checkpoints, compared at test time)."""
    return {k: feat_cfg[k] if k in feat_cfg else LEGACY_FEATURE_DEFAULTS[k] for k in FEATURE_KEYS}


def feature_type(feat_cfg: dict) -> str:
    """``mfcc`` or ``fbank`` (settings from before the key existed: ``mfcc``)."""
    return feat_cfg.get("type", LEGACY_FEATURE_DEFAULTS["type"])


def feature_dim(feat_cfg: dict) -> int:
    """Rows of the features, the models' input size: ``n_fbank`` for fbank, ``n_mfcc`` for mfcc."""
    return feat_cfg["n_fbank"] if feature_type(feat_cfg) == "fbank" else feat_cfg["n_mfcc"]


def extract(wav: np.ndarray, feat_cfg: dict, mean_norm: bool | None = None) -> np.ndarray:
    """The configured front end (``features.type``): ``mfcc`` or ``fbank`` of ``wav``,
    ``(feature_dim(feat_cfg), frames)`` float32."""
    kind = feature_type(feat_cfg)
    if kind == "fbank":
        return fbank(wav, feat_cfg, mean_norm)
    if kind == "mfcc":
        return mfcc(wav, feat_cfg, mean_norm)
    raise ValueError(f"unknown features.type {kind!r}; choose mfcc or fbank")


@functools.lru_cache(maxsize=8)
def _mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa's mel filterbank ``(n_mels, 1 + n_fft // 2)``, built once per setting."""
    import librosa
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def _mel_power(wav: np.ndarray, feat_cfg: dict, n_mels: int) -> np.ndarray:
    """Mel-band powers ``(n_mels, frames)`` float32: power spectrogram (librosa's STFT, centred frames)
    times the cached mel filterbank. Call it with BLAS limited to one thread (see ``mfcc``)."""
    import librosa
    sr = feat_cfg["sample_rate"]
    win = int(round(sr * feat_cfg["win_length_ms"] / 1000))
    hop = int(round(sr * feat_cfg["hop_length_ms"] / 1000))
    n_fft = max(feat_cfg["n_fft"], win)
    power = np.abs(librosa.stft(wav, n_fft=n_fft, hop_length=hop, win_length=win)) ** 2
    return _mel_filterbank(sr, n_fft, n_mels, float(feat_cfg["fmin"]),
                           float(min(feat_cfg["fmax"], sr / 2))) @ power


def _mean_norm(feats: np.ndarray, feat_cfg: dict, mean_norm: bool | None) -> np.ndarray:
    if mean_norm is None:
        mean_norm = feat_cfg.get("mean_norm", LEGACY_FEATURE_DEFAULTS["mean_norm"])
    if mean_norm:
        feats -= feats.mean(axis=1, keepdims=True)
    return feats.astype(np.float32)


def mfcc(wav: np.ndarray, feat_cfg: dict, mean_norm: bool | None = None) -> np.ndarray:
    """MFCCs ``(n_mfcc, frames)`` float32.

    ``mean_norm`` (default: ``features.mean_norm``, true when the key is absent) subtracts each
    coefficient's mean over the utterance (cepstral mean normalisation). That removes a fixed
    microphone/room response, and with it whatever the recording channel says about the speaker: keep
    it where enrolment and test come from different channels; switch it off where a speaker's
    recordings share one channel and different speakers' do not (``recipes/speech_commands.yaml``).
    """
    import librosa
    # librosa.feature.mfcc(y=wav, ...) step by step, with the same result, for two costs that
    # tools/benchmark.py ("MFCC extraction") measures: librosa rebuilds the mel filterbank on every
    # call, and its filterbank product is a small matrix product that OpenBLAS splits over threads,
    # which costs more than it saves and, beside a training process, spins. So one BLAS thread per
    # product; parallelism comes from worker processes.
    with _blas_controller().limit(limits=1, user_api="blas"):
        mel = _mel_power(wav, feat_cfg, feat_cfg["n_mels"])
        feats = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=feat_cfg["n_mfcc"])
    return _mean_norm(feats, feat_cfg, mean_norm)


def fbank(wav: np.ndarray, feat_cfg: dict, mean_norm: bool | None = None) -> np.ndarray:
    """Log mel filterbank energies ``(n_fbank, frames)`` float32: ``log(max(mel power, FBANK_LOG_FLOOR))``
    of ``features.n_fbank`` mel bands, the same STFT and filterbank construction as ``mfcc`` (the same
    as ``np.log(librosa.feature.melspectrogram(...))``); ``mean_norm`` as for ``mfcc`` (each band's mean
    over the utterance subtracted, as WeSpeaker and 3D-Speaker do)."""
    with _blas_controller().limit(limits=1, user_api="blas"):
        mel = _mel_power(wav, feat_cfg, feat_cfg["n_fbank"])
    return _mean_norm(np.log(np.maximum(mel, FBANK_LOG_FLOOR)), feat_cfg, mean_norm)


def repeat_to(feat: np.ndarray, frames: int) -> np.ndarray:
    """Repeat an utterance along time until it has at least ``frames`` frames."""
    if feat.shape[1] >= frames:
        return feat
    reps = -(-frames // feat.shape[1])
    return np.tile(feat, (1, reps))


# Frames one embedding batch holds at most (with test.batch_size utterances at most): the batch's activations,
# and so the peak memory of embedding, are bounded by this however many equal-length utterances a test list
# has; on a CPU such batches also embed faster than fuller ones (the activations stay in cache). Measured in
# docs/large_corpora.md. The commands take it from test.batch_frames; this is that key's default (the shipped
# config.yaml's, checked by tests/test_data.py) for library callers without a configuration.
BATCH_FRAMES = 3000


def equal_length_batches(lengths: list[int], batch_size: int, max_frames: int = BATCH_FRAMES) -> list[list[int]]:
    """Indices grouped by identical length (batched embedding without padding is exact), shortest first: at
    most ``batch_size`` utterances and ``max_frames`` frames a batch (an utterance longer than that alone)."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(int(n), []).append(i)
    batches = []
    for n, idx in sorted(by_len.items()):
        size = max(1, min(batch_size, max_frames // max(n, 1)))
        batches += [idx[j:j + size] for j in range(0, len(idx), size)]
    return batches

"""Data augmentation for training: noise, reverberation, speed, gain (waveforms) and SpecAugment (MFCCs).

Built only from what the lab has (numpy/scipy, the training set itself): no external noise or RIR
corpora. Every function takes a ``numpy.random.Generator`` and is deterministic given it.

Conventions (all functions):

- waveforms are 1-D float arrays of samples (any scale; the loaders give float32 in [-1, 1]) at
  ``sr`` samples per second (16 kHz unless told); outputs are float32;
- levels are in dB: power ratios for SNR and DRR (``10 log10``), amplitude for gain (``20 log10``);
- times are in seconds (RT60, durations), feature masks in frames (10 ms each) and MFCC coefficients;
- ``(lo, hi)`` ranges are drawn uniformly, inclusive.

``augment_waveform`` applies a random chain (speed -> reverberation -> noise -> gain) as configured by
the ``augment:`` section of ``config.yaml`` (the one source of the defaults: ``settings`` fills the
keys a partial dict leaves out from the shipped file); ``svlab.feature_cache.load_training_features``
uses it to build the offline augmented copies (Kaldi x-vector recipe style) and
``dataset.SpkTrainDataset`` applies ``spec_augment`` online to the training crops. With
``augment.mode: online`` there are no copies: ``svlab.online_augment`` applies the same chain to each
training crop's waveform as it is drawn, with real noise / impulse responses when given
(``mix_at_snr``, ``apply_rir``).

Note on gain: with per-utterance mean normalisation (``features.mean_norm``, the default) a constant
gain only shifts c0 by a constant that the normalisation removes, so ``gain`` changes the waveform but
the features hardly at all; it matters for un-normalised features, whose c0 carries the level.
"""
from __future__ import annotations

import copy
import functools
from fractions import Fraction

import numpy as np
from scipy import signal

from svlab.config import NOISE_TYPES, load_config

#: Bumped whenever the output of the augmentation code changes for the same settings and seed (part of
#: the augmented-feature cache key, so old caches are not reused).
AUGMENT_VERSION = 1


#: Keys that decide the offline copies (and hence the cache); the SpecAugment keys act online only.
OFFLINE_KEYS = ("copies", "seed", "noise_prob", "noise_types", "snr_db", "reverb_prob", "rt60", "gain_prob",
                "gain_db", "speed_prob", "speed_factors", "speed_as_new_speakers")

# Kellet's "pink" filter: -3 dB/octave within ~0.5 % from 10 Hz to ~20 kHz at 44.1 kHz (close enough
# over the 16 kHz speech band).
_PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
_PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])


@functools.lru_cache(maxsize=1)
def _shipped_settings() -> dict:
    """The ``augment:`` section of the shipped ``config.yaml``, read once."""
    return load_config()["augment"]


def settings(cfg_augment: dict | None) -> dict:
    """``cfg_augment`` (the ``augment:`` config section, possibly partial) completed with the shipped
    ``config.yaml``'s values, so that the functions here can be called with partial dicts."""
    out = copy.deepcopy(_shipped_settings())
    out.update(cfg_augment or {})
    if out["mode"] == "online":  # each crop is augmented as it is drawn (svlab.online_augment): no copies
        out["copies"] = 0
    return out


def offline_signature(cfg_augment: dict | None) -> dict:
    """The settings the offline copies depend on (plus ``AUGMENT_VERSION``): the augmented-cache key."""
    s = settings(cfg_augment)
    sig = {k: s[k] for k in OFFLINE_KEYS}
    for k in ("snr_db", "rt60", "gain_db", "speed_factors"):
        sig[k] = [float(v) for v in sig[k]]
    for k in ("noise_prob", "reverb_prob", "gain_prob", "speed_prob"):
        sig[k] = float(sig[k])
    sig["noise_types"] = [str(t) for t in sig["noise_types"]]
    sig["version"] = AUGMENT_VERSION
    return sig


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo if hi <= lo else float(rng.uniform(lo, hi))


def _power(x: np.ndarray) -> float:
    """Mean square (average power per sample) in float64."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x * x)) if x.size else 0.0


# --------------------------------------------------------------------------- noise
def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-variance Gaussian white noise (float64)."""
    return rng.standard_normal(n)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of 1/f ("pink", -3 dB/octave) noise: white noise through Kellet's IIR filter.

    The filter's start-up transient is skipped (1000 extra samples are filtered and dropped).
    Output float64, unit variance.
    """
    warm = 1000
    x = signal.lfilter(_PINK_B, _PINK_A, rng.standard_normal(n + warm))[warm:]
    return x / max(np.std(x), 1e-12)


def speech_shaped_noise(n: int, rng: np.random.Generator, sr: int = 16000, talkers: int = 4) -> np.ndarray:
    """``n`` samples of babble-like noise without any speech at hand (float64, unit variance).

    Each of ``talkers`` virtual talkers is white noise shaped like the long-term speech spectrum
    (2nd-order high-pass at 100 Hz, -6 dB/octave above 500 Hz, 4th-order low-pass at 0.4 * sr, at most
    6 kHz) and amplitude-modulated at syllable rate (|low-pass-filtered noise| below 5 Hz); the talkers
    are summed.
    """
    hp = signal.butter(2, 100, "highpass", fs=sr, output="sos")
    tilt = signal.butter(1, 500, "lowpass", fs=sr, output="sos")
    lp = signal.butter(4, min(6000.0, 0.4 * sr), "lowpass", fs=sr, output="sos")
    env_lp = signal.butter(2, 5, "lowpass", fs=sr, output="sos")
    out = np.zeros(n)
    for _ in range(max(1, talkers)):
        x = signal.sosfilt(lp, signal.sosfilt(tilt, signal.sosfilt(hp, rng.standard_normal(n))))
        env = np.abs(signal.sosfilt(env_lp, rng.standard_normal(n + sr))[sr:])  # skip 1 s of start-up
        env /= max(env.mean(), 1e-12)
        out += x / max(np.std(x), 1e-12) * (0.2 + env)
    return out / max(np.std(out), 1e-12)


def babble_noise(n: int, rng: np.random.Generator, others: list[np.ndarray] | None, n_talkers=(3, 6),
                 sr: int = 16000) -> np.ndarray:
    """``n`` samples of babble (float64, unit variance): the sum of 3-6 (``n_talkers`` range) of the
    waveforms in ``others`` (other training utterances, same ``sr``), each looped to ``n`` samples from
    a random offset and scaled to unit RMS. Without usable ``others``: ``speech_shaped_noise``.
    """
    usable = [np.asarray(o, np.float64) for o in (others or []) if np.size(o) and _power(o) > 0]
    k = int(rng.integers(int(n_talkers[0]), int(n_talkers[1]) + 1))
    if not usable:
        return speech_shaped_noise(n, rng, sr, talkers=k)
    picks = rng.choice(len(usable), size=min(k, len(usable)), replace=False)
    out = np.zeros(n)
    for j in picks:
        o = usable[int(j)]
        start = int(rng.integers(0, o.size))
        idx = (start + np.arange(n)) % o.size
        seg = o[idx]
        out += seg / max(np.sqrt(_power(seg)), 1e-12)
    return out / max(np.std(out), 1e-12)


def add_noise(wav: np.ndarray, rng: np.random.Generator, snr_db_range=(5, 20), kinds=NOISE_TYPES,
              others: list[np.ndarray] | None = None, sr: int = 16000) -> np.ndarray:
    """``wav`` plus noise at a random SNR.

    wav: 1-D waveform (n samples). snr_db_range: ``(lo, hi)`` in dB, drawn uniformly; the SNR is
    10 log10(mean(wav^2) / mean(noise^2)) over the whole utterance and is met exactly (up to float32
    rounding). kinds: noise types to draw from uniformly: ``white``, ``pink`` (1/f), ``babble``
    (other utterances ``others``, 1-D waveforms at ``sr``, else speech-shaped noise).
    Returns float32 (n,). A silent ``wav`` is returned unchanged.
    """
    wav = np.asarray(wav)
    n = wav.size
    kinds = [k for k in kinds] or ["white"]
    bad = [k for k in kinds if k not in NOISE_TYPES]
    if bad:
        raise ValueError(f"unknown noise type(s) {bad}; use {', '.join(NOISE_TYPES)}")
    kind = kinds[int(rng.integers(0, len(kinds)))]
    target = _uniform(rng, snr_db_range)
    p_sig = _power(wav)
    if n == 0 or p_sig == 0.0:
        return wav.astype(np.float32)
    if kind == "white":
        noise = white_noise(n, rng)
    elif kind == "pink":
        noise = pink_noise(n, rng)
    else:
        noise = babble_noise(n, rng, others, sr=sr)
    return mix_at_snr(wav, noise, target)


def mix_at_snr(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wav`` plus ``noise`` (same length) scaled so that 10 log10(mean(wav^2) / mean(noise^2)) is
    ``snr_db`` exactly (up to float32 rounding). Returns float32; a silent ``wav`` comes back unchanged.
    ``add_noise`` mixes its generated noise with it, ``svlab.online_augment`` real noise files."""
    wav = np.asarray(wav)
    p_sig = _power(wav)
    if wav.size == 0 or p_sig == 0.0:
        return wav.astype(np.float32)
    scale = np.sqrt(p_sig / (max(_power(noise), 1e-30) * 10.0 ** (snr_db / 10.0)))
    return (wav.astype(np.float64) + scale * np.asarray(noise, np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- reverberation
def synth_rir(rng: np.random.Generator, rt60: float, sr: int = 16000, drr_db_range=(-3, 10),
              n_early=(4, 10), early_ms: float = 50.0) -> np.ndarray:
    """Synthetic room impulse response (float64, ``ceil(1.2 * rt60 * sr) + 1`` samples, -72 dB at the end).

    rt60: reverberation time in seconds (the energy decays 60 dB in ``rt60``). Made of a direct path
    (a unit impulse at sample 0), 4-10 (``n_early``) early reflections (sparse impulses of random sign
    between 2.5 ms and ``early_ms``) and a late diffuse tail (Gaussian noise from 2.5 ms on), all under
    the envelope exp(-3 ln(10) t / rt60); the reverberant part is scaled to a direct-to-reverberant
    energy ratio drawn from ``drr_db_range`` (dB).
    """
    if rt60 <= 0:
        raise ValueError(f"rt60 must be positive, got {rt60}")
    n = int(np.ceil(1.2 * rt60 * sr)) + 1
    t = np.arange(n) / sr
    env = np.exp(-3.0 * np.log(10.0) / rt60 * t)
    onset = max(1, int(round(0.0025 * sr)))
    rev = rng.standard_normal(n) * env
    rev[:onset] = 0.0
    k = int(rng.integers(int(n_early[0]), int(n_early[1]) + 1))
    last = max(onset + 1, min(n, int(early_ms / 1000.0 * sr)))
    delays = rng.integers(onset, last, size=k)
    amps = rng.uniform(2.0, 5.0, size=k) * rng.choice([-1.0, 1.0], size=k)
    np.add.at(rev, delays, amps * env[delays])
    drr = _uniform(rng, drr_db_range)
    rev *= np.sqrt(1.0 / (max(np.sum(rev * rev), 1e-30) * 10.0 ** (drr / 10.0)))
    rev[0] = 1.0
    return rev


def reverberate(wav: np.ndarray, rng: np.random.Generator, rt60_range=(0.2, 0.8), sr: int = 16000) -> np.ndarray:
    """``wav`` in a synthetic room: convolved (``scipy.signal.fftconvolve``) with ``synth_rir`` of an RT60
    (seconds) drawn from ``rt60_range``.

    wav: 1-D waveform (n samples at ``sr``). Returns float32 (n,): the first n samples of the
    convolution (the direct path is at delay 0, so the speech stays aligned), rescaled to the RMS of
    ``wav`` (same level).
    """
    return apply_rir(wav, synth_rir(rng, _uniform(rng, rt60_range), sr))


def apply_rir(wav: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``wav`` convolved with the impulse response ``rir`` (``scipy.signal.fftconvolve``): the first
    ``len(wav)`` samples (a direct path at delay 0 keeps the speech aligned: ``svlab.online_augment`` cuts
    a measured RIR to start at its peak), rescaled to the RMS of ``wav``. Returns float32."""
    wav = np.asarray(wav)
    n = wav.size
    if n == 0:
        return wav.astype(np.float32)
    out = signal.fftconvolve(wav.astype(np.float64), np.asarray(rir, np.float64))[:n]
    p_in, p_out = _power(wav), _power(out)
    if p_out > 0:
        out *= np.sqrt(p_in / p_out)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- speed and gain
def _ratio(factor: float) -> tuple[int, int]:
    """``(up, down)`` for ``resample_poly`` so that the output is 1/factor times as long."""
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    f = Fraction(float(factor)).limit_denominator(100)
    return f.denominator, f.numerator


def change_speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """``wav`` played ``factor`` times as fast (pitch and formants move with it, like sox ``speed``):
    resampled with ``scipy.signal.resample_poly`` by 1/factor (factor as a fraction with denominator
    <= 100). wav: 1-D waveform (n samples). Returns float32 of ``ceil(n / factor)`` samples.
    Note: this changes the voice; Kaldi treats 0.9x/1.1x copies as new speakers.
    """
    wav = np.asarray(wav)
    if float(factor) == 1.0:
        return wav.astype(np.float32)
    up, down = _ratio(factor)
    return signal.resample_poly(wav.astype(np.float64), up, down).astype(np.float32)


def speed_perturb(wav: np.ndarray, rng: np.random.Generator, factors=(0.9, 1.0, 1.1)) -> np.ndarray:
    """``change_speed`` by a factor drawn uniformly from ``factors`` (1.0: unchanged).

    wav: 1-D waveform (n samples). Returns float32 of ``ceil(n / factor)`` samples (0.9: longer,
    1.1: shorter).
    """
    factors = list(factors) or [1.0]
    return change_speed(wav, float(factors[int(rng.integers(0, len(factors)))]))


def gain(wav: np.ndarray, rng: np.random.Generator, db_range=(-6, 6)) -> np.ndarray:
    """``wav`` scaled by a gain drawn from ``db_range`` (amplitude dB: x 10^(g/20)); no clipping.
    wav: 1-D waveform (n samples). Returns float32 (n,)."""
    g = _uniform(rng, db_range)
    return (np.asarray(wav, np.float64) * 10.0 ** (g / 20.0)).astype(np.float32)


# --------------------------------------------------------------------------- features
def _disjoint_ranges(rng: np.random.Generator, size: int, count: int, max_width: int) -> list[tuple[int, int]]:
    """``count`` ranges ``(start, stop)`` within ``range(size)`` of widths 1..max_width, separated by at
    least one untouched index (so they stay ``count`` distinct ranges); fewer/narrower when ``size``
    cannot hold them."""
    count = max(0, min(int(count), (size + 1) // 2))
    if count == 0 or max_width < 1:
        return []
    widths = rng.integers(1, int(max_width) + 1, size=count)
    while widths.sum() + count - 1 > size:  # shrink the widest until they fit
        widths[int(np.argmax(widths))] -= 1
    free = size - int(widths.sum()) - (count - 1)
    cuts = np.sort(rng.integers(0, free + 1, size=count))  # spare room before each range
    out, pos, used = [], 0, 0
    for j in range(count):
        start = pos + int(cuts[j]) - used
        out.append((start, start + int(widths[j])))
        pos, used = start + int(widths[j]) + 1, int(cuts[j])
    return out


def spec_augment_masks(n_coeffs: int, n_frames: int, rng: np.random.Generator, n_time_masks: int,
                       max_time: int, n_freq_masks: int, max_freq: int) -> dict:
    """The ranges ``spec_augment`` masks in an ``(n_coeffs, n_frames)`` array, drawn from ``rng``:
    ``{"time": [(start, stop), ...], "freq": [...]}`` (stop exclusive; see ``spec_augment``)."""
    freq = _disjoint_ranges(rng, n_coeffs, n_freq_masks, max_freq)
    time = _disjoint_ranges(rng, n_frames, n_time_masks, max_time)
    return {"time": time, "freq": freq}


def spec_augment(feat: np.ndarray, rng: np.random.Generator, n_time_masks: int = 1, max_time: int = 10,
                 n_freq_masks: int = 1, max_freq: int = 4) -> np.ndarray:
    """SpecAugment-style masks on an MFCC array.

    feat: ``(n_mfcc, frames)`` array (a training crop). ``n_time_masks`` ranges of 1..``max_time``
    frames and ``n_freq_masks`` ranges of 1..``max_freq`` MFCC coefficients (rows) are replaced by each
    coefficient's mean over the crop: masked frames carry no detail but the crop's average spectrum,
    and a masked coefficient keeps its level. (With per-utterance mean normalisation that mean is
    about 0, the usual zero mask; without it, 0 would be a value no real frame has, c0 being the log
    energy.) The ranges of one kind never overlap or touch (``spec_augment_masks`` draws them). The
    input is not modified; returns a float32 copy.
    """
    out = np.array(feat, dtype=np.float32, copy=True)
    mean = out.mean(axis=1, keepdims=True)
    masks = spec_augment_masks(out.shape[0], out.shape[1], rng, n_time_masks, max_time, n_freq_masks, max_freq)
    for a, b in masks["freq"]:
        out[a:b, :] = mean[a:b]
    for a, b in masks["time"]:
        out[:, a:b] = mean
    return out


# --------------------------------------------------------------------------- chains
def choose_chain(rng: np.random.Generator, cfg_augment: dict | None) -> list[str]:
    """The operations of one augmented copy, in the order they are applied: a subset of
    ``speed, reverb, noise, gain``, each with its ``*_prob``. Speed is only used when
    ``speed_as_new_speakers`` is off (else the speed copies are separate speakers). If none of
    speed/reverb/noise was drawn, one of those with a positive probability is forced, so that a copy
    never differs from the clean utterance by gain alone (which mean-normalised MFCCs undo): so a
    gain-only chain needs the other probabilities set to 0."""
    s = settings(cfg_augment)
    probs = {"speed": 0.0 if s["speed_as_new_speakers"] else float(s["speed_prob"]),
             "reverb": float(s["reverb_prob"]), "noise": float(s["noise_prob"]) if s["noise_types"] else 0.0,
             "gain": float(s["gain_prob"])}
    chosen = {op for op in ("speed", "reverb", "noise", "gain") if rng.random() < probs[op]}
    if not chosen & {"speed", "reverb", "noise"}:
        able = [op for op in ("speed", "reverb", "noise") if probs[op] > 0]
        if able:
            chosen.add(able[int(rng.integers(0, len(able)))])
    return [op for op in ("speed", "reverb", "noise", "gain") if op in chosen]


def augment_waveform(wav: np.ndarray, rng: np.random.Generator, cfg_augment: dict | None,
                     others: list[np.ndarray] | None = None, sr: int = 16000) -> np.ndarray:
    """One randomly augmented copy of ``wav`` per the ``augment:`` config section (``choose_chain``).

    wav: 1-D waveform at ``sr``; others: other training utterances for babble noise (1-D, same ``sr``).
    Returns float32; the length is ``len(wav)`` unless speed perturbation was drawn.
    """
    s = settings(cfg_augment)
    out = np.asarray(wav, dtype=np.float32)
    for op in choose_chain(rng, s):
        if op == "speed":
            out = speed_perturb(out, rng, s["speed_factors"])
        elif op == "reverb":
            out = reverberate(out, rng, s["rt60"], sr)
        elif op == "noise":
            out = add_noise(out, rng, s["snr_db"], s["noise_types"], others=others, sr=sr)
        else:
            out = gain(out, rng, s["gain_db"])
    return out

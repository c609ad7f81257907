"""The embedded demo corpus: synthetic multi-speaker speech, generated on first use.

AISHELL-1 cannot be downloaded everywhere, so the project synthesises its own corpus (numpy/scipy
only) in the AISHELL-like layout ``ROOT/SXXXX/SXXXXWNNNN.wav`` with the lab's manifests and trials.

Source-filter synthesis. Each *speaker* has fixed traits: mean pitch and pitch range, vocal-tract
length (scales all formants), personal formant offsets and bandwidths, glottal spectral tilt,
breathiness, jitter and a personal high-frequency resonance. Each *utterance* has new content (a
random sequence of vowels, fricatives and pauses with its own timing and intonation) and a new
channel (random equaliser, band limits, gain) and additive noise at a random SNR. So speaker
identity is learnable but not trivially readable from average spectra: a model must learn to ignore
content and channel.

train.py and EER.py call ``ensure_demo_corpus`` and generate it when the configured root is the demo
corpus folder; ``python tools/demo_corpus.py`` generates it by hand (``--files files`` also restores the
demo's manifests in ``files/``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from svlab.config import PROJECT_ROOT, resolve_path
from svlab.corpora import TEST_NAME, TRAIN_NAME, TRIALS_NAME
from svlab.errors import FileWriteError
from svlab.files import atomic_write
from svlab.process_pool import run_jobs

SR = 16000
DEMO_ROOT = PROJECT_ROOT / "data" / "demo_corpus"
VERSION = 5
DEFAULTS = dict(n_train_speakers=200, n_test_speakers=20, utts_per_speaker=5, test_utts_per_speaker=10,
                seed=20240901, min_seconds=4.0, max_seconds=7.0, n_vowels=4)

# Average adult-male formants F1-F4 (Hz) of ten vowels (Peterson & Barney 1952 / Hillenbrand 1995).
# Ordered so that any prefix spans the vowel space: i, a, u, e, o, ae, I, U, ^, er.
VOWELS = np.array([
    [270, 2290, 3010, 3500], [730, 1090, 2440, 3300], [300, 870, 2240, 3300], [530, 1840, 2480, 3500],
    [570, 840, 2410, 3350], [660, 1720, 2410, 3400], [390, 1990, 2550, 3450], [440, 1020, 2240, 3300],
    [640, 1190, 2390, 3400], [490, 1350, 1690, 3300],
], dtype=np.float64)
BASE_BANDWIDTHS = np.array([60.0, 90.0, 120.0, 180.0, 250.0])


def speaker_traits(rng: np.random.Generator) -> dict:
    female = rng.random() < 0.5
    vtl = rng.uniform(1.08, 1.28) if female else rng.uniform(0.86, 1.06)   # formant scale factor
    return dict(
        f0=float(rng.uniform(165, 255) if female else rng.uniform(85, 150)),
        f0_range=float(rng.uniform(0.05, 0.20)),
        vtl=float(vtl),
        formant_offsets=np.exp(rng.normal(0.0, 0.18, 4)).tolist(),
        vowel_offsets=np.exp(rng.normal(0.0, 0.12, VOWELS.shape)).tolist(),   # personal vowel "accent"
        bandwidth_scale=float(rng.uniform(0.7, 1.6)),
        tilt=float(rng.uniform(0.80, 0.97)),
        breathiness=float(rng.uniform(0.01, 0.25)),
        jitter=float(rng.uniform(0.002, 0.02)),
        f5=float(rng.uniform(3800, 5200) * vtl),
        rate=float(rng.uniform(0.8, 1.25)),
    )


def _resonator(freq: float, bw: float) -> np.ndarray:
    r = np.exp(-np.pi * bw / SR)
    return np.array([1.0, -2.0 * r * np.cos(2 * np.pi * freq / SR), r * r])


def _glottal_source(f0: np.ndarray, jitter: float, rng) -> np.ndarray:
    """Pulse train following the per-sample pitch ``f0`` with cycle-to-cycle jitter."""
    phase = np.cumsum(f0 / SR)
    pulses = np.zeros_like(f0)
    idx = np.nonzero(np.diff(np.floor(phase)) > 0)[0] + 1
    if idx.size:
        shift = np.clip(np.round(rng.normal(0, jitter * SR / np.maximum(f0[idx], 1.0))), -20, 20).astype(int)
        pulses[np.clip(idx + shift, 0, f0.size - 1)] = 1.0
    return pulses


def synthesize(traits: dict, rng: np.random.Generator, seconds: float, n_vowels: int = len(VOWELS)) -> np.ndarray:
    """One utterance (float32, peak-normalised) of a speaker with ``traits``, its vowels drawn from the
    first ``n_vowels`` of ``VOWELS``."""
    n = int(seconds * SR)
    # Content: segments of vowels (V), fricatives (F) and pauses (P).
    bounds, kinds, t = [0], [], 0
    while t < n:
        kind = rng.choice(["V", "V", "V", "F", "P"]) if kinds else "P"
        dur = {"V": rng.uniform(0.07, 0.22), "F": rng.uniform(0.05, 0.14), "P": rng.uniform(0.03, 0.15)}[kind]
        t = min(n, t + int(dur * SR / traits["rate"]))
        bounds.append(t)
        kinds.append(kind)
    # Intonation: declination plus slow random movement around the speaker's mean pitch.
    knots = rng.normal(0.0, traits["f0_range"], 6)
    contour = np.interp(np.linspace(0, 5, n), np.arange(6), knots) - 0.1 * np.linspace(0, 1, n)
    f0 = traits["f0"] * np.exp(rng.normal(0, 0.03)) * np.exp(contour)
    source = _glottal_source(f0, traits["jitter"], rng)
    b_tilt, a_tilt = [1.0], [1.0, -2 * traits["tilt"], traits["tilt"] ** 2]
    source = signal.lfilter(b_tilt, a_tilt, source)
    source /= np.std(source) + 1e-9
    source += traits["breathiness"] * 3.0 * rng.standard_normal(n)

    out = np.zeros(n)
    zi = np.zeros(10)
    bw = BASE_BANDWIDTHS * traits["bandwidth_scale"]
    offsets = np.asarray(traits["formant_offsets"])
    for (a, b), kind in zip(zip(bounds[:-1], bounds[1:]), kinds):
        if b <= a:
            continue
        seg_len = b - a
        ramp = np.minimum(1.0, np.minimum(np.arange(seg_len), np.arange(seg_len)[::-1]) / (0.01 * SR))
        if kind == "V":
            v = rng.integers(n_vowels)
            formants = (VOWELS[v] * np.asarray(traits["vowel_offsets"][v]) * traits["vtl"] * offsets
                        * np.exp(rng.normal(0, 0.02, 4)))
            freqs = np.append(formants, traits["f5"])
            den = np.array([1.0])
            for f, w in zip(freqs, bw):
                den = np.convolve(den, _resonator(min(f, SR / 2 - 200), w))
            seg, zi = signal.lfilter([1.0], den, source[a:b], zi=zi)
            out[a:b] = seg * ramp * rng.uniform(0.6, 1.0)
        elif kind == "F":
            centre = rng.uniform(2500, 6500) * np.sqrt(traits["vtl"])
            sos = signal.butter(2, [centre * 0.7, min(centre * 1.3, SR / 2 - 100)], btype="band", fs=SR, output="sos")
            noise = signal.sosfilt(sos, rng.standard_normal(seg_len))
            out[a:b] = noise / (np.std(noise) + 1e-9) * ramp * rng.uniform(0.05, 0.3) * np.std(out[:a] if a else 1.0)
            zi = zi * 0.0
        else:
            zi = zi * 0.0
    out /= np.max(np.abs(out)) + 1e-9
    return _channel(out, rng)


def _peaking(fc: float, gain_db: float, q: float) -> np.ndarray:
    """RBJ audio-EQ-cookbook peaking filter as one second-order section."""
    amp = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * fc / SR
    alpha = np.sin(w0) / (2 * q)
    b = np.array([1 + alpha * amp, -2 * np.cos(w0), 1 - alpha * amp])
    a = np.array([1 + alpha / amp, -2 * np.cos(w0), 1 - alpha / amp])
    return np.concatenate([b / a[0], a / a[0]])


def _channel(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random microphone/room colouring, band limits, noise at a random SNR, random level."""
    sos = [_peaking(np.exp(rng.uniform(np.log(150), np.log(6500))), rng.uniform(-6, 6), rng.uniform(0.5, 2.0))
           for _ in range(2)]
    low = rng.uniform(40, 250)
    high = rng.uniform(5500, 7800)
    sos.append(signal.butter(2, [low, high], btype="band", fs=SR, output="sos")[0])
    sos.append(signal.butter(2, [low, high], btype="band", fs=SR, output="sos")[1])
    y = signal.sosfilt(np.array(sos), x)
    noise = rng.standard_normal(y.size)
    if rng.random() < 0.5:  # pink-ish noise
        noise = signal.lfilter([1.0], [1.0, -0.95], noise)
    snr_db = rng.uniform(20, 40)
    noise *= np.sqrt(np.mean(y ** 2) / (np.mean(noise ** 2) * 10 ** (snr_db / 10)))
    y = y + noise
    return (y / (np.max(np.abs(y)) + 1e-9) * rng.uniform(0.3, 0.9)).astype(np.float32)


def _plan(params: dict) -> list[tuple[str, str, int, int]]:
    """(speaker, relpath, speaker index, utterance index) for every file, train speakers first."""
    n_train = params["n_train_speakers"]
    n_spk = n_train + params["n_test_speakers"]
    test_utts = params.get("test_utts_per_speaker") or params["utts_per_speaker"]
    rows = []
    for s in range(n_spk):
        spk = f"S{s + 1:04d}"
        for u in range(params["utts_per_speaker"] if s < n_train else test_utts):
            rows.append((spk, f"{spk}/{spk}W{u + 1:04d}.wav", s, u))
    return rows


def _generate_one(args) -> None:
    root, rel, s, u, params = args
    seed = params["seed"]
    traits = speaker_traits(np.random.default_rng((seed, s)))
    rng = np.random.default_rng((seed, s, u + 1))
    seconds = rng.uniform(params["min_seconds"], params["max_seconds"])
    wav = synthesize(traits, rng, seconds, params.get("n_vowels", len(VOWELS)))
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.wav")
    sf.write(str(tmp), wav, SR, subtype="PCM_16")
    os.replace(tmp, path)


def manifests(params: dict) -> dict[str, list[str]]:
    """Lines of ``split_train_set.txt``, ``test_set.txt`` and ``trials.txt`` (all test pairs)."""
    rows = _plan(params)
    n_train = params["n_train_speakers"]
    train = [f"{spk} {rel}" for spk, rel, s, _ in rows if s < n_train]
    test_rows = [(spk, rel) for spk, rel, s, _ in rows if s >= n_train]
    test = [f"{spk} {rel}" for spk, rel in test_rows]
    trials = [f"{a[1]} {b[1]} {int(a[0] == b[0])}"
              for i, a in enumerate(test_rows) for b in test_rows[i + 1:]]
    return {TRAIN_NAME: train, TEST_NAME: test, TRIALS_NAME: trials}


def _params_hash(params: dict) -> str:
    return hashlib.sha1(json.dumps({**params, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the main process's to handle (it stops the pool at once)."""
    import signal as process_signals  # (``signal`` here is scipy's)
    process_signals.signal(process_signals.SIGINT, process_signals.SIG_IGN)


def generate(root: Path, params: dict | None = None, files_dir: Path | None = None,
             workers: int | None = None, log=print) -> None:
    """Write the corpus under ``root`` (and its manifests into ``files_dir`` when given)."""
    params = {**DEFAULTS, **(params or {})}
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileWriteError(f"cannot create the demo corpus folder {root}: {e.strerror or e}; "
                             "choose a folder you can write to") from None
    jobs = [(str(root), rel, s, u, params) for _, rel, s, u in _plan(params)]
    # the workers keep their BLAS threads (the corpus must stay byte-identical) and stop at once on Ctrl-C
    run_jobs(_generate_one, jobs, workers or min(os.cpu_count() or 1, 8), "demo corpus",
             initializer=_ignore_sigint, what="demo corpus generation", chunksize=8)
    for name, lines in manifests(params).items():
        for folder in (root,) if files_dir is None else (root, Path(files_dir)):
            _write_text(folder / name, "\n".join(lines) + "\n")
    _write_text(root / "COMPLETE", json.dumps({**params, "hash": _params_hash(params)}, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def is_complete(root: Path, params: dict | None = None) -> bool:
    params = {**DEFAULTS, **(params or {})}
    marker = Path(root) / "COMPLETE"
    try:
        return json.loads(marker.read_text()).get("hash") == _params_hash(params)
    except (OSError, ValueError):
        return False


def ensure_demo_corpus(*roots: str | Path, log=print) -> None:
    """Generate the default demo corpus if any of ``roots`` is its folder and it is not complete."""
    for root in roots:
        if Path(resolve_path(root)).resolve() == DEMO_ROOT.resolve() and not is_complete(DEMO_ROOT):
            n = len(_plan(DEFAULTS))
            log(f"note: generating the embedded demo corpus ({n} utterances) in {DEMO_ROOT} (first use only)")
            generate(DEMO_ROOT, log=log)
            return


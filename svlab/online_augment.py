"""Online augmentation (``augment.mode: online``): each training crop is cut from the waveform and
augmented as it is drawn, in the DataLoader workers, instead of offline copies made once and cached.

Per crop (``OnlineCrops.crop``): the crop's samples are read from the file (only them: ``soundfile``
seeks), with probability ``augment.online_prob`` a chain of ``svlab.augment.choose_chain`` (speed ->
reverberation -> noise -> gain, the ``*_prob`` of the ``augment:`` section) is applied, and the features
of the crop are computed (``svlab.features.extract``, mean-normalised over the crop). Noise and
impulse responses:

- ``augment.noise_dir``: real noise. MUSAN's layout (subfolders ``noise/``, ``music/``, ``speech/``,
  searched recursively) draws one of the kinds present uniformly; ``speech`` is babble, the sum of 3-7
  speech files (Kaldi's and WeSpeaker's recipe); any other folder of WAV/FLAC files is all ``noise``. A
  random window of the file, looped when shorter than the crop, is mixed at an SNR from
  ``augment.snr_db`` (``svlab.augment.mix_at_snr``). Empty: the synthetic ``augment.noise_types``
  (``svlab.augment.add_noise``; babble is then speech-shaped noise: no other utterances are held in memory).
- ``augment.rir_dir``: a folder of measured/simulated impulse responses (WAV/FLAC, e.g. RIRS_NOISES),
  one drawn per reverberated crop, cut to start at its peak (``svlab.augment.apply_rir``). Empty: a
  synthetic room of an RT60 from ``augment.rt60`` (``svlab.augment.reverberate``).
- speed: a factor of ``augment.speed_factors`` (same speaker label; with ``speed_as_new_speakers`` the
  new-speaker items are read at their own factor always).

The folders are indexed once (``index_audio``: every file's length from its header; an unreadable
file, or a folder without audio, is one ``DataError`` naming it, before training, never inside a
worker). Every draw comes from the generator ``dataset.SpkTrainDataset`` seeds with
``(train.seed, epoch, item)``: a run is reproducible and gives the same crops with any
``train.num_workers`` (no per-worker state at all). Costs per epoch: ``docs/large_corpora.md``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from svlab import augment
from svlab.audio import one_line, split_range
from svlab.config import config_path_value, key_source
from svlab.errors import DataError
from svlab.features import extract, repeat_to
from svlab.text import printable

AUDIO_SUFFIXES = (".wav", ".flac")
MUSAN_KINDS = ("noise", "music", "speech")
BABBLE_TALKERS = (3, 7)      # speech files summed into one babble noise (Kaldi's MUSAN recipe)


@dataclass(frozen=True)
class Clip:
    """One audio file of a noise / RIR folder: its path, samples and rate (from its header)."""
    path: str
    frames: int
    rate: int


def index_audio(folder: Path, key: str, source: str | None = None) -> list[Clip]:
    """Every WAV/FLAC file under ``folder`` (recursively, sorted), with its length from the header.
    A missing folder, one without audio, and unreadable files are one ``DataError`` naming ``key``."""
    where = f"{key}{f' (set in {source})' if source else ''}"
    if not folder.is_dir():
        raise DataError(f"{where} = {printable(folder)} is not a folder; point it at a folder of WAV/FLAC files "
                        "or set it to '' for synthetic ones")
    clips, bad = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(AUDIO_SUFFIXES):
                continue
            path = os.path.join(dirpath, name)
            try:
                info = sf.info(path)
                if info.frames <= 0 or info.samplerate <= 0:
                    raise ValueError("no samples")
                clips.append(Clip(path, int(info.frames), int(info.samplerate)))
            except Exception:  # soundfile's errors for a damaged file: named here, never a worker traceback
                bad.append(printable(path))
    if bad:
        raise DataError(f"{where}: {len(bad)} file(s) are not readable WAV/FLAC audio: {'; '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}; remove or fix them")
    if not clips:
        raise DataError(f"{where} = {printable(folder)} holds no WAV/FLAC files; point it at the noise / impulse "
                        "responses, or set it to '' for synthetic ones")
    return clips


def noise_bank(folder: Path, key: str = "augment.noise_dir", source: str | None = None) -> dict[str, list[Clip]]:
    """``{kind: clips}``: MUSAN's ``noise``/``music``/``speech`` subfolders that hold audio, else all the
    folder's files as ``noise``."""
    kinds = {k: folder / k for k in MUSAN_KINDS if (folder / k).is_dir()}
    if not kinds:
        return {"noise": index_audio(folder, key, source)}
    return {k: index_audio(sub, key, source) for k, sub in kinds.items()}


def read_window(path, first: int, n: int, rate: int) -> np.ndarray:
    """``n`` samples at ``rate`` Hz of a (possibly ``#t=``-ranged, ``svlab.audio.split_range``) audio
    path from sample ``first`` of its range, looping back to the range's start where it ends; mono
    float32. Only the samples needed are read (resampled when the file has another rate)."""
    file, start_s, end_s = split_range(path)
    with sf.SoundFile(str(file)) as f:
        sr = int(f.samplerate)
        lo = int(round(start_s * sr))
        hi = int(f.frames) if end_s is None else min(int(f.frames), int(round(end_s * sr)))
        length = max(1, hi - lo)
        want = n if sr == rate else int(math.ceil(n * sr / rate)) + 1
        first = int(round(first * sr / rate)) % length if sr != rate else first % length
        parts, pos, left = [], first, want
        while left > 0:
            take = min(left, length - pos)
            f.seek(lo + pos)
            block = f.read(take, dtype="float32", always_2d=True)
            if len(block) == 0:
                break
            parts.append(block.mean(axis=1))
            left -= len(block)
            pos = 0
    wav = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if sr != rate and wav.size:
        from scipy.signal import resample_poly
        g = math.gcd(sr, rate)
        wav = resample_poly(wav.astype(np.float64), rate // g, sr // g).astype(np.float32)
    if wav.size < n:
        wav = np.resize(wav, n) if wav.size else np.zeros(n, np.float32)
    return wav[:n]


class OnlineCrops:
    """The augmented crops of a training set (``augment.mode: online``); see the module docstring.

    ``crop(dataset, i, start, rng)`` gives the ``(n_features, crop_frames)`` float32 features of item ``i``
    of ``dataset`` (``dataset.SpkTrainDataset``: its ``utterances`` and ``speeds``, whatever validation
    held apart) starting at frame ``start`` of the item's features, drawing from ``rng``."""

    def __init__(self, opts: dict, log=print):
        self.aug = augment.settings(opts.get("augment"))
        self.feat_cfg = opts["features"]
        self.root = config_path_value(opts, "data.root")
        self.crop_frames = int(opts["train"]["crop_frames"])
        self.rate = int(self.feat_cfg["sample_rate"])
        self.hop = int(round(self.rate * self.feat_cfg["hop_length_ms"] / 1000))
        self.noise = self.rirs = None
        if self.aug["noise_dir"]:
            self.noise = noise_bank(config_path_value(opts, "augment.noise_dir"), "augment.noise_dir",
                                    key_source(opts, "augment.noise_dir"))
        if self.aug["rir_dir"]:
            self.rirs = index_audio(config_path_value(opts, "augment.rir_dir"), "augment.rir_dir",
                                    key_source(opts, "augment.rir_dir"))
        noise = (", ".join(f"{k} ({len(v)} files)" for k, v in self.noise.items()) if self.noise
                 else f"synthetic {'/'.join(self.aug['noise_types'])}")
        rirs = f"{len(self.rirs)} impulse responses" if self.rirs else "synthetic rooms"
        log(f"augmentation: online, {self.aug['online_prob']:.0%} of the crops: noise {noise}, reverberation "
            f"{rirs}" + (", speed" if self.aug["speed_prob"] > 0 else "")
            + (", SpecAugment on crops" if self.aug["spec_augment"] else ""))

    def samples(self) -> int:
        """Samples of a crop: ``crop_frames`` centred frames need ``(crop_frames - 1) * hop + 1``."""
        return (self.crop_frames - 1) * self.hop + 1

    def crop(self, dataset, i: int, start: int, rng: np.random.Generator) -> np.ndarray:
        u = dataset.utterances[i]
        item_speed = float(dataset.speeds[i]) if dataset.speeds is not None else 1.0
        chain = augment.choose_chain(rng, self.aug) if rng.random() < self.aug["online_prob"] else []
        factor = item_speed
        if "speed" in chain:
            factors = list(self.aug["speed_factors"]) or [1.0]
            factor *= float(factors[int(rng.integers(0, len(factors)))])
        n = self.samples()
        first = int(round(start * self.hop * item_speed))  # ``start`` counts frames of the item's (sped) features
        wav = self._window(u.path(self.root), first, int(math.ceil(n * factor)) + 1)
        if factor != 1.0:
            wav = augment.change_speed(wav, factor)
        wav = np.resize(wav, n) if wav.size < n else wav[:n]
        for op in chain:
            if op == "reverb":
                wav = self._reverb(wav, rng)
            elif op == "noise":
                wav = self._noise(wav, rng)
            elif op == "gain":
                wav = augment.gain(wav, rng, self.aug["gain_db"])
        feats = extract(wav, self.feat_cfg)
        return np.ascontiguousarray(repeat_to(feats, self.crop_frames)[:, :self.crop_frames], dtype=np.float32)

    def _window(self, path, first: int, n: int) -> np.ndarray:
        """``read_window`` at the feature rate; a file that became unreadable since it was indexed is
        one ``DataError`` line naming it, not a traceback from inside a worker."""
        try:
            return read_window(path, first, n, self.rate)
        except Exception as e:
            raise DataError(f"{printable(path)}: cannot be read for an online-augmented crop ({one_line(e, 120)}); "
                            "was it moved or changed during training?") from None

    def _reverb(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.rirs:
            return augment.reverberate(wav, rng, self.aug["rt60"], self.rate)
        clip = self.rirs[int(rng.integers(0, len(self.rirs)))]
        rir = self._window(clip.path, 0, int(math.ceil(clip.frames * self.rate / clip.rate)))
        return augment.apply_rir(wav, rir[int(np.argmax(np.abs(rir))):])

    def _noise(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.noise:
            return augment.add_noise(wav, rng, self.aug["snr_db"], self.aug["noise_types"], sr=self.rate)
        kinds = sorted(self.noise)
        kind = kinds[int(rng.integers(0, len(kinds)))]
        clips = self.noise[kind]
        talkers = int(rng.integers(BABBLE_TALKERS[0], BABBLE_TALKERS[1] + 1)) if kind == "speech" else 1
        noise = np.zeros(wav.size)
        for j in rng.choice(len(clips), size=min(talkers, len(clips)), replace=False):
            clip = clips[int(j)]
            first = int(rng.integers(0, max(1, int(clip.frames * self.rate / clip.rate))))
            x = self._window(clip.path, first, wav.size).astype(np.float64)
            noise += x / max(np.sqrt(np.mean(x * x)), 1e-12)
        return augment.mix_at_snr(wav, noise, float(rng.uniform(*self.aug["snr_db"])))


def for_training(opts: dict, log=print) -> OnlineCrops | None:
    """``OnlineCrops`` for ``augment.mode: online``, else None (crops are cut from stored features)."""
    if augment.settings(opts.get("augment"))["mode"] != "online":
        return None
    return OnlineCrops(opts, log)

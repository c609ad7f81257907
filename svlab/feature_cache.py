"""Features of many files at once: a process pool, npz caches on disk, and the training set's
augmented copies.

``load_features`` computes the MFCCs of a list of files once (in parallel) and keeps them in
``features.cache_dir``, so an epoch never re-reads audio. Unusable files are one problem line each:
one DataError lists them all, ending with the fix the caller names (``TRAINING_AUDIO_FIX``: the
manifest or ``data.bad_audio: skip``; ``AUDIO_FIX`` for files given on a command line), or they are
left out and returned (``skip``). Failures inside the process pool (``svlab.process_pool``) come back
as one-line problems or one DataError, never as worker tracebacks. Feature settings no audio can be
turned into MFCCs with are refused once, as settings (``check_settings``), before any file is read.

Cache files (``svlab.npz_cache``) carry a CRC-32 of every array; a truncated, bit-flipped or otherwise
unreadable one is named in one log line, deleted and computed again (never a ``zipfile.BadZipFile``
crash), and its array headers cannot make the reader allocate more than the file holds.

Augmentation (``augment:`` config section, off by default): ``load_training_features`` adds offline
augmented copies of the training utterances (``svlab.augment``: noise, reverberation, gain, speed),
made once with a fixed seed and cached next to the clean features under a key that includes the
augmentation settings. ``load_training_items`` gathers what ``dataset.SpkTrainDataset`` crops from.
Test utterances are never augmented.

On-disk store (``features.store``, on with a ``cache_dir``): the training features and their augmented
copies go into ``svlab.feature_store`` (Kaldi archives in shards, written as extracted, read a crop at a
time) instead of RAM; ``load_training_items`` then hands ``FeatureRef``s where it handed arrays.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from svlab import augment, feature_store, features
from svlab.audio import audio_file, conversion_note, one_line, read_audio
from svlab.config import config_path_value, feature_problems, resolve_path
from svlab.errors import ConfigError, DataError
from svlab.features import FEATURE_KEYS, extract, feature_dim, feature_signature, feature_type
from svlab.manifests import MAX_LISTED_PROBLEMS, Utterance, check_training_data
from svlab.npz_cache import Damaged as _Damaged, check_offsets as _check_offsets
from svlab.npz_cache import read_cache as _read_cache, write_npz as _write_npz
from svlab.process_pool import quiet_worker, run_jobs
from svlab.text import excerpt, printable


# --------------------------------------------------------------------------- clean features
# What an unusable file's message ends with: the fix depends on who asked for the file.
TRAINING_AUDIO_FIX = ("Fix or remove them from the manifest (data.train_manifest), or set data.bad_audio: skip to "
                      "leave them out of training")
TEST_AUDIO_FIX = ("Fix them, or remove them from the test manifest (test.test_manifest) and from the trial list "
                  "(test.trials)")
AUDIO_FIX = "Check each file (a readable WAV/FLAC recording of speech) or pass another one"


def check_settings(feat_cfg: dict) -> None:
    """Refuse, once and naming the settings, feature settings no audio file can be turned into features
    with (``svlab.config.feature_problems``, then a trial run on one second of noise), instead of one
    failure per audio file. Settings from a checkpoint reach here without ``load_config``'s checks."""
    problems = feature_problems(feat_cfg, strict=False)
    made = _front_end_name(feat_cfg)
    if problems:
        raise ConfigError(f"the feature settings cannot make {made}: "
                          + "; ".join(f"features.{k} {what}" for k, what in problems[:3]))
    sr = feat_cfg["sample_rate"]
    probe = 0.1 * np.random.default_rng(0).standard_normal(max(sr, feat_cfg["n_fft"])).astype(np.float32)
    try:
        feats = features.extract(probe, feat_cfg)  # the front end itself (tests replace the per-file ``extract``)
    except Exception as e:
        raise ConfigError(f"the feature settings ({_describe_settings(feat_cfg)}) cannot make {made} of any audio "
                          f"({type(e).__name__}: {one_line(e, 160)}); fix the features: section") from None
    if not np.all(np.isfinite(feats)):
        raise ConfigError(f"the feature settings ({_describe_settings(feat_cfg)}) give NaN/inf {made} for any audio; "
                          "fix the features: section")


# the settings each front end does not use, left out of its description
_UNUSED_SETTINGS = {"mfcc": ("n_fbank",), "fbank": ("n_mfcc", "n_mels")}


def _front_end_name(feat_cfg: dict) -> str:
    return "fbank features" if feature_type(feat_cfg) == "fbank" else "MFCCs"


def _describe_settings(feat_cfg: dict) -> str:
    """``sample_rate=16000, n_mfcc=40, ...``: the settings the configured front end uses (an fbank's
    starts with ``type='fbank'``)."""
    kind = feature_type(feat_cfg)
    skip = ("type", "mean_norm", *_UNUSED_SETTINGS.get(kind, ()))
    used = ", ".join(f"{k}={excerpt(repr(feat_cfg.get(k)), 20)}" for k in FEATURE_KEYS if k not in skip)
    return used if kind == "mfcc" else f"type={excerpt(repr(kind), 20)}, {used}"


def _extract_one(args) -> tuple[np.ndarray | None, str | None, tuple[int, int]]:
    """``(features or None, one-line problem or None, (original rate, channels))`` of one file.

    Runs in worker processes: every failure becomes a one-line problem naming the file, never a
    traceback from inside the pool.
    """
    path, feat_cfg = args
    try:
        wav, sr, channels = read_audio(path, feat_cfg["sample_rate"], feat_cfg.get("min_seconds", 0.0) or 0.0,
                                       feat_cfg.get("max_seconds"))
        feats = extract(wav, feat_cfg)
        if not np.all(np.isfinite(feats)):
            return None, f"{printable(path)}: features are not finite (NaN/inf MFCCs)", (sr, channels)
        return feats, None, (sr, channels)
    except DataError as e:
        return None, one_line(e, 400), (0, 0)
    except Exception as e:  # report any librosa failure as one line, never a worker traceback
        return None, f"{printable(path)}: feature extraction failed ({type(e).__name__}: {one_line(e, 120)})", (0, 0)


def _extract_all(paths: list[Path], feat_cfg: dict, workers: int | None = None, desc: str = "features"):
    """``(features or None per path, problems, (original rate, channels) per path)``."""
    if paths:
        check_settings(feat_cfg)
    jobs = [(Path(p), feat_cfg) for p in paths]
    results = run_jobs(_extract_one, jobs, workers, desc)
    feats = [r[0] for r in results]
    problems = [r[1] for r in results if r[1] is not None]
    infos = [r[2] for r in results]
    return feats, problems, infos


def extract_features(paths: list[Path], feat_cfg: dict, workers: int | None = None,
                     desc: str = "features") -> tuple[list[np.ndarray | None], list[str]]:
    """Features for every path (None where the audio is bad) and the list of problems found.

    With ``workers > 1`` (default: up to 8 processes) and 64 files or more, files are read in a
    process pool; a failure there still comes back as a one-line problem or DataError.
    """
    feats, problems, _ = _extract_all(paths, feat_cfg, workers, desc)
    return feats, problems


def _cache_file(paths: list[Path], feat_cfg: dict, cache_dir: Path) -> Path:
    """The cache of the features of ``paths``: keyed on the feature settings and on each file's path,
    size and modification time, so an edited or replaced file is never served from an old cache."""
    h = hashlib.sha1(json.dumps(feature_signature(feat_cfg), sort_keys=True).encode())
    min_seconds = feat_cfg.get("min_seconds", 0.0) or 0.0
    if min_seconds:  # decides which files are usable, so it is part of the key
        h.update(f"min_seconds={float(min_seconds)!r}\n".encode())
    if feat_cfg.get("max_seconds") is not None:  # so does this
        h.update(f"max_seconds={float(feat_cfg['max_seconds'])!r}\n".encode())
    for p in paths:
        try:
            st = audio_file(p).stat()  # a #t= range (Kaldi segments): its recording's
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return cache_dir / f"{feature_type(feat_cfg)}_{h.hexdigest()[:20]}.npz"


def load_features(paths: list[Path], feat_cfg: dict, policy: str = "error",
                  log=print, desc: str = "features", workers: int | None = None, fix: str | None = None
                  ) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Cached features for ``paths``.

    Returns ``(features, kept_indices, problems)``. With ``policy="error"`` any bad file raises one
    DataError listing them all, ending with ``fix`` (what the caller's user can do: e.g.
    ``TRAINING_AUDIO_FIX``; default ``AUDIO_FIX``); with ``"skip"`` bad files are dropped and listed
    in ``problems``. Files that had to be resampled or averaged to mono are counted in one ``log`` line.
    A damaged cache file is reported in one line, deleted and written again.
    """
    paths = [Path(p) for p in paths]
    if policy not in ("error", "skip"):
        raise DataError(f"bad audio policy {policy!r}; use 'error' or 'skip' (data.bad_audio)")
    cache_dir_value = feat_cfg.get("cache_dir", "")
    cache_file = None
    if cache_dir_value:
        cache_file = _cache_file(paths, feat_cfg, resolve_path(cache_dir_value))

        def check(z: dict) -> None:
            _check_offsets(z["offsets"], len(z["kept"]), z["data"], feature_dim(feat_cfg))
            kept = z["kept"]
            if len(kept) and (kept.min() < 0 or kept.max() >= len(paths)) or len(z["infos"]) not in (0, len(paths)):
                raise _Damaged("its file indices do not fit the file list")
        z = _read_cache(cache_file, ("data", "offsets", "kept", "problems", "infos"), check, log)
        if z is not None:
            data, offsets, kept = z["data"], z["offsets"], z["kept"]
            problems = [str(x) for x in z["problems"]]
            if problems and policy == "error":
                _raise_audio_problems(problems, fix)
            note = conversion_note([tuple(r) for r in z["infos"].tolist()], feat_cfg["sample_rate"])
            if note:
                log(note)
            return [data[:, offsets[i]:offsets[i + 1]] for i in range(len(kept))], kept.tolist(), problems
    feats, problems, infos = _extract_all(paths, feat_cfg, workers=workers, desc=desc)
    _refuse_setting_that_fits_no_file(problems, len(paths), feat_cfg)
    if problems and policy == "error":
        _raise_audio_problems(problems, fix)
    note = conversion_note(infos, feat_cfg["sample_rate"])
    if note:
        log(note)
    kept = [i for i, f in enumerate(feats) if f is not None]
    feats = [feats[i] for i in kept]
    if cache_file is not None and feats:
        offsets = np.cumsum([0] + [f.shape[1] for f in feats])
        data = np.concatenate(feats, axis=1)
        try:
            _write_npz(cache_file, dict(data=data, offsets=offsets, kept=np.asarray(kept, dtype=np.int64),
                                        problems=np.asarray(problems, dtype=str),
                                        infos=np.asarray(infos, dtype=np.int64).reshape(-1, 2)))
        except Exception as e:  # a cache that cannot be written only costs time next run
            log(f"note: feature cache not written ({one_line(e, 200)})")
        feats = [data[:, offsets[i]:offsets[i + 1]] for i in range(len(feats))]
    return feats, kept, problems


def _refuse_setting_that_fits_no_file(problems: list[str], n_files: int, feat_cfg: dict) -> None:
    """When every one of several files is refused for the same length setting, the setting is what to
    change: one ``ConfigError`` naming it rather than one problem per file."""
    for key in ("min_seconds", "max_seconds"):
        if n_files > 1 and len(problems) == n_files and all(f"features.{key}" in p for p in problems):
            raise ConfigError(f"all {n_files} audio files are refused because of features.{key} "
                              f"({feat_cfg.get(key)} s), e.g. {problems[0]}; change features.{key}")


def _raise_audio_problems(problems: list[str], fix: str | None = None) -> None:
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(f"{len(problems)} unusable audio file(s): {shown}{more}. {fix or AUDIO_FIX}")


# --------------------------------------------------------------------------- the on-disk store (training)
def uses_store(feat_cfg: dict) -> bool:
    """Training features go to the on-disk store (``features.store`` and a ``cache_dir``), not RAM."""
    return bool(feat_cfg.get("cache_dir")) and bool(feat_cfg.get("store"))


def _store_signature(feat_cfg: dict) -> dict:
    """What the clean features depend on: the feature signature and the length limits."""
    return {**feature_signature(feat_cfg), "min_seconds": feat_cfg.get("min_seconds", 0.0) or 0.0,
            "max_seconds": feat_cfg.get("max_seconds")}


def clean_store(paths: list[Path], keys: list[str], feat_cfg: dict, log=print, desc: str = "features",
                workers: int | None = None, share: tuple[int, int] = (0, 1)) -> feature_store.Store:
    """The store of the clean features of ``paths`` (Kaldi keys ``keys``), this process's ``share`` of its
    missing shards extracted (all of them by default)."""
    return feature_store.ensure(resolve_path(feat_cfg["cache_dir"]), feature_type(feat_cfg), _store_signature(feat_cfg),
                                paths, keys, _extract_one, [(p, feat_cfg) for p in paths], feat_cfg, share,
                                prepare=lambda: check_settings(feat_cfg) or {}, log=log, workers=workers, desc=desc)


def _stored_features(paths, keys, feat_cfg, policy, log, desc, workers, fix, share=(0, 1)):
    """``load_features``'s ``(features, kept, problems)`` from the store: ``FeatureRef``s, not arrays (None
    while shards of other processes are missing)."""
    store = clean_store(paths, keys, feat_cfg, log, desc, workers, share)
    if store.pending:
        return None
    problems = store.problems
    _refuse_setting_that_fits_no_file(problems, len(paths), feat_cfg)
    if problems and policy == "error":
        _raise_audio_problems(problems, fix)
    note = conversion_note(store.infos, feat_cfg["sample_rate"])
    if note:
        log(note)
    refs = store.refs()
    kept = [i for i, r in enumerate(refs) if r is not None]
    return [refs[i][0] for i in kept], kept, problems


def load_stored_features(paths: list[Path], corpus: tuple[list[Path], list[str]], feat_cfg: dict, policy: str = "error",
                         log=print, desc: str = "features", fix: str | None = None) -> tuple[list, list[int], list[str]]:
    """``load_features``'s ``(features, kept, problems)`` for ``paths`` (some or all of the store's
    ``corpus = (paths, keys)``, e.g. training's list: ``load_training_items``), as ``FeatureRef``s from that
    corpus's clean store, built or completed as training does; the features are read when used, not here."""
    store = clean_store(list(corpus[0]), list(corpus[1]), feat_cfg, log, desc)
    at = {Path(p): i for i, p in enumerate(corpus[0])}
    pos = [at[Path(p)] for p in paths]  # KeyError: a path the corpus lacks (callers pass a subset of it)
    refs, stored = store.refs(), iter(store.problems)
    problem_of = [None if r is not None else next(stored) for r in refs]  # problems are kept in item order
    problems = [problem_of[i] for i in pos if problem_of[i] is not None]
    _refuse_setting_that_fits_no_file(problems, len(paths), feat_cfg)
    if problems and policy == "error":
        _raise_audio_problems(problems, fix)
    infos, kept = store.infos, [k for k, i in enumerate(pos) if refs[i] is not None]
    if note := conversion_note([infos[i] for i in pos], feat_cfg["sample_rate"]):
        log(note)
    return [refs[pos[k]][0] for k in kept], kept, problems


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

    ``versions[j]``: the versions of training item ``j``, each ``(n_features, frames)`` float32: the clean
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
    quiet_worker()


def _augment_one(args):
    """``(list of feature arrays or None, problem or None)`` for one kept training file: its
    ``copies`` augmented versions, then for each new-speaker speed factor the sped-up clean version and
    its ``copies`` augmented versions. Copy ``k`` of speed version ``j`` (0: original speed) draws from
    ``default_rng((augment.seed, index, j, k))``."""
    index, path, speaker, feat_cfg, aug, factors = args
    try:
        sr = feat_cfg["sample_rate"]
        wav = read_audio(path, sr, max_seconds=feat_cfg.get("max_seconds"))[0]
        others = [w for spk, w in _BABBLE_BANK if spk != speaker]
        out = []
        for j, factor in enumerate([1.0] + list(factors)):
            base = wav if j == 0 else augment.change_speed(wav, factor)
            if j > 0:
                out.append(extract(base, feat_cfg))
            for k in range(aug["copies"]):
                rng = np.random.default_rng((aug["seed"], index, j, k))
                out.append(extract(augment.augment_waveform(base, rng, aug, others=others, sr=sr), feat_cfg))
        bad = [f for f in out if not np.all(np.isfinite(f))]
        if bad:
            return None, f"{path}: augmented features are not finite (NaN/inf MFCCs)"
        return out, None
    except DataError as e:
        return None, one_line(e, 400)
    except Exception as e:  # one line, never a worker traceback
        return None, f"{path}: augmentation failed ({type(e).__name__}: {one_line(e, 120)})"


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
        wav = read_audio(paths[i], sr, max_seconds=feat_cfg.get("max_seconds"))[0]
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
    return cache_dir / f"{feature_type(feat_cfg)}_aug_{h.hexdigest()[:20]}.npz"


def load_training_features(paths: list[Path], speakers: list[str], feat_cfg: dict, aug_cfg: dict | None,
                           policy: str = "error", log=print, desc: str = "features",
                           workers: int | None = None, fix: str | None = None, keys: list[str] | None = None,
                           share: tuple[int, int] | None = None) -> TrainingFeatures | None:
    """Clean features (``load_features``, its own cache unchanged) plus the offline augmented copies.

    ``speakers[i]``: speaker of ``paths[i]`` (babble noise never mixes in the utterance's own speaker).
    ``aug_cfg``: the ``augment:`` config section. Each kept utterance gets ``copies`` augmented
    versions (random chains of ``augment.augment_waveform``, seeded by ``augment.seed``, the file's
    index and the copy number); with ``speed_as_new_speakers`` every speed factor adds an item (sped
    clean version + its ``copies`` augmented versions). The copies are computed once (in a process
    pool like the clean features) and cached next to the clean features (``features.cache_dir``) in a
    file whose key includes the augmentation settings. With augmentation off every item has one
    version, the clean features themselves. With ``uses_store(feat_cfg)`` both go to the on-disk store
    (Kaldi keys ``keys``, default the paths) and the versions are ``FeatureRef``s; ``share=(rank, world)``
    then only extracts that process's shards and returns None (``extract_training_share``).
    """
    paths = [Path(p) for p in paths]
    keys = keys or [str(p) for p in paths]
    if uses_store(feat_cfg):
        got = _stored_features(paths, keys, feat_cfg, policy, log, desc, workers, fix, share or (0, 1))
        if got is None:
            return None
        feats, kept, problems = got
    else:
        feats, kept, problems = load_features(paths, feat_cfg, policy=policy, log=log, desc=desc, workers=workers,
                                              fix=fix)
    aug = augment.settings(aug_cfg)
    factors = new_speaker_factors(aug)
    items = [(i, 1.0) for i in kept] + [(i, f) for f in factors for i in kept]
    if not augmentation_active(aug):
        return TrainingFeatures([[f] for f in feats], items, kept, problems)
    per_utt = aug["copies"] + len(factors) * (aug["copies"] + 1)
    cache_dir_value = feat_cfg.get("cache_dir", "")
    cache_file = (_aug_cache_file(paths, feat_cfg, aug, kept, speakers, resolve_path(cache_dir_value))
                  if cache_dir_value and not uses_store(feat_cfg) else None)
    extra = None
    if uses_store(feat_cfg):
        extra = _stored_copies(paths, speakers, keys, kept, feat_cfg, aug, factors, per_utt, log, desc, workers,
                               share or (0, 1))
        if extra is None:
            return None
    if cache_file is not None:
        def check(z: dict) -> None:
            if z["layout"].tolist() != [len(kept), aug["copies"], len(factors)]:
                raise _Damaged("its layout does not fit the augmentation settings")
            _check_offsets(z["offsets"], len(kept) * per_utt, z["data"], feature_dim(feat_cfg))
        z = _read_cache(cache_file, ("data", "offsets", "layout"), check, log)
        if z is not None:
            data, offsets = z["data"], z["offsets"]
            extra = [data[:, offsets[j]:offsets[j + 1]] for j in range(len(offsets) - 1)]
    if extra is None:
        bank = _babble_bank(paths, speakers, kept, feat_cfg, aug)
        jobs = [(i, paths[i], speakers[i], feat_cfg, aug, factors) for i in kept]
        what = f"{desc} augmented x{aug['copies']}" + (f" + speed {factors}" if factors else "")
        global _BABBLE_BANK
        saved, _BABBLE_BANK = _BABBLE_BANK, bank  # used directly when the jobs run in this process
        try:
            results = run_jobs(_augment_one, jobs, workers, what, initializer=_set_babble_bank, initargs=(bank,))
        finally:
            _BABBLE_BANK = saved
        bad = [r[1] for r in results if r[1] is not None]
        if bad:
            raise DataError(f"augmenting {len(bad)} training file(s) failed: {'; '.join(bad[:MAX_LISTED_PROBLEMS])}")
        extra = [f for r in results for f in r[0]]
        if cache_file is not None and extra:
            offsets = np.cumsum([0] + [f.shape[1] for f in extra])
            data = np.concatenate(extra, axis=1)
            try:
                layout = np.asarray([len(kept), aug["copies"], len(factors)], dtype=np.int64)
                _write_npz(cache_file, dict(data=data, offsets=offsets, layout=layout))
            except Exception as e:  # only costs time next run
                log(f"note: augmented-feature cache not written ({one_line(e, 200)})")
            extra = [data[:, offsets[j]:offsets[j + 1]] for j in range(len(extra))]
    k = aug["copies"]
    versions = [[feats[u]] + extra[u * per_utt: u * per_utt + k] for u in range(len(kept))]
    for j in range(len(factors)):
        for u in range(len(kept)):
            first = u * per_utt + k + j * (k + 1)
            versions.append(extra[first: first + k + 1])
    return TrainingFeatures(versions, items, kept, problems, cache_file)


def _stored_copies(paths, speakers, keys, kept, feat_cfg, aug, factors, per_utt, log, desc, workers, share):
    """The augmented copies from the store (per kept file its ``per_utt`` ``FeatureRef``s, flattened), None
    while other processes' shards are missing. Keyed on the clean store's settings, the offline
    augmentation settings, the kept files and their speakers (the babble bank depends on them)."""
    signature = {"features": _store_signature(feat_cfg), "augment": augment.offline_signature(aug),
                 "speakers": hashlib.sha1(json.dumps([speakers[i] for i in kept]).encode()).hexdigest()}

    def prepare() -> dict:
        global _BABBLE_BANK
        bank = _babble_bank(paths, speakers, kept, feat_cfg, aug)
        _BABBLE_BANK = bank  # used directly when the jobs run in this process
        return {"initializer": _set_babble_bank, "initargs": (bank,)}
    saved = _BABBLE_BANK
    try:
        store = feature_store.ensure(resolve_path(feat_cfg["cache_dir"]), f"{feature_type(feat_cfg)}_aug", signature,
                                     [paths[i] for i in kept], [keys[i] for i in kept], _augment_one,
                                     [(i, paths[i], speakers[i], feat_cfg, aug, factors) for i in kept], feat_cfg,
                                     share, prepare, log, workers, f"{desc} augmented x{aug['copies']}")
    finally:
        globals()["_BABBLE_BANK"] = saved
    if store.pending:
        return None
    if store.problems:
        raise DataError(f"augmenting {len(store.problems)} training file(s) failed: "
                        f"{'; '.join(store.problems[:MAX_LISTED_PROBLEMS])}")
    refs = store.refs()
    if any(len(r) != per_utt for r in refs):
        raise DataError(f"feature store {store.folder} does not fit the augmentation settings; delete it")
    return [f for r in refs for f in r]


# --------------------------------------------------------------------------- the training set
@dataclass
class TrainingItems:
    """What ``dataset.SpkTrainDataset`` crops from (``load_training_items``), one entry per item.

    ``utterances``: the manifest's utterances that were kept; speed copies (``speed_as_new_speakers``)
    are extra items carrying the new speaker name and the original relpath. ``versions``: per item the
    clean features first, then its offline augmented copies (just the clean features without offline
    augmentation). ``speeds``: per item 1.0 or the new-speaker speed factor, None without offline
    augmentation. ``skipped``: problems of the files left out (``data.bad_audio: skip``).
    ``manifest_speakers``: the speakers of the training manifest (without the speed copies' names).
    """
    utterances: list
    versions: list
    speeds: list | None
    skipped: list
    manifest_speakers: set

    @property
    def augmented(self) -> bool:
        """True when the items have offline augmented versions (``augmentation_active``)."""
        return self.speeds is not None


def _store_keys(utts: list) -> list[str]:
    """The store's Kaldi keys: the manifest's relative paths without extension, ``/`` as ``-``."""
    return [u.relpath.rsplit(".", 1)[0].replace("/", "-") for u in utts]


def training_store_corpus(utts: list, root: Path) -> tuple[list[Path], list[str]]:
    """``(paths, Kaldi keys)`` of the training manifest's utterances ``utts``: the corpus that
    ``load_training_items`` keeps in the store (the back-end embeds the training set from that store)."""
    return [u.path(root) for u in utts], _store_keys(utts)


def load_training_items(opts: dict, log=print) -> TrainingItems:
    """The training manifest's features with the augmented and speed copies the ``augment:`` section
    asks for; ``opts`` is the full configuration. Logs which augmentation is on and what was skipped."""
    root = config_path_value(opts, "data.root")
    utts = check_training_data(opts)
    aug = augment.settings(opts.get("augment"))
    paths = [u.path(root) for u in utts]
    policy = opts["data"]["bad_audio"]
    keys = _store_keys(utts)
    if augmentation_active(aug):
        tf = load_training_features(paths, [u.speaker for u in utts], opts["features"], aug,
                                    policy=policy, log=log, desc="train features", fix=TRAINING_AUDIO_FIX, keys=keys)
        utterances = [utts[i] if f == 1.0 else Utterance(speed_speaker(utts[i].speaker, f), utts[i].relpath,
                                                         utts[i].line) for i, f in tf.items]
        items = TrainingItems(utterances, tf.versions, [f for _, f in tf.items], tf.problems,
                              {u.speaker for u in utts})
        log(f"augmentation: {aug['copies']} offline cop{'y' if aug['copies'] == 1 else 'ies'} per utterance"
            + (f", speed copies {', '.join(f'{f:g}' for f in new_speaker_factors(aug))} as new speakers"
               if new_speaker_factors(aug) else "")
            + (", SpecAugment on crops" if aug["spec_augment"] else ""))
    else:
        tf = load_training_features(paths, [], opts["features"], None, policy=policy, log=log, desc="train features",
                                    fix=TRAINING_AUDIO_FIX, keys=keys)
        feats, kept, skipped = [v[0] for v in tf.versions], tf.kept, tf.problems
        items = TrainingItems([utts[i] for i in kept], [[f] for f in feats], None, skipped,
                              {u.speaker for u in utts})
        if aug["spec_augment"]:
            log("augmentation: SpecAugment on crops")
    if items.skipped:
        log(f"warning: skipped {len(items.skipped)} unusable training file(s) (data.bad_audio: skip)")
    return items


def extract_training_share(opts: dict, rank: int, world_size: int, barrier, log=print) -> None:
    """torchrun: process ``rank`` of ``world_size`` extracts its share of the training store's missing
    shards (``rank, rank + world_size, ...``), the clean ones, then (after ``barrier()``: they decide
    which files are kept) the augmented copies; ``SpkTrainDataset`` then finds the store complete. Does
    nothing without the store."""
    if not uses_store(opts["features"]):
        return
    root = config_path_value(opts, "data.root")
    utts = check_training_data(opts)
    keys = _store_keys(utts)
    paths, speakers = [root / u.relpath for u in utts], [u.speaker for u in utts]
    clean_store(paths, keys, opts["features"], log, "train features", share=(rank, world_size))
    barrier()
    if augmentation_active(opts.get("augment")):
        load_training_features(paths, speakers, opts["features"], opts.get("augment"), policy=opts["data"]["bad_audio"],
                               log=log, desc="train features", fix=TRAINING_AUDIO_FIX, keys=keys, share=(rank, world_size))
        barrier()

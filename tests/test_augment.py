"""Data augmentation (svlab.augment) and its integration in svlab.feature_cache and dataset.py: measured
SNR, RT60 and lengths, SpecAugment masks, offline augmented copies (cache, key, crops), and "off by
default changes nothing".
Everything is small: one-second signals and the 32-utterance tiny corpus of conftest.py."""
from __future__ import annotations


import numpy as np
import pytest

from svlab import augment
from svlab import checkpoint
from svlab import config
from svlab import feature_cache
from svlab.features import repeat_to
from svlab.manifests import read_manifest
import dataset
import train


def quiet(*args, **kwargs) -> None:
    """A ``log`` callable that drops everything."""


SR = 16000


def _power(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x * x)) if x.size else 0.0


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """Measured SNR in dB of ``noisy = clean + noise`` (both 1-D, same length): 10 log10(P_clean / P_noise)."""
    noise = np.asarray(noisy, np.float64) - np.asarray(clean, np.float64)
    return 10.0 * np.log10(_power(clean) / max(_power(noise), 1e-30))


def schroeder_rt60(rir: np.ndarray, sr: int = 16000, fit_db=(-15.0, -45.0)) -> float:
    """RT60 in seconds estimated from an impulse response by Schroeder backward integration: a line fitted
    to the energy decay curve (dB) between ``fit_db`` levels, extrapolated to -60 dB."""
    e = np.asarray(rir, np.float64) ** 2
    edc = np.cumsum(e[::-1])[::-1]
    edc_db = 10.0 * np.log10(np.maximum(edc / edc[0], 1e-300))
    sel = (edc_db <= fit_db[0]) & (edc_db >= fit_db[1])
    t = np.arange(e.size)[sel] / sr
    slope = np.polyfit(t, edc_db[sel], 1)[0]  # dB per second
    return -60.0 / slope


def _speechlike(seed: int = 0, seconds: float = 1.0) -> np.ndarray:
    """A voiced, amplitude-modulated test signal (float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 3 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 12))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(t.size)
    return (0.2 * x / np.max(np.abs(x))).astype(np.float32)


# --------------------------------------------------------------------------- waveform functions
@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
@pytest.mark.parametrize("target", [0.0, 5.0, 12.5, 20.0])
def test_add_noise_meets_the_requested_snr(kind, target):
    wav = _speechlike(1)
    others = [_speechlike(s, 0.7) for s in (2, 3, 4, 5)] if kind == "babble" else None
    out = augment.add_noise(wav, np.random.default_rng(7), (target, target), kinds=[kind], others=others)
    assert out.dtype == np.float32 and out.shape == wav.shape and np.all(np.isfinite(out))
    measured = snr_db(wav, out)  # 10 log10(P_signal / P_(out - wav))
    assert abs(measured - target) < 0.5, (kind, target, measured)


def test_add_noise_snr_range_babble_fallback_and_determinism():
    wav = _speechlike(1)
    snrs = [snr_db(wav, augment.add_noise(wav, np.random.default_rng(s), (5, 20))) for s in range(30)]
    assert min(snrs) >= 5 - 0.5 and max(snrs) <= 20 + 0.5 and max(snrs) - min(snrs) > 5  # drawn over the range
    ssn = augment.add_noise(wav, np.random.default_rng(3), (10, 10), kinds=["babble"], others=None)
    assert abs(snr_db(wav, ssn) - 10) < 0.5  # speech-shaped noise when no utterances are given
    a = augment.add_noise(wav, np.random.default_rng(5), (5, 20), others=[_speechlike(9)])
    b = augment.add_noise(wav, np.random.default_rng(5), (5, 20), others=[_speechlike(9)])
    c = augment.add_noise(wav, np.random.default_rng(6), (5, 20), others=[_speechlike(9)])
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    with pytest.raises(ValueError, match="unknown noise type"):
        augment.add_noise(wav, np.random.default_rng(0), kinds=["music"])


def test_pink_noise_falls_3db_per_octave():
    from scipy import signal
    x = augment.pink_noise(4 * SR, np.random.default_rng(0))
    f, p = signal.welch(x, fs=SR, nperseg=4096)
    band = (f >= 50) & (f <= 5000)
    slope = np.polyfit(np.log10(f[band]), 10 * np.log10(p[band]), 1)[0]  # dB per decade; 1/f: -10
    assert -12 < slope < -8, slope


@pytest.mark.parametrize("rt60", [0.2, 0.5, 0.8])
def test_reverberation_decays_at_the_requested_rt60(rt60):
    for seed in range(5):
        rir = augment.synth_rir(np.random.default_rng(seed), rt60, SR)
        assert np.all(np.isfinite(rir)) and rir[0] == 1.0
        est = schroeder_rt60(rir, SR)  # Schroeder backward integration, -15..-45 dB fit
        assert abs(est - rt60) <= 0.25 * rt60, (rt60, seed, est)
    # the same through reverberate(): an impulse in comes out as the (level-scaled) RIR
    impulse = np.zeros(int(1.3 * rt60 * SR), np.float32)
    impulse[0] = 1.0
    out = augment.reverberate(impulse, np.random.default_rng(11), (rt60, rt60), SR)
    assert abs(schroeder_rt60(out, SR) - rt60) <= 0.25 * rt60


def test_reverberate_keeps_length_level_and_is_finite():
    wav = _speechlike(2)
    for seed in range(4):
        out = augment.reverberate(wav, np.random.default_rng(seed), (0.2, 0.8), SR)
        assert out.shape == wav.shape and out.dtype == np.float32 and np.all(np.isfinite(out))
        assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) == pytest.approx(np.sqrt(np.mean(wav.astype(np.float64) ** 2)),
                                                                           rel=1e-4)
        assert not np.allclose(out, wav)
    a = augment.reverberate(wav, np.random.default_rng(1))
    assert a.tobytes() == augment.reverberate(wav, np.random.default_rng(1)).tobytes()


def test_speed_perturb_changes_length_by_the_factor():
    wav = _speechlike(3)
    for factor in (0.9, 1.1, 0.95, 1.05):
        out = augment.change_speed(wav, factor)
        assert abs(out.size - wav.size / factor) <= 1 and out.dtype == np.float32
    assert augment.change_speed(wav, 1.0).tobytes() == wav.tobytes()
    lengths = {augment.speed_perturb(wav, np.random.default_rng(s), (0.9, 1.0, 1.1)).size for s in range(20)}
    assert lengths == {int(np.ceil(wav.size / 0.9)), wav.size, int(np.ceil(wav.size / 1.1))}
    # slower playback lowers the pitch: the spectrum's centroid moves down by about the factor
    spec = lambda x: np.abs(np.fft.rfft(x, 2 * SR))  # noqa: E731
    centroid = lambda x: float(np.sum(np.arange(SR + 1) * spec(x)) / np.sum(spec(x)))  # noqa: E731
    assert centroid(augment.change_speed(wav, 0.9)) / centroid(wav) == pytest.approx(0.9, rel=0.03)


def test_gain_within_range():
    wav = _speechlike(4)
    for s in range(10):
        out = augment.gain(wav, np.random.default_rng(s), (-6, 6))
        g = 20 * np.log10(np.max(np.abs(out)) / np.max(np.abs(wav)))
        assert -6 - 1e-3 <= g <= 6 + 1e-3 and out.shape == wav.shape


def _runs(mask_1d: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for j, z in enumerate(list(mask_1d) + [False]):
        if z and start is None:
            start = j
        elif not z and start is not None:
            runs.append((start, j))
            start = None
    return runs


@pytest.mark.parametrize("masks", [(1, 10, 1, 4), (2, 10, 2, 4), (3, 5, 0, 4), (0, 10, 2, 3)])
def test_spec_augment_masks_exactly_the_requested_ranges(masks):
    n_t, max_t, n_f, max_f = masks
    feat = np.random.default_rng(0).standard_normal((20, 50)).astype(np.float32) + 5.0  # no zeros
    before = feat.copy()
    for seed in range(15):
        out = augment.spec_augment(feat, np.random.default_rng(seed), n_t, max_t, n_f, max_f)
        drawn = augment.spec_augment_masks(*feat.shape, np.random.default_rng(seed), n_t, max_t, n_f, max_f)
        assert feat.tobytes() == before.tobytes()  # the input (a cached array) is never modified
        mean = feat.mean(axis=1, keepdims=True)  # masks hold each coefficient's mean over the crop
        rows = _runs(np.all(out == mean, axis=1))
        cols = _runs(np.all(out == mean, axis=0))
        assert rows == sorted(drawn["freq"]) and len(rows) == n_f
        assert cols == sorted(drawn["time"]) and len(cols) == n_t
        assert all(1 <= b - a <= max_f for a, b in rows) and all(1 <= b - a <= max_t for a, b in cols)
        untouched = np.ones_like(out, bool)
        for a, b in rows:
            untouched[a:b] = False
        for a, b in cols:
            untouched[:, a:b] = False
        assert np.array_equal(out[untouched], feat[untouched])
        assert np.array_equal(out[~untouched], np.broadcast_to(mean, out.shape)[~untouched])
        again = augment.spec_augment(feat, np.random.default_rng(seed), n_t, max_t, n_f, max_f)
        assert again.tobytes() == out.tobytes()
    outs = {augment.spec_augment(feat, np.random.default_rng(s), n_t, max_t, n_f, max_f).tobytes() for s in range(5)}
    assert len(outs) > 1


def test_augment_chain_follows_the_config():
    rng = np.random.default_rng(0)
    chains = [augment.choose_chain(rng, {}) for _ in range(200)]
    assert all(set(c) & {"reverb", "noise"} for c in chains)  # never gain alone (MFCC mean norm undoes it)
    assert {op for c in chains for op in c} == {"reverb", "noise", "gain"}  # no speed: speed_prob 0
    only_reverb = {"noise_prob": 0.0, "gain_prob": 0.0, "reverb_prob": 0.3}
    assert all(augment.choose_chain(rng, only_reverb) == ["reverb"] for _ in range(20))
    as_speakers = {"speed_prob": 1.0, "speed_as_new_speakers": True}
    assert not any("speed" in augment.choose_chain(rng, as_speakers) for _ in range(20))
    wav = _speechlike(5)
    sped = augment.augment_waveform(wav, np.random.default_rng(1), {"speed_prob": 1.0, "speed_factors": [1.1]})
    assert abs(sped.size - wav.size / 1.1) <= 1
    a = augment.augment_waveform(wav, np.random.default_rng(2), {}, others=[_speechlike(6)])
    b = augment.augment_waveform(wav, np.random.default_rng(2), {}, others=[_speechlike(6)])
    assert a.tobytes() == b.tobytes() and a.shape == wav.shape and np.all(np.isfinite(a))


def test_config_validates_the_augment_section():
    cfg = config.load_config()
    assert cfg["augment"]["copies"] == 0 and cfg["augment"]["spec_augment"] is False  # off by default
    assert not feature_cache.augmentation_active(cfg["augment"])
    for bad, text in [({"augment.copies": -1}, "0 or more"), ({"augment.snr_db": [20, 5]}, "low <= high"),
                      ({"augment.noise_types": ["music"]}, "white, pink, babble"),
                      ({"augment.noise_prob": 1.5}, "probability"), ({"augment.rt60": [0, 0.5]}, "positive"),
                      ({"augment.speed_factors": [3.0]}, "between 0.5 and 2"), ({"augment.copies": "x"}, "must be int")]:
        with pytest.raises(config.ConfigError, match=text):
            config.load_config(None, bad)


def test_partial_augment_settings_are_completed_from_config_yaml():
    shipped = config.load_config()["augment"]  # config.yaml is the one source of the defaults
    assert augment.settings(None) == shipped and augment.settings({}) == shipped
    assert augment.settings({"copies": 3, "snr_db": [0, 5]}) == {**shipped, "copies": 3, "snr_db": [0, 5]}
    changed = augment.settings({})
    changed["noise_types"].append("music")  # a caller's copy never changes the next caller's defaults
    assert augment.settings({}) == shipped


# --------------------------------------------------------------------------- dataset integration
def _reference_crops(cfg: dict, epochs=(1, 2)) -> tuple[list[np.ndarray], dict]:
    """Features and crops as the code before augmentation made them (load_features, repeat_to, one
    generator per (seed, epoch, i) drawing the crop start), with no disk cache."""
    utts = read_manifest(config.config_path_value(cfg, "data.train_manifest"))
    root = config.config_path_value(cfg, "data.root")
    feat_cfg = {**cfg["features"], "cache_dir": ""}
    feats, _, _ = feature_cache.load_features([root / u.relpath for u in utts], feat_cfg, log=quiet, workers=1)
    crop = cfg["train"]["crop_frames"]
    feats = [repeat_to(f, crop) for f in feats]
    crops = {}
    for epoch in epochs:
        for i, f in enumerate(feats):
            high = f.shape[1] - crop
            start = 0 if high <= 0 else int(np.random.default_rng((cfg["train"]["seed"], epoch, i)).integers(0, high + 1))
            crops[epoch, i] = f[:, start:start + crop]
    return feats, crops


def test_augmentation_off_is_byte_identical_to_the_plain_path(make_config, tmp_path):
    ref_feats, ref_crops = _reference_crops(make_config(tmp_path / "ref"))
    # the default (copies 0) and copies 0 with other offline settings: the same features and crops
    for j, extra in enumerate([{}, {"augment.snr_db": [0, 3], "augment.seed": 5, "augment.reverb_prob": 1.0}]):
        cfg = make_config(tmp_path / f"off{j}", extra)
        ds = dataset.SpkTrainDataset(cfg, log=quiet)
        assert ds.versions is None and ds.speeds is None and len(ds) == len(ref_feats)
        assert [f.tobytes() for f in ds.features] == [f.tobytes() for f in ref_feats]
        for epoch in (1, 2):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                x, _ = ds[i]
                assert x.numpy().tobytes() == np.ascontiguousarray(ref_crops[epoch, i]).tobytes()
        assert not list((tmp_path / f"off{j}" / "cache").glob("mfcc_aug_*"))  # no augmented cache made


def test_copies_are_cached_with_the_clean_features_and_all_used(make_config, tmp_path, monkeypatch):
    plain = dataset.SpkTrainDataset(make_config(tmp_path / "plain"), log=quiet)
    cfg = make_config(tmp_path / "aug", {"augment.copies": 2, "features.store": False})  # the npz caches
    ds = dataset.SpkTrainDataset(cfg, log=quiet)
    n = len(plain)
    assert len(ds) == n and ds.labels == plain.labels and ds.speakers == plain.speakers  # epoch length unchanged
    assert all(len(v) == 3 for v in ds.versions)  # clean + 2 copies per utterance
    assert [f.tobytes() for f in ds.features] == [f.tobytes() for f in plain.features]  # clean = version 0
    for v in ds.versions:
        assert v[0] is not None and v[1].shape[0] == v[0].shape[0] and np.all(np.isfinite(v[1]))
        assert not np.allclose(v[0][:, :v[1].shape[1]], v[1][:, :v[0].shape[1]], atol=1e-2)  # really augmented
        assert v[1].tobytes() != v[2].tobytes()
    caches = list((tmp_path / "aug" / "cache").glob("mfcc_aug_*.npz"))
    assert len(caches) == 1
    with np.load(caches[0]) as z:
        assert z["layout"].tolist() == [n, 2, 0] and len(z["offsets"]) == 2 * n + 1  # 2 copies per utterance
    assert len(list((tmp_path / "aug" / "cache").glob("mfcc_*.npz"))) == 2  # clean cache + augmented cache
    # over epochs every item is cropped from each of its 3 versions, one crop per item and epoch
    seen = {i: set() for i in range(n)}
    for epoch in range(1, 41):
        ds.set_epoch(epoch)
        for i in range(n):
            version, start, _ = ds.choose(i)
            seen[i].add(version)
            if epoch <= 2:
                x, y = ds[i]
                expect = ds.versions[i][version][:, start:start + cfg["train"]["crop_frames"]]
                assert x.numpy().tobytes() == np.ascontiguousarray(expect).tobytes() and y == ds.labels[i]
    assert all(s == {0, 1, 2} for s in seen.values())
    # a second build reads the cache (no augmentation runs) and gets the same arrays
    monkeypatch.setattr(feature_cache, "_augment_one", lambda args: pytest.fail("augmented again despite the cache"))
    again = dataset.SpkTrainDataset(cfg, log=quiet)
    assert [[f.tobytes() for f in v] for v in again.versions] == [[f.tobytes() for f in v] for v in ds.versions]


def test_copies_are_deterministic_for_a_seed(make_config, tmp_path):
    extra = {"augment.copies": 1, "features.cache_dir": ""}
    a = dataset.SpkTrainDataset(make_config(tmp_path / "a", extra), log=quiet)
    b = dataset.SpkTrainDataset(make_config(tmp_path / "b", extra), log=quiet)
    c = dataset.SpkTrainDataset(make_config(tmp_path / "c", {**extra, "augment.seed": 1}), log=quiet)
    assert [v[1].tobytes() for v in a.versions] == [v[1].tobytes() for v in b.versions]
    assert [v[1].tobytes() for v in a.versions] != [v[1].tobytes() for v in c.versions]
    for ds in (a, b):
        ds.set_epoch(3)
    assert all(a[i][0].numpy().tobytes() == b[i][0].numpy().tobytes() for i in range(len(a)))


def test_cache_key_follows_the_offline_augment_settings(make_config, tmp_path, tiny_corpus):
    cfg = make_config(tmp_path)
    utts = read_manifest(tiny_corpus.train_manifest)
    paths = [tiny_corpus.root / u.relpath for u in utts]
    speakers = [u.speaker for u in utts]
    kept = list(range(len(utts)))
    base = {**cfg["augment"], "copies": 2}

    def key(**change) -> str:
        return feature_cache._aug_cache_file(paths, cfg["features"], {**base, **change}, kept, speakers, tmp_path).name
    k0 = key()
    assert k0.startswith("mfcc_aug_") and k0 != feature_cache._cache_file(paths, cfg["features"], tmp_path).name
    for change in [{"copies": 3}, {"seed": 1}, {"snr_db": [0, 10]}, {"rt60": [0.3, 0.9]}, {"noise_types": ["pink"]},
                   {"reverb_prob": 0.1}, {"speed_prob": 0.5}, {"speed_as_new_speakers": True}]:
        assert key(**change) != k0, change
    for online in [{"spec_augment": True}, {"time_masks": 2}, {"max_freq": 8}]:  # online only: same copies
        assert key(**online) == k0, online
    assert feature_cache._aug_cache_file(paths, {**cfg["features"], "n_mfcc": 13}, base, kept, speakers, tmp_path).name != k0


def test_spec_augment_on_crops_is_seeded_like_the_crop(make_config, tmp_path):
    extra = {"augment.spec_augment": True, "augment.time_masks": 2, "augment.max_time": 8, "augment.freq_masks": 1,
             "augment.max_freq": 3}
    ds = dataset.SpkTrainDataset(make_config(tmp_path, extra), log=quiet)
    _, ref_crops = _reference_crops(make_config(tmp_path / "ref"), epochs=(1,))
    assert ds.versions is None
    ds.set_epoch(1)
    for i in range(len(ds)):
        x = ds[i][0].numpy()
        _, start, rng = ds.choose(i)
        ref = ref_crops[1, i]
        assert x.tobytes() == augment.spec_augment(ref, rng, 2, 8, 1, 3).tobytes()  # same crop, then the masks
        mean = ref.mean(axis=1, keepdims=True)
        assert len(_runs(np.all(x == mean, axis=0))) == 2 and len(_runs(np.all(x == mean, axis=1))) == 1
        assert x.tobytes() == ds[i][0].numpy().tobytes()  # deterministic
    first = ds.features[0]  # the cached features themselves are untouched
    assert not np.any(np.all(first == first.mean(axis=1, keepdims=True), axis=0))


def test_speed_copies_as_new_speakers_and_train_py_uses_them(make_config, tmp_path):
    extra = {"augment.copies": 1, "augment.speed_as_new_speakers": True, "augment.speed_factors": [0.9, 1.1],
             "augment.spec_augment": True, "train.epochs": 1}
    cfg = make_config(tmp_path, extra)
    ds = dataset.SpkTrainDataset(cfg, log=quiet)
    n_utts = len(read_manifest(config.config_path_value(cfg, "data.train_manifest")))
    base = sorted({u.speaker for u in read_manifest(config.config_path_value(cfg, "data.train_manifest"))})
    assert len(ds) == 3 * n_utts and sorted(set(ds.speeds)) == [0.9, 1.0, 1.1]
    assert ds.speakers == sorted(base + [f"{s}_sp0.9" for s in base] + [f"{s}_sp1.1" for s in base])
    assert all(len(v) == 2 for v in ds.versions)
    for j, (u, f) in enumerate(zip(ds.utterances, ds.speeds)):
        assert ds.speakers[ds.labels[j]] == u.speaker and (f == 1.0) == ("_sp" not in u.speaker)
    clean = {u.relpath: ds.versions[j][0] for j, u in enumerate(ds.utterances) if ds.speeds[j] == 1.0}
    for j, u in enumerate(ds.utterances):
        if ds.speeds[j] != 1.0 and clean[u.relpath].shape[1] > cfg["train"]["crop_frames"]:
            ratio = ds.versions[j][0].shape[1] / clean[u.relpath].shape[1]
            assert ratio == pytest.approx(1 / ds.speeds[j], rel=0.05)
    # train.py takes the number of classes from dataset.speakers and stores the list in the checkpoint
    result = train.train(cfg, log=quiet)
    state = checkpoint.load_checkpoint(result["final_checkpoint"])
    assert state["speakers"] == ds.speakers


def test_test_utterances_are_never_augmented(make_config, tmp_path):
    plain = dataset.SpkTestDataset(make_config(tmp_path / "p"), log=quiet)
    aug = dataset.SpkTestDataset(make_config(tmp_path / "a", {"augment.copies": 2, "augment.spec_augment": True}),
                                 log=quiet)
    assert [f.tobytes() for f in aug.features] == [f.tobytes() for f in plain.features]
    assert not list((tmp_path / "a" / "cache").glob("mfcc_aug_*"))


def test_worker_pool_gives_the_same_copies_as_one_process(tiny_corpus):
    """Real corpora go through the process pool (64 files or more): babble from the bank handed to the
    workers, same copies as in one process."""
    utts = read_manifest(tiny_corpus.train_manifest)
    paths = [tiny_corpus.root / u.relpath for u in utts] * 2  # 64 jobs: the pool path
    speakers = [u.speaker for u in utts] * 2
    feat_cfg = {**config.load_config(None, {"features.n_mfcc": 20})["features"], "cache_dir": ""}
    aug = {"copies": 1, "noise_prob": 1.0, "noise_types": ["babble"], "reverb_prob": 0.0}
    one = feature_cache.load_training_features(paths, speakers, feat_cfg, aug, log=quiet, workers=1)
    pool = feature_cache.load_training_features(paths, speakers, feat_cfg, aug, log=quiet, workers=2)
    assert len(one.versions) == 64 and all(len(v) == 2 for v in one.versions)
    assert [[f.tobytes() for f in v] for v in one.versions] == [[f.tobytes() for f in v] for v in pool.versions]

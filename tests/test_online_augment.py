"""Online augmentation (issue 20.4, svlab/online_augment.py): training crops read from the waveform and
augmented in the DataLoader workers, with real noise / impulse-response folders or synthetic ones."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from conftest import quiet
from dataset import SpkTrainDataset
from svlab import augment, online_augment
from svlab.errors import ConfigError, DataError

torch.set_num_threads(1)
SR = 16000
ONLY_NOISE = {"augment.noise_prob": 1.0, "augment.reverb_prob": 0.0, "augment.gain_prob": 0.0,
              "augment.speed_prob": 0.0, "augment.online_prob": 1.0}


def online(make_config, tmp_path, **extra):
    cfg = make_config(tmp_path, {"augment.mode": "online", **extra})
    return SpkTrainDataset(cfg, log=quiet)


def crops(ds, epoch: int, items=range(6)) -> list[np.ndarray]:
    ds.set_epoch(epoch)
    return [ds[i][0].numpy().copy() for i in items]


def tone(path, freq: float, seconds: float = 2.0, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    x = (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype="FLOAT")
    return x


def test_online_crops_are_augmented_and_clean_ones_match_the_stored_features(make_config, tmp_path):
    plain = SpkTrainDataset(make_config(tmp_path), log=quiet)
    clean = online(make_config, tmp_path, **{"augment.online_prob": 0.0})
    noisy = online(make_config, tmp_path, **{"augment.online_prob": 1.0, "augment.snr_db": [0, 5]})
    for p, c, n in zip(crops(plain, 2), crops(clean, 2), crops(noisy, 2)):
        assert p.shape == c.shape == n.shape == (20, 50)
        # the same frames of the same audio: equal up to the crop's own mean normalisation and its edges
        pc, cc = p - p.mean(1, keepdims=True), c - c.mean(1, keepdims=True)
        assert np.corrcoef(pc[:, 2:-2].ravel(), cc[:, 2:-2].ravel())[0, 1] > 0.98
        assert np.corrcoef(n.ravel(), c.ravel())[0, 1] < 0.9  # 0-5 dB of noise changes the crop
    assert len(noisy) == len(plain) and noisy.labels == plain.labels


def test_online_crops_are_reproducible_and_new_each_epoch(make_config, tmp_path):
    extra = {"augment.online_prob": 1.0, "augment.speed_prob": 0.5, "augment.spec_augment": True}
    a, b = online(make_config, tmp_path, **extra), online(make_config, tmp_path, **extra)
    for x, y in zip(crops(a, 1), crops(b, 1)):
        np.testing.assert_array_equal(x, y)
    assert all(not np.array_equal(x, y) for x, y in zip(crops(a, 1), crops(a, 2)))
    other = online(make_config, tmp_path, **{**extra, "train.seed": 5})
    assert all(not np.array_equal(x, y) for x, y in zip(crops(a, 1), crops(other, 1)))


def test_two_dataloader_workers_give_the_same_batches_as_none(make_config, tmp_path):
    ds = online(make_config, tmp_path, **{"augment.online_prob": 1.0, "augment.speed_prob": 0.3})
    ds.set_epoch(3)

    def batches(workers: int) -> list:
        loader = DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn, num_workers=workers, shuffle=True,
                            generator=torch.Generator().manual_seed(7))
        return [(x.numpy(), y.numpy()) for x, y in loader]
    one, two = batches(0), batches(2)
    assert len(one) == len(two) == 4
    for (x0, y0), (x2, y2) in zip(one, two):
        np.testing.assert_array_equal(x0, x2)
        np.testing.assert_array_equal(y0, y2)


def test_a_noise_folder_is_what_is_mixed_in_at_the_drawn_snr(make_config, tmp_path):
    noise_dir = tmp_path / "musan"
    hum = tone(noise_dir / "noise" / "free-sound" / "hum.wav", 3000.0)
    ds = online(make_config, tmp_path, **ONLY_NOISE, **{"augment.noise_dir": str(noise_dir), "augment.snr_db": [3, 3]})
    assert sorted(ds.online.noise) == ["noise"] and ds.online.noise["noise"][0].frames == len(hum)
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(ds.online.samples())).astype(np.float32)
    out = ds.online._noise(wav, np.random.default_rng(1))
    added = (out - wav).astype(np.float64)
    snr = 10 * np.log10(np.mean(wav.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert snr == pytest.approx(3.0, abs=1e-3)
    spectrum = np.abs(np.fft.rfft(added))
    assert abs(np.argmax(spectrum) * SR / len(added) - 3000.0) < 2.0  # the file's tone, not synthetic noise
    with_noise = crops(ds, 1, range(3))
    plain = crops(online(make_config, tmp_path, **{"augment.online_prob": 0.0}), 1, range(3))
    assert all(np.abs(a - b).mean() > 0.1 * np.abs(b).mean() for a, b in zip(with_noise, plain))  # 3 dB of hum


def test_musan_speech_is_babble_of_several_files_and_rirs_come_from_the_folder(make_config, tmp_path):
    base = tmp_path / "musan"
    freqs = [500.0, 900.0, 1300.0, 1700.0, 2100.0, 2500.0, 2900.0, 3300.0]
    for f in freqs:
        tone(base / "speech" / f"s{int(f)}.wav", f)
    tone(base / "music" / "m.wav", 200.0)
    rir = np.zeros(800, np.float32)
    rir[300] = 0.9  # a pure delay: cut at its peak, reverberation with it changes nothing
    (tmp_path / "rirs").mkdir()
    sf.write(tmp_path / "rirs" / "delay.wav", rir, SR, subtype="FLOAT")
    ds = online(make_config, tmp_path, **ONLY_NOISE, **{"augment.noise_dir": str(base),
                                                        "augment.rir_dir": str(tmp_path / "rirs")})
    assert sorted(ds.online.noise) == ["music", "speech"] and len(ds.online.noise["speech"]) == 8
    wav = (0.1 * np.random.default_rng(0).standard_normal(ds.online.samples())).astype(np.float32)
    np.testing.assert_allclose(ds.online._reverb(wav, np.random.default_rng(0)), wav, atol=1e-6)
    talkers = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        out = ds.online._noise(wav, rng).astype(np.float64) - wav
        spectrum = np.abs(np.fft.rfft(out))
        peaks = [f for f in freqs + [200.0] if spectrum[int(f * len(out) / SR)] > 0.2 * spectrum.max()]
        talkers.append(len(peaks))
    assert set(talkers) - {1} and all(t == 1 or 3 <= t <= 7 for t in talkers)  # music alone, or 3-7 talkers


def test_bad_noise_folders_are_one_line_before_training(make_config, tmp_path):
    with pytest.raises(DataError, match=r"augment.noise_dir .* is not a folder"):
        online(make_config, tmp_path, **{"augment.noise_dir": str(tmp_path / "nowhere")})
    (tmp_path / "empty" / "noise").mkdir(parents=True)
    with pytest.raises(DataError, match=r"augment.noise_dir .*empty/noise holds no WAV/FLAC files"):
        online(make_config, tmp_path, **{"augment.noise_dir": str(tmp_path / "empty")})
    (tmp_path / "rirs").mkdir()
    (tmp_path / "rirs" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    unreadable = r"augment.rir_dir \(set in .*\): 1 file\(s\) are not readable WAV/FLAC audio: .*broken.wav; remove"
    with pytest.raises(DataError, match=unreadable) as e:
        online(make_config, tmp_path, **{"augment.rir_dir": str(tmp_path / "rirs")})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="augment.mode"):
        make_config(tmp_path, {"augment.mode": "sometimes"})


def test_online_mode_makes_no_offline_copies_and_trains(make_config, tmp_path):
    assert augment.settings({"mode": "online", "copies": 3})["copies"] == 0
    import train
    cfg = make_config(tmp_path, {"augment.mode": "online", "augment.copies": 3, "train.epochs": 1,
                                 "train.num_workers": 2, "augment.speed_prob": 0.2})
    lines = []
    train.train(cfg, log=lines.append)
    assert any("augmentation: online" in line for line in lines)
    assert not any("offline cop" in line for line in lines)
    assert (tmp_path / "runs" / "000" / "checkpoint_001.pth").is_file()


def test_read_window_loops_resamples_and_reads_ranges(tmp_path):
    x = np.arange(8000, dtype=np.float32) / 8000
    sf.write(tmp_path / "a.wav", x, 8000, subtype="FLOAT")
    np.testing.assert_array_equal(online_augment.read_window(tmp_path / "a.wav", 7990, 20, 8000),
                                  np.concatenate([x[7990:], x[:10]]))
    np.testing.assert_array_equal(online_augment.read_window(f"{tmp_path / 'a.wav'}#t=0.5,0.75", 1990, 20, 8000),
                                  np.concatenate([x[5990:6000], x[4000:4010]]))
    up = online_augment.read_window(tmp_path / "a.wav", 0, 16000, 16000)
    assert up.shape == (16000,) and abs(up[8000] - x[4000]) < 0.01

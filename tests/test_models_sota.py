"""The field's front end and networks (issue 21): fbank, ResNet34 and CAM++.

fbank against independent computations (librosa's own ``melspectrogram``, and numpy framing + FFT);
the front end in the feature signature, the caches and old checkpoints; the networks' shapes on odd
lengths, padding invariance where the docstrings claim it (eval mode), parameter counts and FLOPs at
the published settings (the figures the docstrings state), gradients to every parameter with every
loss, and checkpoints of a short training run that rebuild the trained network with no flags.
Networks are kept narrow (``base_channels`` 8) so the file runs in seconds on a CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import EER
import train
from svlab import checkpoint, config, embedding, feature_cache, features
from svlab import models as speaker_model
from svlab.checkpoint import describe_mismatch
from svlab.errors import ConfigError
from svlab.nets import campplus, resnet

NEW_MODELS = ("resnet34", "campplus")
POOLINGS = config.CHOICES["model.pooling"]
LOSSES = config.CHOICES["loss.type"]
N_FEAT = 20  # not a multiple of 8: the frequency strides round up
EMB = 16


def quiet(*args, **kwargs) -> None:
    """A ``log`` callable that drops everything."""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _wav(seconds: float = 1.23, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# =========================================================================== fbank
def _fbank_cfg(**extra) -> dict:
    return {**config.load_config(None, {"features.type": "fbank", **extra})["features"], "cache_dir": ""}


@pytest.mark.parametrize("n_fbank, fmax", [(80, 7600), (64, 8000), (40, 4000)])
def test_fbank_equals_librosa_melspectrogram_log(n_fbank, fmax):
    import librosa
    wav = _wav()
    feat_cfg = _fbank_cfg(**{"features.n_fbank": n_fbank, "features.fmax": fmax})
    ref = np.log(np.maximum(librosa.feature.melspectrogram(
        y=wav, sr=16000, n_fft=512, hop_length=160, win_length=400, n_mels=n_fbank, fmin=20, fmax=fmax,
        power=2.0), features.FBANK_LOG_FLOOR))
    ref -= ref.mean(axis=1, keepdims=True)
    got = features.fbank(wav, feat_cfg)
    assert got.dtype == np.float32 and got.shape == ref.shape == (n_fbank, 1 + wav.size // 160)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(features.extract(wav, feat_cfg), got)  # the configured front end
    # the same frames as the MFCC of the same settings
    assert features.mfcc(wav, {**feat_cfg, "type": "mfcc"}).shape[1] == got.shape[1]


def test_fbank_equals_a_numpy_stft_with_librosa_filters():
    """Window, hop and centring checked without librosa's STFT: periodic Hann of 400 samples centred
    in 512, frames every 160 samples of the signal zero-padded by 256 on both sides."""
    import librosa
    wav = _wav(0.87, seed=1).astype(np.float64)
    n_fft, win, hop = 512, 400, 160
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2:(n_fft - win) // 2 + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    padded = np.pad(wav, n_fft // 2)
    frames = np.stack([padded[i * hop:i * hop + n_fft] * window for i in range(1 + wav.size // hop)], axis=1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    mel = librosa.filters.mel(sr=16000, n_fft=n_fft, n_mels=80, fmin=20, fmax=7600) @ power
    ref = np.log(np.maximum(mel, features.FBANK_LOG_FLOOR))
    got = features.fbank(wav.astype(np.float32), _fbank_cfg(**{"features.mean_norm": False}))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3)
    normalised = features.fbank(wav.astype(np.float32), _fbank_cfg())
    np.testing.assert_allclose(normalised, ref - ref.mean(axis=1, keepdims=True), rtol=0, atol=2e-3)
    silent = features.fbank(np.zeros(1600, np.float32), _fbank_cfg(**{"features.mean_norm": False}))
    assert np.all(silent == np.float32(np.log(features.FBANK_LOG_FLOOR)))  # floored: no -inf


def test_feature_dim_type_and_the_config_checks():
    mfcc_cfg = config.load_config(None)["features"]
    assert mfcc_cfg["type"] == "mfcc" and features.feature_dim(mfcc_cfg) == mfcc_cfg["n_mfcc"] == 40
    assert features.feature_dim(_fbank_cfg()) == 80  # the toolkits' 80 bands by default
    assert features.feature_dim({"n_mfcc": 13, "n_fbank": 80}) == 13  # settings from before the key: MFCC
    with pytest.raises(ConfigError, match=r"features\.type.*choose one of mfcc, fbank"):
        config.load_config(None, {"features.type": "plp"})
    with pytest.raises(ConfigError, match=r"features\.n_fbank' must be positive"):
        config.load_config(None, {"features.type": "fbank", "features.n_fbank": 0})
    with pytest.raises(ConfigError, match=r"features\.n_fbank.*at most 1024"):
        config.load_config(None, {"features.type": "fbank", "features.n_fbank": 5000})
    # n_mfcc <= n_mels concerns the MFCC only
    with pytest.raises(ConfigError, match="cannot exceed"):
        config.load_config(None, {"features.n_mfcc": 60})
    assert config.load_config(None, {"features.type": "fbank", "features.n_mfcc": 60})["features"]["n_mfcc"] == 60
    # settings that reach the front end without load_config (a checkpoint's) are checked too
    assert ("type", "must be one of mfcc, fbank, got 'plp'") in config.feature_problems({**mfcc_cfg, "type": "plp"})
    with pytest.raises(ConfigError, match="cannot make fbank features: features.n_fbank must be a positive whole"):
        feature_cache.check_settings({**_fbank_cfg(), "n_fbank": None})


def test_an_fbank_the_front_end_rejects_is_named_with_its_own_settings(monkeypatch):
    def broken(wav, feat_cfg, mean_norm=None):
        raise ValueError("librosa says no")
    monkeypatch.setattr(features, "fbank", broken)
    with pytest.raises(ConfigError) as e:
        feature_cache.check_settings(_fbank_cfg())
    msg = str(e.value)
    assert msg.startswith("the feature settings (type='fbank', sample_rate=16000, n_fbank=80, win_length_ms=25")
    assert "cannot make fbank features of any audio (ValueError: librosa says no)" in msg and "n_mfcc" not in msg


def test_fbank_features_are_cached_and_read_back(tmp_path):
    import soundfile
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"u{i}.wav")
        soundfile.write(paths[-1], _wav(1.0 + 0.1 * i, seed=i), 16000)
    feat_cfg = {**_fbank_cfg(**{"features.n_fbank": 24}), "cache_dir": str(tmp_path / "cache")}
    notes: list[str] = []
    first, kept, _ = feature_cache.load_features(paths, feat_cfg, log=notes.append)
    again, _, _ = feature_cache.load_features(paths, feat_cfg, log=notes.append)  # from the cache
    assert kept == [0, 1] and [f.shape[0] for f in first] == [24, 24]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not [n for n in notes if "unusable" in n], notes  # the cache's rows are the fbank's, not n_mfcc
    assert [p.name[:6] for p in (tmp_path / "cache").iterdir()] == ["fbank_"]


def test_front_end_is_in_the_signature_the_caches_and_old_checkpoints_are_mfcc(tmp_path):
    mfcc_cfg = config.load_config(None)["features"]
    fbank_cfg = _fbank_cfg()
    assert features.feature_signature(mfcc_cfg)["type"] == "mfcc"
    assert features.feature_signature(fbank_cfg) != features.feature_signature(mfcc_cfg)
    paths = [tmp_path / "a.wav"]
    names = {feature_cache._cache_file(paths, c, tmp_path).name for c in (mfcc_cfg, fbank_cfg)}
    assert len(names) == 2 and {n.split("_")[0] for n in names} == {"mfcc", "fbank"}
    # a checkpoint written before the key existed recorded neither type nor n_fbank: it is an MFCC model
    old = {k: v for k, v in mfcc_cfg.items() if k not in ("type", "n_fbank")}
    assert features.feature_signature(old) == features.feature_signature(mfcc_cfg)
    fbank_run = config.load_config(None, {"features.type": "fbank"})
    used = embedding.checkpoint_features(fbank_run, {"config": {"features": old}}, log=quiet, cache=False)
    assert features.feature_type(used) == "mfcc" and features.feature_dim(used) == 40
    assert describe_mismatch({"features": old}, fbank_run, only_keys={"features.type"}) == [
        "features.type: checkpoint 'mfcc' vs config 'fbank'"]


# =========================================================================== networks
def small_model(name: str, pooling: str = "stats", n_features: int = N_FEAT) -> torch.nn.Module:
    return speaker_model.build_model({"name": name, "pooling": pooling, "embedding_size": EMB,
                                      "base_channels": 8}, n_features)


def pad_batch(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, frames_i)`` items -> ``(batch, features, max_frames)``, lengths; the padding holds
    large random values (the networks must ignore whatever it holds)."""
    lengths = torch.tensor([t.shape[1] for t in items])
    out = 10 * torch.randn(len(items), items[0].shape[0], int(lengths.max()))
    for i, t in enumerate(items):
        out[i, :, :t.shape[1]] = t
    return out, lengths


@pytest.mark.parametrize("name", NEW_MODELS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_shapes_on_odd_lengths_and_padding_invariance_in_eval_mode(name, pooling):
    model = small_model(name, pooling)
    model.train()
    with torch.no_grad():
        for _ in range(2):  # BatchNorm running statistics away from their initial values
            model(torch.randn(4, N_FEAT, 120) * 2 + 1)
        x, lengths = pad_batch([torch.randn(N_FEAT, n) for n in (97, 203, 1, 250)])
        assert model(x, lengths).shape == (4, EMB)  # training mode takes padded batches too
        model.eval()
        padded = model(x, lengths)
        alone = torch.cat([model(x[i:i + 1, :, :n]) for i, n in enumerate(lengths.tolist())])
    assert padded.shape == (4, EMB) and torch.isfinite(padded).all()
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    assert model.output_frames(97) == (13 if name == "resnet34" else 49)


@pytest.mark.parametrize("name, module", [("resnet34", resnet), ("campplus", campplus)])
def test_the_masks_are_what_makes_padding_harmless(name, module, monkeypatch):
    """The fault the masks guard against: without them, padded frames leak into valid ones."""
    model = small_model(name).eval()
    x, lengths = pad_batch([torch.randn(N_FEAT, n) for n in (97, 203)])
    with torch.no_grad():
        alone = model(x[:1, :, :97])
        monkeypatch.setattr(module, "masked", lambda h, mask: h)
        assert (model(x, lengths)[:1] - alone).abs().max() > 1e-3


def test_segment_mean_matches_avg_pool_and_ignores_padding():
    x = torch.randn(2, 3, 230)
    plain = campplus.segment_mean(x, None)
    assert plain.shape == x.shape
    torch.testing.assert_close(plain[..., 205], x[..., 200:].mean(-1))  # the short last segment
    torch.testing.assert_close(campplus.segment_mean(x, torch.ones(2, 1, 230)), plain)
    mask = (torch.arange(230) < 150).float().view(1, 1, -1).expand(2, 1, -1)
    torch.testing.assert_close(campplus.segment_mean(x, mask)[..., :150], campplus.segment_mean(x[..., :150], None))


def test_wrong_layout_and_wrong_pooling_are_refused():
    model = small_model("campplus")
    with pytest.raises(ValueError, match=r"looks like \(batch, frames, feat\)"):
        model(torch.randn(2, 50, N_FEAT))
    with pytest.raises(ValueError, match="pooled_channels"):
        resnet.ResNet34(speaker_model.build_pooling("stats", 100), in_channels=80)


PUBLISHED = {  # (model config, parameters we build, the published figure, GFLOPs per second we state)
    "resnet34": ({"name": "resnet34", "pooling": "stats", "embedding_size": 256, "base_channels": 32},
                 6_634_336, 6.63e6, "4.56"),
    "campplus": ({"name": "campplus", "pooling": "stats", "embedding_size": 512, "base_channels": 32},
                 7_176_224, 7.18e6, "1.13"),
}


@pytest.mark.parametrize("name", NEW_MODELS)
def test_parameter_count_and_flops_at_the_published_settings(name):
    cfg, ours, published, gflops = PUBLISHED[name]
    n = speaker_model.parameter_count(cfg, 80)
    assert n == ours and abs(n - published) / published < 0.10
    flops = speaker_model.forward_flops(cfg, 80, frames=100)
    assert f"{flops / 1e9:.2f}" == gflops
    doc = (resnet if name == "resnet34" else campplus).__doc__
    assert f"{n:,} parameters" in doc.replace("\n", " ") and f"{gflops} GFLOPs" in doc.replace("\n", " ")
    assert speaker_model.forward_flops(cfg, 80, frames=200) == pytest.approx(2 * flops, rel=0.02)
    # the size check counts the new networks too, before allocating anything
    speaker_model.check_model_size(cfg, 80)
    with pytest.raises(ConfigError, match=r"parameters.*model\.base_channels"):
        speaker_model.check_model_size({**cfg, "base_channels": 512}, 80)


@pytest.mark.parametrize("name", NEW_MODELS)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_gradients_reach_every_parameter_with_every_loss(name, loss_type):
    pooling = {"softmax": "asp", "amsoftmax": "gap", "aamsoftmax": "stats"}[loss_type]
    model = small_model(name, pooling).train()
    head = speaker_model.build_loss({"type": loss_type, "scale": 30.0, "margin": 0.2}, EMB, 5)
    loss, acc = head(model(torch.randn(4, N_FEAT, 61)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in [*model.named_parameters(), *head.named_parameters()]
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert 0.0 <= float(acc) <= 100.0  # percent


# =========================================================================== training and checkpoints
@pytest.mark.parametrize("name, pooling, loss_type", [("resnet34", "stats", "aamsoftmax"),
                                                      ("campplus", "asp", "softmax")])
def test_a_trained_checkpoint_rebuilds_the_network_with_no_flags(name, pooling, loss_type, make_config, tmp_path,
                                                                 monkeypatch):
    cfg = make_config(tmp_path, {"train.epochs": 1, "model.name": name, "model.pooling": pooling,
                                 "loss.type": loss_type, "model.base_channels": 8, "features.type": "fbank",
                                 "features.n_fbank": 24})
    built = []
    real_build = train.build_model

    def keep(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(train, "build_model", keep)  # the very network train.train trains
    result = train.train(cfg, log=quiet)
    state = checkpoint.load_checkpoint(result["final_checkpoint"])
    assert state["features"]["type"] == "fbank" and state["features"]["n_fbank"] == 24
    assert result["final_checkpoint"].name == f"{name}_{pooling}_{loss_type}_checkpoint.pth"
    rebuilt = speaker_model.model_from_checkpoint(state)  # nothing but the checkpoint
    assert isinstance(rebuilt, (resnet.ResNet34, campplus.CAMPPlus)) and rebuilt.in_channels == 24
    trained = built[0].eval()
    x = torch.randn(3, 24, 137)
    with torch.no_grad():
        assert torch.equal(trained(x), rebuilt(x))
    if name == "campplus":  # evaluated like any other, with the shipped (MFCC) config: the checkpoint's fbank
        shipped = make_config(tmp_path / "eval")
        out = EER.evaluate(shipped, result["final_checkpoint"], out_dir=tmp_path / "eval_out", log=quiet)
        assert 0.0 <= out["eer"] <= 1.0
        assert any(p.name.startswith("store_fbank_") for p in (tmp_path / "eval" / "cache").iterdir())  # the test store

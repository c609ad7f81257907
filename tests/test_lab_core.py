"""Unit tests of the lab foundation: pooling, x-vector, loss heads, metrics, checkpoints, config, data.

Expected values are computed independently in the tests (formulas from the handout, brute-force
metric sweeps), never copied from the code's output.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import checkpoint
import config
import dataset
import embedding
import loss
import metrics
import pooling
import speaker_model
import xvector


# =========================================================================== pooling
def _padded_batch(channels: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch whose frames past each length are large garbage (so any leak shows)."""
    g = torch.Generator().manual_seed(seed)
    frames = max(lengths)
    x = torch.randn(len(lengths), channels, frames, generator=g)
    for i, n in enumerate(lengths):
        x[i, :, n:] = 1000.0 * torch.rand(channels, frames - n, generator=g) + 500.0
    return x, torch.tensor(lengths)


def test_gap_shape_and_mean():
    x = torch.randn(64, 1500, 86)
    out = pooling.GlobalAveragePooling(1500)(x)
    assert out.shape == (64, 1500)
    torch.testing.assert_close(out, x.mean(2))
    assert pooling.GlobalAveragePooling(1500).output_dim == 1500


def test_gap_full_lengths_equals_plain_mean():
    x = torch.randn(3, 7, 20)
    out = pooling.GlobalAveragePooling(7)(x, torch.tensor([20, 20, 20]))
    torch.testing.assert_close(out, x.mean(2))


@pytest.mark.parametrize("cls", [pooling.GlobalAveragePooling, pooling.StatisticsPooling])
def test_pooling_ignores_padding(cls):
    lengths = [30, 17, 5, 1]
    x, lens = _padded_batch(6, lengths)
    pool = cls(6)
    batched = pool(x, lens)
    assert batched.shape == (4, pool.output_dim)
    for i, n in enumerate(lengths):
        alone = pool(x[i:i + 1, :, :n])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_stats_pooling_is_mean_and_std():
    x = torch.randn(5, 8, 40, dtype=torch.float64)
    out = pooling.StatisticsPooling(8)(x)
    assert out.shape == (5, 16)
    expected = torch.cat([x.mean(2), x.std(2, unbiased=False)], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert pooling.StatisticsPooling(8).output_dim == 16


def test_stats_pooling_is_finite_for_constant_input_and_gradients():
    x = torch.ones(2, 4, 10, requires_grad=True)
    out = pooling.StatisticsPooling(4)(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


# =========================================================================== x-vector
def _small_xvector(pool: str = "gap") -> xvector.Xvector:
    stat = speaker_model.XVECTOR_STAT_CHANNELS
    p = speaker_model.build_pooling(pool, stat)
    return xvector.Xvector(p, in_channels=20, channels=32, stat_channels=stat, embedding_size=16)


def test_xvector_frame_arithmetic():
    torch.manual_seed(0)
    model = _small_xvector().eval()
    x = torch.randn(2, 20, 100)
    with torch.no_grad():
        assert model.frame_layers(x).shape == (2, speaker_model.XVECTOR_STAT_CHANNELS, 86)
        assert model(x).shape == (2, 16)
    assert xvector.Xvector.output_frames(100) == 86
    # context of the paper's layers: (5,1), (3,2), (3,3) -> 4 + 4 + 6 frames
    for frames in (15, 37, 250):
        with torch.no_grad():
            assert model.frame_layers(torch.randn(1, 20, frames)).shape[-1] == frames - 14
        assert xvector.Xvector.output_frames(frames) == frames - 14


@pytest.mark.parametrize("frames", [1, 10, 14])
def test_xvector_too_short_input_raises(frames):
    model = _small_xvector().eval()
    with pytest.raises(ValueError, match="14"):
        model(torch.randn(2, 20, frames))


def test_xvector_shortest_valid_input():
    model = _small_xvector().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 20, 15)).shape == (2, 16)


@pytest.mark.parametrize("pool", ["gap", "stats"])
def test_xvector_padded_batch_equals_items_alone(pool):
    torch.manual_seed(1)
    model = _small_xvector(pool).eval()
    lengths = [60, 41, 15]
    x, lens = _padded_batch(20, lengths, seed=3)
    with torch.no_grad():
        batched = model(x, lens)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(batched[i:i + 1], model(x[i:i + 1, :, :n]), rtol=1e-4, atol=1e-4)


def test_build_model_respects_config():
    model = speaker_model.build_model({"name": "xvector", "pooling": "gap", "embedding_size": 16,
                                       "channels": 32}, n_mfcc=20)
    assert isinstance(model, xvector.Xvector)
    assert model.frame_layers[0].conv.in_channels == 20
    assert model.frame_layers[0].conv.out_channels == 32
    assert model.embedding.out_features == 16


# =========================================================================== loss heads
def test_softmax_head_matches_cross_entropy_and_accuracy():
    torch.manual_seed(0)
    head = loss.Softmax(16, 7)
    x = torch.randn(50, 16)
    y = torch.randint(0, 7, (50,))
    value, acc = head(x, y)
    torch.testing.assert_close(value, F.cross_entropy(head.fc(x), y))
    logits = (x @ head.fc.weight.T + head.fc.bias).detach().numpy()
    hits = sum(int(np.argmax(logits[i]) == int(y[i])) for i in range(50))
    assert acc.item() == pytest.approx(100.0 * hits / 50)
    assert not acc.requires_grad
    value.backward()
    assert head.fc.weight.grad is not None


def test_softmax_accuracy_extremes():
    head = loss.Softmax(3, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(3))
        head.fc.bias.zero_()
    x = torch.eye(3) * 5
    assert head(x, torch.tensor([0, 1, 2]))[1].item() == pytest.approx(100.0)
    assert head(x, torch.tensor([1, 2, 0]))[1].item() == pytest.approx(0.0)


def _handout_amsoftmax(x, W, y, s, m):
    x_norm = x / torch.sqrt((x * x).sum(dim=1, keepdim=True))
    w_norm = W / torch.sqrt((W * W).sum(dim=0, keepdim=True))
    costh = x_norm @ w_norm
    onehot = torch.zeros_like(costh)
    onehot[torch.arange(len(y)), y] = 1.0
    logits = s * (costh - m * onehot)
    return F.cross_entropy(logits, y), costh


@pytest.mark.parametrize("s,m", [(30.0, 0.2), (10.0, 0.35), (30.0, 0.0)])
def test_amsoftmax_matches_handout_formula(s, m):
    torch.manual_seed(2)
    head = loss.Amsoftmax(16, 9, s=s, margin=m)
    assert head.W.shape == (16, 9)
    x = torch.randn(40, 16) * 3
    y = torch.randint(0, 9, (40,))
    value, acc = head(x, y)
    expected, costh = _handout_amsoftmax(x, head.W, y, s, m)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    hits = (costh.argmax(1) == y).sum().item()
    assert acc.item() == pytest.approx(100.0 * hits / 40)
    value.backward()
    assert head.W.grad is not None and torch.isfinite(head.W.grad).all()


def test_amsoftmax_zero_margin_is_scaled_cosine_softmax():
    torch.manual_seed(3)
    head = loss.Amsoftmax(8, 5, s=20.0, margin=0.0)
    x, y = torch.randn(30, 8), torch.randint(0, 5, (30,))
    cos = F.cosine_similarity(x[:, :, None], head.W[None, :, :], dim=1)
    torch.testing.assert_close(head(x, y)[0], F.cross_entropy(20.0 * cos, y), rtol=1e-5, atol=1e-5)


def test_amsoftmax_margin_raises_loss_and_is_assignable():
    torch.manual_seed(4)
    head = loss.Amsoftmax(8, 5, s=30.0, margin=0.0)
    x, y = torch.randn(30, 8), torch.randint(0, 5, (30,))
    no_margin = head(x, y)[0].item()
    head.margin = 0.3  # margin warm-up assigns it during training
    assert head(x, y)[0].item() > no_margin


def test_amsoftmax_is_scale_invariant_in_x():
    torch.manual_seed(5)
    head = loss.Amsoftmax(8, 5)
    x, y = torch.randn(10, 8), torch.randint(0, 5, (10,))
    torch.testing.assert_close(head(x, y)[0], head(7.5 * x, y)[0])


# =========================================================================== metrics
def _rates(scores, labels, thresholds):
    tar, non = scores[labels == 1], scores[labels == 0]
    far = np.array([np.mean(non >= t) for t in thresholds])
    frr = np.array([np.mean(tar < t) for t in thresholds])
    return far, frr


def brute_force_eer(scores, labels):
    """Sweep every distinct score (plus +inf: accept nothing), decreasing; return the EER and the
    bracket of thresholds (low, high) around the FAR/FRR crossing, and the two operating points."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    far, frr = _rates(scores, labels, thresholds)
    k = next(i for i in range(len(thresholds)) if frr[i] <= far[i])
    if frr[k] == far[k]:
        return far[k], (thresholds[k], thresholds[k]), k, far, frr
    gap_before = frr[k - 1] - far[k - 1]
    gap_after = frr[k] - far[k]
    a = gap_before / (gap_before - gap_after)
    eer_far = far[k - 1] + a * (far[k] - far[k - 1])
    eer_frr = frr[k - 1] + a * (frr[k] - frr[k - 1])
    assert eer_far == pytest.approx(eer_frr)
    return eer_far, (thresholds[k], thresholds[k - 1]), k, far, frr


def brute_force_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.concatenate([[np.inf], np.unique(scores)])
    far, frr = _rates(scores, np.asarray(labels), thresholds)
    cost = c_miss * frr * p_target + c_fa * far * (1 - p_target)
    return cost.min() / min(c_miss * p_target, c_fa * (1 - p_target))


def _check_eer(scores, labels):
    eer, thr = metrics.compute_eer(scores, labels)
    ref, (low, high), k, far, frr = brute_force_eer(scores, labels)
    assert eer == pytest.approx(ref, abs=1e-12)
    assert 0.0 <= eer <= 1.0
    if low == high:  # the curves meet at an operating point: the threshold must reproduce it
        got_far, got_frr = metrics.error_rates_at(scores, labels, thr)
        assert (got_far, got_frr) == (pytest.approx(far[k]), pytest.approx(frr[k]))
    else:
        assert low <= thr <= high
    # sanity: the EER lies between FAR and FRR at the distinct scores just below / above the threshold
    distinct = np.unique(np.asarray(scores, dtype=np.float64))
    below = distinct[distinct <= thr].max() if (distinct <= thr).any() else -np.inf
    above = distinct[distinct > thr].min() if (distinct > thr).any() else np.inf
    far_lo, frr_lo = metrics.error_rates_at(scores, labels, below)  # accepts more
    far_hi, frr_hi = metrics.error_rates_at(scores, labels, above)  # accepts less
    assert far_hi - 1e-12 <= eer <= far_lo + 1e-12
    assert frr_lo - 1e-12 <= eer <= frr_hi + 1e-12
    return eer, thr


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_eer_matches_brute_force_random(seed):
    rng = np.random.default_rng(seed)
    n_tar, n_non = rng.integers(5, 60), rng.integers(20, 300)
    scores = np.concatenate([rng.normal(1.0, 1.0, n_tar), rng.normal(0.0, 1.0, n_non)])
    labels = np.concatenate([np.ones(n_tar, int), np.zeros(n_non, int)])
    perm = rng.permutation(scores.size)
    _check_eer(scores[perm], labels[perm])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_eer_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    scores = np.round(np.concatenate([rng.normal(0.6, 0.5, 40), rng.normal(0.0, 0.5, 120)]), 1)
    labels = np.concatenate([np.ones(40, int), np.zeros(120, int)])
    assert np.unique(scores).size < scores.size / 3  # really many ties
    _check_eer(scores, labels)


def test_eer_all_scores_equal_is_half_or_chance():
    scores = np.zeros(10)
    labels = np.array([1, 0] * 5)
    eer, _ = _check_eer(scores, labels)
    assert eer == pytest.approx(0.5)


def test_eer_perfect_separation():
    rng = np.random.default_rng(7)
    tar, non = rng.uniform(0.6, 1.0, 25), rng.uniform(-1.0, 0.4, 70)
    scores = np.concatenate([tar, non])
    labels = np.concatenate([np.ones(25, int), np.zeros(70, int)])
    eer, thr = _check_eer(scores, labels)
    assert eer == 0.0
    assert np.all(tar >= thr) and np.all(non < thr)
    assert metrics.error_rates_at(scores, labels, thr) == (0.0, 0.0)


def test_eer_perfectly_wrong_scores_is_one():
    scores = np.concatenate([np.full(5, -1.0) + np.arange(5) * 0.01, np.full(8, 1.0) + np.arange(8) * 0.01])
    labels = np.concatenate([np.ones(5, int), np.zeros(8, int)])
    eer, _ = _check_eer(scores, labels)
    assert eer == pytest.approx(1.0)


@pytest.mark.parametrize("position", ["top", "middle", "bottom"])
def test_eer_single_target_trial(position):
    rng = np.random.default_rng(11)
    non = rng.normal(0.0, 1.0, 30)
    target = {"top": 5.0, "middle": float(np.median(non)) + 1e-3, "bottom": -5.0}[position]
    scores = np.concatenate([[target], non])
    labels = np.concatenate([[1], np.zeros(30, int)])
    _check_eer(scores, labels)


def test_eer_invariant_to_order_and_monotone_transform():
    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.normal(1, 1, 30), rng.normal(0, 1, 90)])
    labels = np.concatenate([np.ones(30, int), np.zeros(90, int)])
    eer, thr = metrics.compute_eer(scores, labels)
    perm = rng.permutation(scores.size)
    assert metrics.compute_eer(scores[perm], labels[perm])[0] == pytest.approx(eer)
    eer2, thr2 = metrics.compute_eer(3.0 * scores + 2.0, labels)
    assert eer2 == pytest.approx(eer)
    assert thr2 == pytest.approx(3.0 * thr + 2.0)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0, 0]])
def test_one_class_trials_raise(labels):
    scores = np.linspace(0, 1, len(labels))
    with pytest.raises(metrics.MetricError):
        metrics.compute_eer(scores, labels)
    with pytest.raises(metrics.MetricError):
        metrics.min_dcf(scores, labels)


def test_metric_input_errors():
    with pytest.raises(metrics.MetricError):
        metrics.compute_eer([0.1, 0.2], [1, 0, 1])
    with pytest.raises(metrics.MetricError):
        metrics.compute_eer([0.1, np.nan, 0.3], [1, 0, 1])
    with pytest.raises(metrics.MetricError):
        metrics.compute_eer([0.1, 0.2, 0.3], [1, 0, 2])
    with pytest.raises(metrics.MetricError):
        metrics.min_dcf([0.1, 0.2], [1, 0], p_target=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p_target,c_miss,c_fa", [(0.01, 1.0, 1.0), (0.001, 1.0, 1.0), (0.05, 10.0, 1.0),
                                                  (0.5, 1.0, 1.0)])
def test_min_dcf_matches_brute_force(seed, p_target, c_miss, c_fa):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(1.5, 1, 50), rng.normal(0, 1, 400)])
    if seed == 2:
        scores = np.round(scores, 1)  # ties
    labels = np.concatenate([np.ones(50, int), np.zeros(400, int)])
    value, thr = metrics.min_dcf(scores, labels, p_target=p_target, c_miss=c_miss, c_fa=c_fa)
    assert value == pytest.approx(brute_force_min_dcf(scores, labels, p_target, c_miss, c_fa), abs=1e-12)
    assert 0.0 <= value <= 1.0 + 1e-12  # never worse than the threshold-free decision
    # the returned threshold really reaches that cost
    at = metrics.actual_dcf(scores, labels, thr, p_target=p_target, c_miss=c_miss, c_fa=c_fa)
    assert at == pytest.approx(value, abs=1e-12)


def test_min_dcf_can_be_reached_by_rejecting_everything():
    # the highest score is a non-target: at p_target = 0.001 one false accept costs far more than
    # missing every target, so the best decision is to accept nothing (normalised cost 1)
    rng = np.random.default_rng(9)
    scores = np.concatenate([rng.normal(0, 1, 20), rng.normal(0, 1, 400), [10.0]])
    labels = np.concatenate([np.ones(20, int), np.zeros(401, int)])
    value, thr = metrics.min_dcf(scores, labels, p_target=0.001)
    assert brute_force_min_dcf(scores, labels, 0.001) == pytest.approx(1.0)
    assert value == pytest.approx(1.0)
    assert metrics.error_rates_at(scores, labels, thr) == (0.0, 1.0)


def test_error_rates_at_counts_ties_as_accepted():
    scores = np.array([0.5, 0.5, 0.2, 0.5, 0.9])
    labels = np.array([1, 0, 1, 0, 0])
    far, frr = metrics.error_rates_at(scores, labels, 0.5)
    assert far == pytest.approx(3 / 3) and frr == pytest.approx(1 / 2)


# =========================================================================== checkpoints
SMALL_MODEL_CFG = {"name": "xvector", "pooling": "gap", "embedding_size": 16, "channels": 32}


def _small_state(pool: str = "gap", epoch: int = 3) -> tuple[dict, torch.nn.Module]:
    cfg = config.load_config(None, {"model.channels": 32, "model.embedding_size": 16,
                                    "features.n_mfcc": 20, "model.pooling": pool})
    torch.manual_seed(0)
    model = speaker_model.build_model(cfg["model"], cfg["features"]["n_mfcc"])
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 20, 60) * 3 + 1)  # move the BatchNorm running statistics off their init
    state = {"epoch": epoch, "model_state": model.state_dict(), "config": config.public_config(cfg),
             "speakers": ["S0001", "S0002"], "history": [{"epoch": 1, "loss": 1.5}]}
    return state, model.eval()


@pytest.mark.parametrize("pool", ["gap", "stats"])
def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path, pool):
    state, model = _small_state(pool)
    path = tmp_path / "sub" / "ck.pth"
    checkpoint.save_checkpoint(state, path)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["format"] == checkpoint.FORMAT
    assert loaded["epoch"] == 3 and loaded["speakers"] == ["S0001", "S0002"]
    assert loaded["config"]["model"] == state["config"]["model"]
    rebuilt = speaker_model.model_from_checkpoint(loaded)
    assert not rebuilt.training
    x = torch.randn(3, 20, 120)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    # the BatchNorm running statistics travelled too
    bn = rebuilt.frame_layers[0].norm
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["ck.pth"]  # no temp files left


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(checkpoint.CheckpointError, match="noise.pth"):
        checkpoint.load_checkpoint(path)


def test_empty_and_truncated_files_are_not_checkpoints(tmp_path):
    state, _ = _small_state()
    good = tmp_path / "good.pth"
    checkpoint.save_checkpoint(state, good)
    data = good.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("half.pth", "empty.pth"):
        with pytest.raises(checkpoint.CheckpointError, match=name):
            checkpoint.load_checkpoint(tmp_path / name)


class _WritesMarker:
    """Unpickling this object calls open(marker, 'w'), i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    # control: the payload really does create its marker when unpickled unsafely
    control = tmp_path / "control_marker"
    fh = pickle.loads(pickle.dumps(_WritesMarker(control)))
    fh.close()
    assert control.exists()

    marker = tmp_path / "EXECUTED"
    plain = tmp_path / "plain_pickle.pth"
    plain.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "x": _WritesMarker(marker)}))
    zipped = tmp_path / "torch_saved.pth"
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "model_state": {}, "config": {}, "speakers": [],
                "payload": _WritesMarker(marker)}, zipped)
    for path in (plain, zipped):
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load_checkpoint(path)
        assert not marker.exists()


def test_dict_without_marker_or_keys_is_refused(tmp_path):
    state, _ = _small_state()
    no_marker = tmp_path / "no_marker.pth"
    torch.save({"model_state": state["model_state"]}, no_marker)
    with pytest.raises(checkpoint.CheckpointError, match="marker"):
        checkpoint.load_checkpoint(no_marker)
    incomplete = tmp_path / "incomplete.pth"
    checkpoint.save_checkpoint({k: v for k, v in state.items() if k != "speakers"}, incomplete)
    with pytest.raises(checkpoint.CheckpointError, match="speakers"):
        checkpoint.load_checkpoint(incomplete)


def test_missing_checkpoint_lists_existing_ones(tmp_path):
    state, _ = _small_state()
    for epoch in (1, 3, 12):
        checkpoint.save_checkpoint({**state, "epoch": epoch}, checkpoint.epoch_checkpoint_path(tmp_path, epoch))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert list(checkpoint.list_epoch_checkpoints(tmp_path)) == [1, 3, 12]
    missing = checkpoint.epoch_checkpoint_path(tmp_path, 7)
    assert missing.name == "checkpoint_007.pth"
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_checkpoint(missing)
    msg = str(err.value)
    assert "checkpoint_007.pth" in msg
    assert "1, 3, 12" in msg


def test_missing_checkpoint_in_empty_folder_says_so(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_checkpoint(tmp_path / "checkpoint_001.pth")
    assert "no checkpoint" in str(err.value)


def test_final_checkpoint_name():
    assert checkpoint.final_checkpoint_name("xvector", "gap", "softmax") == "xvector_gap_softmax_checkpoint.pth"


# =========================================================================== atomic writes
def _half_then(exc):
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write("half of the new cont")
        raise exc
    return write


@pytest.mark.parametrize("exc,expected", [(RuntimeError("boom"), RuntimeError),
                                          (KeyboardInterrupt(), KeyboardInterrupt),
                                          (OSError(28, "No space left on device"), checkpoint.CheckpointError)])
def test_atomic_write_failure_keeps_previous_file(tmp_path, exc, expected):
    target = tmp_path / "target.txt"
    target.write_text("previous content")
    with pytest.raises(expected):
        checkpoint.atomic_write(target, _half_then(exc))
    assert target.read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.txt"]


def test_atomic_write_failure_without_previous_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(tmp_path / "new.txt", _half_then(RuntimeError("boom")))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_success_replaces_content(tmp_path):
    target = tmp_path / "deep" / "target.txt"
    checkpoint.atomic_write(target, lambda tmp: tmp.write_text("one"))
    checkpoint.atomic_write(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["target.txt"]


# =========================================================================== config
def test_windows_separators_in_user_config(tmp_path):
    user = tmp_path / "win.yaml"
    user.write_text("data:\n  root: 'F:\\DataSet\\Aishell\\ALL'\n"
                    "  train_manifest: 'files\\split_train_set.txt'\n", encoding="utf-8")
    cfg = config.load_config(user)
    assert cfg["data"]["root"] == "F:\\DataSet\\Aishell\\ALL"
    manifest = config.config_path_value(cfg, "data.train_manifest")
    assert manifest == config.PROJECT_ROOT / "files" / "split_train_set.txt"
    assert "\\" not in str(manifest)
    root = config.config_path_value(cfg, "data.root")
    if os.name != "nt":
        assert str(root) == "F:/DataSet/Aishell/ALL"  # the drive path is kept, not joined to the project
    assert not str(root).startswith(str(config.PROJECT_ROOT))
    assert cfg["_config_path"] == str(user)


def test_relative_paths_resolve_against_project_root_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("test:\n  trials: files/trials.txt\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = config.load_config("mine.yaml")  # the --config file itself is relative to the cwd
    assert cfg["_config_path"] == str(tmp_path / "mine.yaml")
    trials = config.config_path_value(cfg, "test.trials")
    assert trials == config.PROJECT_ROOT / "files" / "trials.txt"
    assert trials.is_absolute()
    assert config.resolve_path("saved_model\\000") == config.PROJECT_ROOT / "saved_model" / "000"
    absolute = tmp_path / "elsewhere" / "x.txt"
    assert config.resolve_path(str(absolute)) == absolute


def test_empty_path_is_a_config_error():
    cfg = config.load_config(None, {"test.trials": ""})
    with pytest.raises(config.ConfigError, match="test.trials"):
        config.config_path_value(cfg, "test.trials")


def test_backslash_relpaths_give_the_same_keys(tmp_path):
    fwd, back = tmp_path / "fwd.txt", tmp_path / "back.txt"
    fwd.write_text("S0001 S0001/S0001W0001.wav\nS0002 ./S0002/S0002W0003.wav\n", encoding="utf-8")
    back.write_text("S0001 S0001\\S0001W0001.wav\nS0002 .\\S0002\\S0002W0003.wav\n", encoding="utf-8")
    keys_fwd = [u.relpath for u in dataset.read_manifest(fwd)]
    keys_back = [u.relpath for u in dataset.read_manifest(back)]
    assert keys_fwd == keys_back == ["S0001/S0001W0001.wav", "S0002/S0002W0003.wav"]

    tf, tb = tmp_path / "trials_fwd.txt", tmp_path / "trials_back.txt"
    tf.write_text("S0001/S0001W0001.wav S0002/S0002W0003.wav 0\n", encoding="utf-8")
    tb.write_text("S0001\\S0001W0001.wav S0002\\S0002W0003.wav 0\n", encoding="utf-8")
    a, b = dataset.read_trials(tf)[0], dataset.read_trials(tb)[0]
    assert (a.enroll, a.test, a.label) == (b.enroll, b.test, b.label)
    assert a.enroll in keys_fwd and a.test in keys_fwd


def test_duplicate_detection_sees_through_separators(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text("S0001 S0001/a.wav\nS0001 S0001\\a.wav\n", encoding="utf-8")
    with pytest.raises(dataset.DataError, match="line 2"):
        dataset.read_manifest(path)


def test_unknown_key_suggests_the_right_one(tmp_path):
    user = tmp_path / "typo.yaml"
    user.write_text("train:\n  epoch: 5\n", encoding="utf-8")
    with pytest.raises(config.ConfigError) as err:
        config.load_config(user)
    msg = str(err.value)
    assert "train.epoch" in msg and "did you mean 'train.epochs'" in msg and str(user) in msg
    with pytest.raises(config.ConfigError, match="did you mean 'loss.margin'"):
        config.load_config(None, {"loss.margn": 0.3})
    with pytest.raises(config.ConfigError, match="trainn"):
        config.load_config(None, {"trainn.lr": 0.1})


@pytest.mark.parametrize("key,value", [("train.epochs", "many"), ("train.epochs", True), ("train.epochs", 2.5),
                                       ("train.lr", "fast"), ("model.name", 3.0), ("features.n_mfcc", [20])])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load_config(None, {key: value})


def test_section_given_as_value_and_value_as_section(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("train: 5\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="train"):
        config.load_config(user)
    user.write_text("train:\n  lr:\n    value: 1\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="train.lr"):
        config.load_config(user)


def test_value_checks_and_coercion():
    cfg = config.load_config(None, {"train.lr": 1, "train.epochs": 3})
    assert isinstance(cfg["train"]["lr"], float) and cfg["train"]["lr"] == 1.0
    assert cfg["train"]["epochs"] == 3
    with pytest.raises(config.ConfigError, match="loss.type"):
        config.load_config(None, {"loss.type": "arcface"})
    with pytest.raises(config.ConfigError, match="train.batchsize"):
        config.load_config(None, {"train.batchsize": 0})
    with pytest.raises(config.ConfigError, match="n_mfcc"):
        config.load_config(None, {"features.n_mfcc": 80, "features.n_mels": 40})
    assert config.load_config(None, {"train.epochs": None})["train"]["epochs"] == \
        config.load_config(None)["train"]["epochs"]  # None = flag not given


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="bad.yaml"):
        config.load_config(bad)
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_config(tmp_path / "nope.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(config.ConfigError):
        config.load_config(top)


def test_user_config_with_bom_is_read(tmp_path):
    user = tmp_path / "bom.yaml"
    user.write_bytes("\ufefftrain:\r\n  epochs: 7\r\n".encode("utf-8"))
    assert config.load_config(user)["train"]["epochs"] == 7


def test_parse_override():
    assert config.parse_override("train.lr=0.002") == ("train.lr", 0.002)
    assert config.parse_override("train.epochs=12") == ("train.epochs", 12)
    assert config.parse_override(" loss.type = amsoftmax") == ("loss.type", "amsoftmax")
    assert config.parse_override("train.compile=true") == ("train.compile", True)
    assert config.parse_override("data.root=F:\\DataSet\\Aishell\\ALL") == ("data.root", "F:\\DataSet\\Aishell\\ALL")
    assert config.parse_override("a.b=x=y") == ("a.b", "x=y")
    assert config.parse_override("features.cache_dir=") == ("features.cache_dir", "")
    with pytest.raises(config.ConfigError, match="KEY=VALUE"):
        config.parse_override("train.lr")


def test_override_applies_through_load_config():
    cfg = config.load_config(None, dict([config.parse_override("train.lr=0.002"),
                                         config.parse_override("loss.type=amsoftmax")]))
    assert cfg["train"]["lr"] == 0.002 and cfg["loss"]["type"] == "amsoftmax"


def test_set_string_key_keeps_leading_zeros():
    cfg = config.load_config(None, dict([config.parse_override("train.n_folder=001")]))
    assert cfg["train"]["n_folder"] == "001"


def test_float_keys_accept_exponent_notation(tmp_path):
    user = tmp_path / "exp.yaml"
    user.write_text("train:\n  lr: 1e-3\n  weight_decay: 1e-5\n", encoding="utf-8")
    cfg = config.load_config(user)
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["weight_decay"] == 1e-5
    cfg = config.load_config(None, dict([config.parse_override("train.lr=2e-3")]))
    assert cfg["train"]["lr"] == 0.002


def test_config_context_constant_matches_the_model():
    if not hasattr(config, "XVECTOR_CONTEXT"):
        pytest.skip("config.XVECTOR_CONTEXT not defined in this version")
    assert config.XVECTOR_CONTEXT == xvector.CONTEXT == sum((k - 1) * d for k, d in xvector.FRAME_LAYERS)


# =========================================================================== manifests and trials
def test_manifest_errors_listed_together_with_file_and_lines(tmp_path):
    path = tmp_path / "train_list.txt"
    path.write_text("S1 S1/a.wav\n"
                    "lonely_field\n"
                    "S1 S1/b.wav\n"
                    "S2 S1/a.wav\n"
                    "\n"
                    "also_alone\n", encoding="utf-8")
    with pytest.raises(dataset.DataError) as err:
        dataset.read_manifest(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "3 bad line" in msg
    for line in ("line 2", "line 4", "line 6"):
        assert line in msg
    assert "line 1" in msg  # the duplicate names where the file was first listed
    assert "line 3" not in msg


def test_manifest_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "win_manifest.txt"
    path.write_bytes(b"\xef\xbb\xbfS0001 S0001\\a.wav\r\n\r\n  \r\nS0002 S0002\\b.wav\r\n\r\n")
    utts = dataset.read_manifest(path)
    assert [(u.speaker, u.relpath, u.line) for u in utts] == [("S0001", "S0001/a.wav", 1),
                                                              ("S0002", "S0002/b.wav", 4)]


def test_manifest_missing_empty_and_not_utf8(tmp_path):
    with pytest.raises(dataset.DataError, match="data.train_manifest"):
        dataset.read_manifest(tmp_path / "nope.txt", key="data.train_manifest")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(dataset.DataError, match="empty.txt"):
        dataset.read_manifest(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("S1 caf\u00e9.wav\n".encode("latin-1"))
    with pytest.raises(dataset.DataError, match="UTF-8"):
        dataset.read_manifest(latin)


def test_manifest_problem_list_is_capped(tmp_path):
    path = tmp_path / "many_bad.txt"
    path.write_text("".join(f"bad{i}\n" for i in range(25)), encoding="utf-8")
    with pytest.raises(dataset.DataError) as err:
        dataset.read_manifest(path)
    msg = str(err.value)
    assert "25 bad line" in msg and "5 more" in msg and "line 20" in msg and "line 21:" not in msg


def test_trial_errors_listed_together(tmp_path):
    path = tmp_path / "my_trials.txt"
    path.write_text("a.wav b.wav 1\n"
                    "a.wav c.wav 2\n"
                    "a.wav c.wav\n"
                    "b.wav c.wav yes\n"
                    "a.wav b.wav 0 extra\n"
                    "b.wav a.wav 0\n", encoding="utf-8")
    with pytest.raises(dataset.DataError) as err:
        dataset.read_trials(path)
    msg = str(err.value)
    assert str(path) in msg and "4 bad line" in msg
    for line in ("line 2", "line 3", "line 4", "line 5"):
        assert line in msg
    assert "'2'" in msg and "'yes'" in msg


def test_trials_bom_crlf_blank_lines(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_bytes(b"\xef\xbb\xbfS1\\a.wav S2\\b.wav 1\r\n\r\nS1\\a.wav S3\\c.wav 0\r\n")
    trials = dataset.read_trials(path)
    assert [(t.enroll, t.test, t.label, t.line) for t in trials] == [
        ("S1/a.wav", "S2/b.wav", 1, 1), ("S1/a.wav", "S3/c.wav", 0, 3)]
    empty = tmp_path / "no_trials.txt"
    empty.write_text("\r\n", encoding="utf-8")
    with pytest.raises(dataset.DataError, match="no trials"):
        dataset.read_trials(empty)


# =========================================================================== audio
def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_load_audio_mono_16k(tmp_path):
    wav = _tone(0.5, 16000)
    path = tmp_path / "mono.wav"
    sf.write(path, wav, 16000, subtype="FLOAT")
    out = dataset.load_audio(path, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_allclose(out, wav, atol=1e-7)


def test_load_audio_bad_files_name_the_file(tmp_path):
    cases = {}
    cases["missing.wav"] = tmp_path / "missing.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cases["empty.wav"] = empty
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).bytes(3000))
    cases["noise.wav"] = noise
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    cases["silent.wav"] = silent
    nan = tmp_path / "nan.wav"
    data = _tone(0.1, 16000)
    data[10] = np.nan
    sf.write(nan, data, 16000, subtype="FLOAT")
    cases["nan.wav"] = nan
    for name, path in cases.items():
        with pytest.raises(dataset.DataError) as err:
            dataset.load_audio(path, 16000)
        assert name in str(err.value), str(err.value)


def test_load_audio_stereo_is_averaged(tmp_path):
    left, right = _tone(0.25, 16000, 300.0), _tone(0.25, 16000, 1000.0) * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    out = dataset.load_audio(path, 16000)
    assert out.shape == left.shape
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)


def test_load_audio_resamples_8k_to_16k(tmp_path):
    path = tmp_path / "phone.wav"
    sf.write(path, _tone(1.0, 8000, 300.0), 8000, subtype="PCM_16")
    out = dataset.load_audio(path, 16000)
    assert abs(out.size - 16000) <= 1
    # still a 300 Hz tone at the new rate
    spectrum = np.abs(np.fft.rfft(out[:16000] if out.size >= 16000 else np.pad(out, (0, 16000 - out.size))))
    assert np.argmax(spectrum) == pytest.approx(300, abs=2)


def test_mfcc_shape_and_mean_normalisation():
    feat_cfg = config.load_config(None, {"features.n_mfcc": 20})["features"]
    wav = _tone(1.0, 16000) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    feats = dataset.mfcc(wav, feat_cfg)
    assert feats.dtype == np.float32 and feats.shape[0] == 20
    assert abs(feats.shape[1] - 100) <= 1  # 10 ms hop: about 100 frames per second
    np.testing.assert_allclose(feats.mean(axis=1), 0.0, atol=1e-4)


def test_mfcc_without_mean_normalisation_keeps_the_channel():
    feat_cfg = config.load_config(None, {"features.n_mfcc": 20, "features.mean_norm": False})["features"]
    wav = _tone(1.0, 16000) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    raw = dataset.mfcc(wav, feat_cfg)
    normalised = dataset.mfcc(wav, {**feat_cfg, "mean_norm": True})
    # the only difference is the per-coefficient utterance mean, which is far from 0 for c0
    np.testing.assert_allclose(raw - raw.mean(axis=1, keepdims=True), normalised, atol=1e-3)
    assert abs(raw[0].mean()) > 10.0
    np.testing.assert_array_equal(dataset.mfcc(wav, feat_cfg, mean_norm=True), normalised)
    # a fixed channel (a 6 dB gain) moves the raw c0 by a constant and leaves normalised MFCCs alone
    louder = dataset.mfcc(2.0 * wav, feat_cfg)
    shift = louder[0] - raw[0]
    assert shift.std() < 0.05 * abs(shift.mean()) and abs(shift.mean()) > 1.0
    np.testing.assert_allclose(dataset.mfcc(2.0 * wav, {**feat_cfg, "mean_norm": True}), normalised, atol=1e-2)


@pytest.mark.parametrize("n_mels,n_mfcc,fmax", [(40, 40, 7600), (80, 80, 8000), (64, 20, 4000)])
def test_mfcc_equals_librosa_mfcc_of_the_waveform(n_mels, n_mfcc, fmax):
    # dataset.mfcc unrolls librosa.feature.mfcc(y=...) to cache the filterbank: same numbers
    import librosa
    feat_cfg = config.load_config(None, {"features.n_mfcc": n_mfcc, "features.n_mels": n_mels,
                                         "features.fmax": fmax, "features.mean_norm": False})["features"]
    wav = np.random.default_rng(n_mels).standard_normal(23_456).astype(np.float32) * 0.1
    ref = librosa.feature.mfcc(y=wav, sr=16000, n_mfcc=n_mfcc, n_fft=512, hop_length=160, win_length=400,
                               n_mels=n_mels, fmin=feat_cfg["fmin"], fmax=min(fmax, 8000))
    for _ in range(2):  # the second call uses the cached filterbank
        np.testing.assert_allclose(dataset.mfcc(wav, feat_cfg), ref, rtol=0, atol=1e-4)
    assert dataset._mel_filterbank.cache_info().hits >= 1


def test_mean_norm_is_part_of_the_feature_signature_and_legacy_checkpoints_used_it():
    cfg = config.load_config(None, {})
    assert cfg["features"]["mean_norm"] is True
    sig = dataset.feature_signature(cfg["features"])
    assert sig["mean_norm"] is True
    legacy = {k: v for k, v in cfg["features"].items() if k != "mean_norm"}
    assert dataset.feature_signature(legacy) == sig  # written before the key existed: normalised
    off = config.load_config(None, {"features.mean_norm": False})
    assert dataset.feature_signature(off["features"]) != sig
    # a checkpoint from before the key is evaluated with normalisation, whatever the config says ...
    state = {"config": {"features": legacy}}
    assert embedding.checkpoint_features(off, state, log=lambda *a: None)["mean_norm"] is True
    # ... and asking for the other setting explicitly is reported as a mismatch
    assert checkpoint.describe_mismatch(state["config"], off, sections=("features",)) == [
        "features.mean_norm: checkpoint True vs config False"]


def test_repeat_to_pads_short_utterances():
    feat = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = dataset.repeat_to(feat, 7)
    assert out.shape[1] >= 7
    np.testing.assert_array_equal(out[:, :7], feat[:, [0, 1, 2, 0, 1, 2, 0]])
    assert dataset.repeat_to(feat, 2) is feat

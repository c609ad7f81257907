"""Unit tests of the lab foundation: pooling, x-vector, loss heads, metrics, checkpoints, atomic writes.
(Configuration: test_config.py; manifests, audio and features: test_data.py.)

Expected values are computed independently in the tests (formulas from the handout, brute-force
metric sweeps), never copied from the code's output.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svlab import checkpoint, files
from svlab import config
import loss
from svlab import metrics
import pooling
from svlab import models as speaker_model
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
                                       "channels": 32}, n_features=20)
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
        files.atomic_write(target, _half_then(exc))
    assert target.read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.txt"]


def test_atomic_write_failure_without_previous_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "new.txt", _half_then(RuntimeError("boom")))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_success_replaces_content(tmp_path):
    target = tmp_path / "deep" / "target.txt"
    files.atomic_write(target, lambda tmp: tmp.write_text("one"))
    files.atomic_write(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["target.txt"]

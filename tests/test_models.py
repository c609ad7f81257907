"""Models, poolings and loss heads: shapes, padding, parameter counts, loss formulas, gradients.

Tensors follow the project convention: features ``(batch, n_mfcc, frames)``, frame-level maps
``(batch, channels, frames)``, embeddings ``(batch, embedding_size)``. Models are kept narrow
(ECAPA C=64, x-vector channels 32) so the file runs in seconds on a CPU.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecapa  # noqa: E402
import loss as losses  # noqa: E402
import pooling as poolings  # noqa: E402
from svlab import models as speaker_model  # noqa: E402

N_MFCC = 20
EMB = 16
MODELS = ("xvector", "ecapa")
POOLINGS = ("gap", "stats", "asp")
LOSSES = ("softmax", "amsoftmax", "aamsoftmax")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_model(name: str, pooling: str) -> torch.nn.Module:
    cfg = {"name": name, "pooling": pooling, "embedding_size": EMB, "channels": 64 if name == "ecapa" else 32}
    return speaker_model.build_model(cfg, N_MFCC)


def pad_batch(items: list[torch.Tensor], garbage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(channels, frames_i)`` items -> ``(batch, channels, max_frames)``, lengths; padding filled with
    random values times ``garbage`` (0: zero padding, as the data loader does)."""
    lengths = torch.tensor([t.shape[1] for t in items])
    out = torch.randn(len(items), items[0].shape[0], int(lengths.max()), dtype=items[0].dtype) * garbage
    for i, t in enumerate(items):
        out[i, :, : t.shape[1]] = t
    return out, lengths


# ---------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_model_and_pooling_gives_embeddings(name, pooling):
    model = small_model(name, pooling)
    x, lengths = pad_batch([torch.randn(N_MFCC, n) for n in (37, 23, 16)])
    model.train()
    emb = model(x, lengths)
    assert emb.shape == (3, EMB)
    assert torch.isfinite(emb).all()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (3, EMB)  # no lengths: every frame counts
        assert model(torch.randn(1, N_MFCC, 31)).shape == (1, EMB)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_output_dim(pooling):
    pool = speaker_model.build_pooling(pooling, 24)
    out = pool(torch.randn(2, 24, 11))
    assert out.shape == (2, pool.output_dim)
    assert pool.output_dim == (24 if pooling == "gap" else 48)
    assert pool.channels == 24


def test_ecapa_architecture():
    assert ecapa.ECAPA_TDNN.pooled_channels(512) == 1536
    assert ecapa.ECAPA_TDNN.pooled_channels(1024) == 1536
    assert ecapa.ECAPA_TDNN.pooled_channels(64) == 192
    model = small_model("ecapa", "asp")
    assert [b.res2.blocks[0].conv.dilation[0] for b in model.blocks] == [2, 3, 4]
    assert [b.res2.blocks[0].conv.kernel_size[0] for b in model.blocks] == [3, 3, 3]
    assert all(len(b.res2.blocks) == 7 for b in model.blocks)  # scale 8: 7 convolved groups
    assert model.layer0.conv.kernel_size[0] == 5
    assert model.mfa.in_channels == 3 * 64 and model.mfa.out_channels == 192
    assert model.pooling.global_context and model.pooling.output_dim == 384
    assert model.blocks[0].se.fc1.out_features == 128


def test_ecapa_rejects_transposed_input():
    model = small_model("ecapa", "stats").eval()
    with pytest.raises(ValueError, match="transpose"):
        model(torch.randn(2, 50, N_MFCC))  # (batch, frames, feat)
    with torch.no_grad():
        assert model(torch.randn(2, 50, N_MFCC).transpose(1, 2)).shape == (2, EMB)


def test_ecapa_rejects_pooling_of_wrong_width():
    with pytest.raises(ValueError, match="pooled_channels"):
        ecapa.ECAPA_TDNN(poolings.StatisticsPooling(100), in_channels=N_MFCC, channels=64)


@pytest.mark.parametrize("channels,paper", [(512, 6.2e6), (1024, 14.7e6)])
def test_ecapa_parameter_count_matches_paper(channels, paper):
    pool = speaker_model.build_pooling("asp", ecapa.ECAPA_TDNN.pooled_channels(channels), global_context=True)
    model = ecapa.ECAPA_TDNN(pool, in_channels=80, channels=channels, embedding_size=192)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - paper) / paper < 0.10, n
    assert abs(n - paper) / paper < 0.01, n  # in fact within 1%


# ---------------------------------------------------------------------------------------- padding

POOL_VARIANTS = {
    "gap": lambda c: poolings.GlobalAveragePooling(c),
    "stats": lambda c: poolings.StatisticsPooling(c),
    "asp": lambda c: poolings.AttentiveStatisticsPooling(c, 16, global_context=True),
    "asp_no_context": lambda c: poolings.AttentiveStatisticsPooling(c, 16, global_context=False),
    "asp_okabe": lambda c: poolings.AttentiveStatisticsPooling(c, 16, global_context=False,
                                                               channel_dependent=False),
}


@pytest.mark.parametrize("variant", sorted(POOL_VARIANTS))
@pytest.mark.parametrize("garbage", [0.0, 100.0])
def test_pooling_ignores_padding(variant, garbage):
    pool = POOL_VARIANTS[variant](12)
    items = [torch.randn(12, n) for n in (9, 17, 1, 13)]
    x, lengths = pad_batch(items, garbage)
    batched = pool(x, lengths)
    for i, item in enumerate(items):
        alone = pool(item.unsqueeze(0))
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)
    # and lengths equal to the full width is the same as no lengths
    full = torch.full((x.shape[0],), x.shape[2])
    torch.testing.assert_close(pool(x, full), pool(x), rtol=1e-6, atol=1e-6)


def test_attentive_pooling_weights_are_a_softmax_over_valid_frames():
    pool = poolings.AttentiveStatisticsPooling(6, 8, global_context=True)
    with torch.no_grad():  # constant scores -> uniform weights -> plain mean and std
        pool.attention[2].weight.zero_()
        pool.attention[2].bias.fill_(3.0)
    x, lengths = pad_batch([torch.randn(6, 10), torch.randn(6, 4)], garbage=50.0)
    torch.testing.assert_close(pool(x, lengths), poolings.StatisticsPooling(6)(x, lengths))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_whole_model_ignores_padding_in_eval_mode(name, pooling):
    # float64, so that exact invariance is told apart from a small leak (e.g. an SE mean over padding)
    model = small_model(name, pooling).double().eval()
    items = [torch.randn(N_MFCC, n, dtype=torch.float64) for n in (41, 29, 18)]
    x, lengths = pad_batch(items, garbage=10.0)
    with torch.no_grad():
        batched = model(x, lengths)
        for i, item in enumerate(items):
            torch.testing.assert_close(batched[i], model(item.unsqueeze(0))[0], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------- losses

def am_reference(x, W, label, s, m):
    cos = F.normalize(x.double(), dim=1) @ F.normalize(W.double(), dim=0)
    logits = s * cos
    logits[torch.arange(len(label)), label] = s * (cos[torch.arange(len(label)), label] - m)
    return F.cross_entropy(logits, label)


def aam_reference(x, W, label, s, m):
    """ArcFace from its definition: angles in float64, cos(theta + m) for the target where
    theta + m < pi, the insightface fallback cos(theta) - m sin(m) beyond."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(W.double(), dim=0)
    logits = s * cos
    for i, y in enumerate(label.tolist()):
        theta = math.acos(max(-1.0, min(1.0, cos[i, y].item())))
        target = math.cos(theta + m) if theta + m < math.pi else math.cos(theta) - m * math.sin(m)
        logits[i, y] = s * target
    return F.cross_entropy(logits, label)


@pytest.mark.parametrize("m", [0.2, 0.35])
def test_amsoftmax_matches_formula(m):
    head = losses.Amsoftmax(8, 5, s=30.0, margin=m)
    x, label = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, acc = head(x, label)
    torch.testing.assert_close(loss.double(), am_reference(x, head.W.detach(), label, 30.0, m), rtol=1e-5, atol=1e-5)
    assert 0.0 <= acc.item() <= 100.0


@pytest.mark.parametrize("m", [0.2, 0.5])
def test_aamsoftmax_matches_formula(m):
    head = losses.AAMsoftmax(8, 5, s=30.0, margin=m)
    x, label = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, _ = head(x, label)
    torch.testing.assert_close(loss.double(), aam_reference(x, head.W.detach(), label, 30.0, m), rtol=1e-5, atol=1e-5)


def _embeddings_at_angles(W: torch.Tensor, label: torch.Tensor, angles: list[float]) -> torch.Tensor:
    """Embeddings whose angle to their target class weight is exactly ``angles[i]``."""
    out = []
    for y, a in zip(label.tolist(), angles):
        w = F.normalize(W[:, y], dim=0)
        r = torch.randn_like(w)
        r = F.normalize(r - (r @ w) * w, dim=0)  # unit vector orthogonal to w
        out.append(math.cos(a) * w + math.sin(a) * r)
    return torch.stack(out) * 3.0


def test_aamsoftmax_beyond_pi_minus_m():
    m, s = 0.3, 20.0
    head = losses.AAMsoftmax(8, 4, s=s, margin=m)
    label = torch.tensor([0, 1, 2, 3, 1])
    # pi - m = 2.84: two angles before it, three past it (theta + m > pi), one of them at pi itself
    angles = [0.4, 2.7, 2.95, 3.1, math.pi]
    W = head.W.detach()
    x = _embeddings_at_angles(W, label, angles).requires_grad_(True)
    cos = head.cosine(x).detach()
    phi = head.target_cosine(cos.gather(1, label.view(-1, 1))).squeeze(1)
    for i, a in enumerate(angles):
        want = math.cos(a + m) if a + m < math.pi else math.cos(a) - m * math.sin(m)
        assert abs(phi[i].item() - want) < 1e-4, (a, phi[i].item(), want)
    # past pi - m the target logit keeps falling as the angle grows (cos(theta + m) would rise again)
    assert phi[2] > phi[3] > phi[4]
    loss, _ = head(x, label)
    torch.testing.assert_close(loss.double(), aam_reference(x.detach(), W, label, s, m), rtol=1e-4, atol=1e-4)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.W.grad).all()


def test_aamsoftmax_gradient_finite_when_embedding_equals_a_class_weight():
    head = losses.AAMsoftmax(8, 3, s=30.0, margin=0.2)
    W = head.W.detach()
    x = torch.stack([W[:, 0], -W[:, 1], W[:, 2]]).clone().requires_grad_(True)  # theta = 0, pi, 0
    loss, acc = head(x, torch.tensor([0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.W.grad).all()


@pytest.mark.parametrize("cls", [losses.Amsoftmax, losses.AAMsoftmax])
def test_zero_margin_is_scaled_cosine_softmax(cls):
    s = 25.0
    head = cls(8, 5, s=s, margin=0.0)
    x, label = torch.randn(7, 8), torch.randint(0, 5, (7,))
    loss, acc = head(x, label)
    cos = F.normalize(x, dim=1) @ F.normalize(head.W.detach(), dim=0)
    torch.testing.assert_close(loss, F.cross_entropy(s * cos, label), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, (cos.argmax(1) == label).float().mean() * 100)


@pytest.mark.parametrize("cls", [losses.Amsoftmax, losses.AAMsoftmax])
def test_margin_can_be_reassigned_during_training(cls):
    head = cls(8, 5, s=30.0, margin=0.0)
    x, label = torch.randn(6, 8), torch.randint(0, 5, (6,))
    before, _ = head(x, label)
    head.margin = 0.3  # what train.py's margin warm-up does every step
    after, _ = head(x, label)
    fresh = cls(8, 5, s=30.0, margin=0.3)
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(after, fresh(x, label)[0])
    assert after > before  # a margin makes the task harder


def test_accuracy_is_percent():
    head = losses.AAMsoftmax(4, 4, s=30.0, margin=0.2)
    x = head.W.detach().t().clone()  # each embedding equals its class weight
    _, acc = head(x, torch.arange(4))
    assert acc.item() == pytest.approx(100.0)
    _, acc = head(x, torch.tensor([0, 1, 3, 2]))
    assert acc.item() == pytest.approx(50.0)


@pytest.mark.parametrize("kind", LOSSES)
def test_build_loss(kind):
    head = speaker_model.build_loss({"type": kind, "scale": 30.0, "margin": 0.2}, EMB, 7)
    assert type(head).__name__ == speaker_model.LOSSES[kind]
    loss, acc = head(torch.randn(4, EMB), torch.tensor([0, 1, 6, 3]))
    assert loss.dim() == 0 and torch.isfinite(loss) and 0 <= acc.item() <= 100


# ---------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name,pooling,kind", [
    ("ecapa", "asp", "aamsoftmax"), ("ecapa", "stats", "amsoftmax"), ("ecapa", "gap", "softmax"),
    ("xvector", "asp", "aamsoftmax"), ("xvector", "stats", "softmax"), ("xvector", "gap", "amsoftmax"),
])
def test_gradients_reach_every_parameter(name, pooling, kind):
    model = small_model(name, pooling).train()
    head = speaker_model.build_loss({"type": kind, "scale": 30.0, "margin": 0.2}, EMB, 5)
    x = torch.randn(6, N_MFCC, 30)
    label = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, _ = head(model(x), label)
    loss.backward()
    params = list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    zero = [n for n, p in params if not p.grad.abs().sum() > 0]
    assert len(zero) <= 0.05 * len(params), zero

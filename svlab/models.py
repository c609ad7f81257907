"""Builds the configured embedding network, pooling and loss head; rebuilds them from a checkpoint.

This is the one place that knows every model file: ``xvector.py``, ``ecapa.py``, ``pooling.py``,
``loss.py`` and the package's ``svlab/nets/`` (ResNet34, CAM++) never import each other, and the entry
scripts (``train.py``, ``EER.py``, ...) get their modules from here, so a checkpoint's recorded
``model``/``loss`` config is all it takes to rebuild. Every network takes ``(batch, n_features, frames)``,
``n_features`` being ``svlab.features.feature_dim(cfg["features"])``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import ecapa
import loss as losses
import pooling as poolings
import xvector
from svlab.errors import CheckpointError, ConfigError
from svlab.features import feature_dim
from svlab.nets import campplus, resnet
from svlab.text import excerpt

POOLINGS = {
    "gap": "GlobalAveragePooling",
    "stats": "StatisticsPooling",
    "asp": "AttentiveStatisticsPooling",
}
LOSSES = {
    "softmax": "Softmax",
    "amsoftmax": "Amsoftmax",
    "aamsoftmax": "AAMsoftmax",
}

XVECTOR_STAT_CHANNELS = 1500  # the paper's width of the pooled frame layer (model.stat_channels default)
ASP_ATTENTION_CHANNELS = 128  # attention bottleneck (ECAPA-TDNN paper)
# Largest network built: 1 GB of float32 weights (4 GB with gradients and Adam's state). The lab's
# x-vector has 3.5 million parameters, ECAPA-TDNN with 1024 channels 14.5 million, ResNet34 6.6 and
# CAM++ 7.2 million at their published settings.
MAX_MODEL_PARAMETERS = 250_000_000
_MAX_WIDTH = 10_000_000  # any one width beyond this is refused before even the size is computed


def parameter_count(model_cfg: dict, n_features: int) -> int:
    """Parameters of the network ``build_model`` would build, counted on PyTorch's meta device
    (shapes only: nothing is allocated, and the random number generator is left untouched)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return sum(p.numel() for p in _build(model_cfg, n_features).parameters())


def forward_flops(model_cfg: dict, n_features: int, frames: int = 100) -> int:
    """FLOPs of one forward pass of one utterance of ``frames`` frames (100: one second of audio), as
    ``torch.utils.flop_counter`` counts them (2 per multiply-add of the convolutions and matrix
    products; element-wise work not counted), in eval mode on the meta device (nothing allocated)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _build(model_cfg, n_features).eval()
        x = torch.empty(1, n_features, frames)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def check_model_size(model_cfg: dict, n_features: int) -> None:
    """``ConfigError`` when the settings describe a network that is not a sane size (widths that are
    not positive whole numbers, more than ``MAX_MODEL_PARAMETERS`` parameters), before allocating it."""
    keys = ("channels", "embedding_size", "stat_channels", "base_channels")
    widths = {"n_features": n_features, **{f"model.{k}": model_cfg.get(k) for k in keys if k in model_cfg}}
    for key, v in widths.items():
        if not (isinstance(v, int) and not isinstance(v, bool)) or not 0 < v <= _MAX_WIDTH:
            raise ConfigError(f"{key} is {excerpt(repr(v))}: a network width must be a whole number from 1 to "
                              f"{_MAX_WIDTH}")
    try:
        n = parameter_count(model_cfg, n_features)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"the model settings ({describe_widths(widths)}) make no network "
                          f"({type(e).__name__}: {excerpt(str(e), 120)})") from None
    if n > MAX_MODEL_PARAMETERS:
        raise ConfigError(f"the model settings ({describe_widths(widths)}) make a network of {n:,} parameters, "
                          f"{n * 4 / 2**30:.1f} GiB of weights; at most {MAX_MODEL_PARAMETERS:,} are built: "
                          "use narrower layers (model.channels, model.stat_channels, model.base_channels, "
                          "model.embedding_size)")


def describe_widths(widths: dict) -> str:
    return ", ".join(f"{k}={excerpt(repr(v), 20)}" for k, v in widths.items())


def build_pooling(name: str, channels: int, global_context: bool = True) -> nn.Module:
    """Pooling module ``name`` (gap | stats | asp) for ``channels`` input channels.

    ``asp`` is the channel-dependent attentive statistics pooling of ECAPA-TDNN, with global context
    unless ``global_context=False``; it is the same for both models, so a pooling comparison
    means the same thing on either network.
    """
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling '{name}'; choose one of {', '.join(POOLINGS)}")
    cls = getattr(poolings, POOLINGS[name])
    if name == "asp":
        return cls(channels, attention_channels=ASP_ATTENTION_CHANNELS, global_context=global_context)
    return cls(channels)


def build_model(model_cfg: dict, n_features: int) -> nn.Module:
    """Embedding network from the ``model`` config section; maps ``(batch, n_features, frames)`` to
    ``(batch, embedding_size)`` (``n_features``: ``svlab.features.feature_dim(cfg["features"])``).
    Settings that describe an absurdly large network are refused (``check_model_size``) before
    anything is allocated.

    Poolings: all three for every network. For ResNet34 they pool each channel-frequency row over time
    (``stats`` is WeSpeaker's TSTP, the published system; ``gap`` its TAP; ``asp`` its ASTP with global
    context); for CAM++ ``stats`` is the paper's, ``gap`` and ``asp`` the same poolings as for the
    other networks. Every loss head works with every network (it sees only the embedding).
    """
    check_model_size(model_cfg, n_features)
    return _build(model_cfg, n_features)


def _build(model_cfg: dict, n_features: int) -> nn.Module:
    name = model_cfg["name"]
    if name == "xvector":
        # asp: the same ECAPA-style pooling (channel-dependent, global context) as for ECAPA-TDNN
        stat_channels = model_cfg.get("stat_channels", XVECTOR_STAT_CHANNELS)  # absent in older checkpoints
        pool = build_pooling(model_cfg["pooling"], stat_channels, global_context=True)
        return xvector.Xvector(pool, in_channels=n_features, channels=model_cfg["channels"],
                               stat_channels=stat_channels,
                               embedding_size=model_cfg["embedding_size"])
    if name == "ecapa":
        channels = model_cfg["channels"]
        pool = build_pooling(model_cfg["pooling"], ecapa.ECAPA_TDNN.pooled_channels(channels),
                             global_context=True)
        return ecapa.ECAPA_TDNN(pool, in_channels=n_features, channels=channels,
                                embedding_size=model_cfg["embedding_size"])
    if name == "resnet34":
        base = model_cfg["base_channels"]
        pool = build_pooling(model_cfg["pooling"], resnet.ResNet34.pooled_channels(n_features, base))
        return resnet.ResNet34(pool, in_channels=n_features, base_channels=base,
                               embedding_size=model_cfg["embedding_size"])
    if name == "campplus":
        base = model_cfg["base_channels"]
        pool = build_pooling(model_cfg["pooling"], campplus.CAMPPlus.pooled_channels(base))
        return campplus.CAMPPlus(pool, in_channels=n_features, base_channels=base,
                                 embedding_size=model_cfg["embedding_size"])
    raise ValueError(f"unknown model '{name}'")


def build_loss(loss_cfg: dict, embedding_size: int, num_classes: int) -> nn.Module:
    """Classification head from the ``loss`` config section (returns ``(loss, acc)``)."""
    kind = loss_cfg["type"]
    if kind not in LOSSES:
        raise ValueError(f"unknown loss '{kind}'; choose one of {', '.join(LOSSES)}")
    cls = getattr(losses, LOSSES[kind])
    if kind == "softmax":
        return cls(embedding_size, num_classes)
    return cls(embedding_size, num_classes, s=loss_cfg["scale"], margin=loss_cfg["margin"])


def model_from_checkpoint(state: dict, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the embedding network recorded in a checkpoint, weights loaded, in eval mode."""
    cfg = state["config"]
    try:
        model = build_model(cfg["model"], feature_dim(cfg["features"]))
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint describes a network that is not built: {e}") from None
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def describe(model_cfg: dict, loss_cfg: dict) -> str:
    """``xvector_gap_softmax``-style tag of a configuration."""
    return f"{model_cfg['name']}_{model_cfg['pooling']}_{loss_cfg['type']}"

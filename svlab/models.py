"""Builds the configured embedding network, pooling and loss head; rebuilds them from a checkpoint.

This is the one place that knows every model file: ``xvector.py``, ``ecapa.py``, ``pooling.py`` and
``loss.py`` never import each other, and the entry scripts (``train.py``, ``EER.py``, ...) get their
modules from here, so a checkpoint's recorded ``model``/``loss`` config is all it takes to rebuild.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import ecapa
import loss as losses
import pooling as poolings
import xvector

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


def build_model(model_cfg: dict, n_mfcc: int) -> nn.Module:
    """Embedding network from the ``model`` config section; maps ``(batch, n_mfcc, frames)`` to
    ``(batch, embedding_size)``."""
    name = model_cfg["name"]
    if name == "xvector":
        # asp: the same ECAPA-style pooling (channel-dependent, global context) as for ECAPA-TDNN
        stat_channels = model_cfg.get("stat_channels", XVECTOR_STAT_CHANNELS)  # absent in older checkpoints
        pool = build_pooling(model_cfg["pooling"], stat_channels, global_context=True)
        return xvector.Xvector(pool, in_channels=n_mfcc, channels=model_cfg["channels"],
                               stat_channels=stat_channels,
                               embedding_size=model_cfg["embedding_size"])
    if name == "ecapa":
        channels = model_cfg["channels"]
        pool = build_pooling(model_cfg["pooling"], ecapa.ECAPA_TDNN.pooled_channels(channels),
                             global_context=True)
        return ecapa.ECAPA_TDNN(pool, in_channels=n_mfcc, channels=channels,
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
    model = build_model(cfg["model"], cfg["features"]["n_mfcc"])
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def describe(model_cfg: dict, loss_cfg: dict) -> str:
    """``xvector_gap_softmax``-style tag of a configuration."""
    return f"{model_cfg['name']}_{model_cfg['pooling']}_{loss_cfg['type']}"

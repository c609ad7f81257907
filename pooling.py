"""Temporal pooling: frame-level features ``(batch, channels, frames)`` -> one vector per utterance.

Every pooling takes an optional ``lengths`` tensor ``(batch,)`` with the number of valid frames of
each item; frames past an item's length are padding and never change its pooled value. Each class
exposes ``output_dim`` so a model can size the layer that follows without knowing which pooling it got.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def frame_mask(lengths: torch.Tensor | None, frames: int, like: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, frames)`` mask, 1.0 on valid frames; all ones when ``lengths`` is None."""
    if lengths is None:
        return torch.ones(like.shape[0], 1, frames, dtype=like.dtype, device=like.device)
    idx = torch.arange(frames, device=like.device)
    return (idx[None, :] < lengths.to(like.device)[:, None]).to(like.dtype).unsqueeze(1)


def masked_mean_std(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation over frames; ``mask`` sums to 1 or counts frames."""
    weight = mask / mask.sum(dim=2, keepdim=True).clamp_min(eps)
    mean = (x * weight).sum(dim=2)
    var = ((x - mean.unsqueeze(2)).pow(2) * weight).sum(dim=2)
    return mean, var.clamp_min(eps).sqrt()


class GlobalAveragePooling(nn.Module):
    """The lab's pooling: mean over frames.

    Input ``(batch, channels, frames)`` (e.g. ``(64, 1500, 86)``), output ``(batch, channels)``
    (e.g. ``(64, 1500)``).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.output_dim = channels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return x.mean(dim=2)
        mask = frame_mask(lengths, x.shape[2], x)
        return (x * mask).sum(dim=2) / mask.sum(dim=2).clamp_min(1.0)


class StatisticsPooling(nn.Module):
    """Mean and standard deviation over frames, concatenated (Snyder et al., ICASSP 2018).

    Input ``(batch, channels, frames)``, output ``(batch, 2 * channels)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.output_dim = 2 * channels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = masked_mean_std(x, frame_mask(lengths, x.shape[2], x))
        return torch.cat([mean, std], dim=1)

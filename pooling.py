"""Temporal pooling: frame-level features ``(batch, channels, frames)`` -> one vector per utterance.

Every pooling takes an optional ``lengths`` tensor ``(batch,)`` with the number of valid frames of
each item; frames past an item's length are padding and never change its pooled value. Each class
exposes ``channels`` (the input width it was built for) and ``output_dim`` so a model can size the
layer that follows without knowing which pooling it got.

==========================  ===================================  =============================
class                        input                                output
==========================  ===================================  =============================
GlobalAveragePooling         ``(batch, channels, frames)``        ``(batch, channels)``
StatisticsPooling            ``(batch, channels, frames)``        ``(batch, 2 * channels)``
AttentiveStatisticsPooling   ``(batch, channels, frames)``        ``(batch, 2 * channels)``
==========================  ===================================  =============================
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
    """Weighted mean and standard deviation over frames; ``mask`` sums to 1 or counts frames.

    ``x`` is ``(batch, channels, frames)``; ``mask`` is ``(batch, 1, frames)`` (the same weights for
    every channel) or ``(batch, channels, frames)`` (per-channel weights, e.g. attention). Returns two
    ``(batch, channels)`` tensors. The variance is taken around the weighted mean (not as
    ``E[x^2] - mean^2``, which cancels badly) and clamped at ``eps`` before the square root.
    """
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
        self.channels = channels
        self.output_dim = channels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is not None:  # a zero-padded batch: average each item's valid frames only
            mask = frame_mask(lengths, x.shape[2], x)
            return (x * mask).sum(dim=2) / mask.sum(dim=2).clamp_min(1.0)
        # Handout step 2.1: the mean over the frames (dimension 2).
        # =====> code <=====
        return x.mean(dim=2)
        # =====> code <=====


class StatisticsPooling(nn.Module):
    """Mean and standard deviation over frames, concatenated (Snyder et al., ICASSP 2018).

    Input ``(batch, channels, frames)``, output ``(batch, 2 * channels)`` laid out as
    ``[mean, std]``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.output_dim = 2 * channels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = masked_mean_std(x, frame_mask(lengths, x.shape[2], x))
        return torch.cat([mean, std], dim=1)


class AttentiveStatisticsPooling(nn.Module):
    """Attentive statistics pooling: attention-weighted mean and standard deviation over frames.

    Okabe et al., "Attentive Statistics Pooling for Deep Speaker Embedding" (Interspeech 2018), in
    the channel- and context-dependent form of ECAPA-TDNN (Desplanques et al., Interspeech 2020,
    section 3.1). For every frame ``t`` and channel ``c`` a score

        ``e[t, c] = v_c^T tanh(W g_t + b) + k_c``

    is computed, where ``g_t`` is the frame ``h_t`` itself, or, with ``global_context=True``,
    ``h_t`` concatenated with the utterance's (unweighted) mean and standard deviation over its valid
    frames. ``W, b`` is a 1x1 convolution to ``attention_channels`` (the paper's bottleneck, 128) and
    ``v, k`` a 1x1 convolution back to ``channels`` (the paper's equation, as in wespeaker;
    SpeechBrain and voxceleb_trainer put ReLU + BatchNorm before the tanh, 256 more parameters). A softmax over the frames of each channel gives
    the weights ``alpha[t, c]``; the output is the weighted mean and the weighted standard deviation
    ``sqrt(sum_t alpha (h - mean)^2)``, concatenated ``[mean, std]``.

    With ``channel_dependent=False`` the second convolution has one output, so all channels share
    one weight per frame: Okabe et al.'s original (channel-independent) attention.

    Padding: scores of frames past ``lengths`` are set to ``-inf`` before the softmax (weight exactly
    0), and the global-context mean/std use only valid frames, so padding never changes the result.
    (The layer has no BatchNorm, so this holds in training mode as well.)

    Shapes: input ``(batch, channels, frames)``; context ``(batch, 3 * channels, frames)`` with
    global context; scores and weights ``(batch, channels, frames)`` (``(batch, 1, frames)`` when
    channel-independent); output ``(batch, 2 * channels)``.
    """

    def __init__(self, channels: int, attention_channels: int = 128, global_context: bool = True,
                 channel_dependent: bool = True):
        super().__init__()
        self.channels = channels
        self.output_dim = 2 * channels
        self.global_context = global_context
        self.channel_dependent = channel_dependent
        in_channels = 3 * channels if global_context else channels
        self.attention = nn.Sequential(
            nn.Conv1d(in_channels, attention_channels, kernel_size=1),
            nn.Tanh(),
            nn.Conv1d(attention_channels, channels if channel_dependent else 1, kernel_size=1),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.shape[2]
        if lengths is not None:
            lengths = lengths.clamp(min=1, max=frames)  # a zero-length item would make the softmax NaN
        mask = frame_mask(lengths, frames, x)  # (batch, 1, frames)
        if self.global_context:
            mean, std = masked_mean_std(x, mask)
            context = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, frames),
                                 std.unsqueeze(2).expand(-1, -1, frames)], dim=1)
        else:
            context = x
        scores = self.attention(context)
        if lengths is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # softmax over hundreds of frames in float32 under autocast
        alpha = torch.softmax(scores, dim=2).to(x.dtype)
        mean, std = masked_mean_std(x, alpha)
        return torch.cat([mean, std], dim=1)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, global_context={self.global_context}, "
                f"channel_dependent={self.channel_dependent}")

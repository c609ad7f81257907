"""ResNet34 r-vector as WeSpeaker builds it: a 2-D residual network over the time-frequency plane.

References: Zeinali et al., "BUT System Description to VoxCeleb Speaker Recognition Challenge 2019"
(arXiv 1910.12592), the r-vector; Wang et al., "WeSpeaker: A research and production oriented speaker
embedding learning toolkit" (ICASSP 2023), whose ``wespeaker/models/resnet.py`` (``ResNet34``,
``two_emb_layer=False``) is the layout followed here.

Layers (C = ``base_channels``, F = ``in_channels`` features, T = frames; ``ceil(n / 2)`` at each
stride-2 stage, so F3 = ceil(F / 8) and T3 = ceil(T / 8)); every convolution is 3x3, zero-padded,
without bias, followed by BatchNorm:

===========================================  ===================================  ====================
layer                                        output shape                         80 fbank, C = 32
===========================================  ===================================  ====================
input features, a one-channel image          ``(batch, 1, F, T)``                 ``(B, 1, 80, T)``
conv 3x3 + BN + ReLU                         ``(batch, C, F, T)``                 ``(B, 32, 80, T)``
stage 1: 3 BasicBlocks                       ``(batch, C, F, T)``                 ``(B, 32, 80, T)``
stage 2: 4 BasicBlocks, first with stride 2  ``(batch, 2C, F1, T1)``              ``(B, 64, 40, T1)``
stage 3: 6 BasicBlocks, first with stride 2  ``(batch, 4C, F2, T2)``              ``(B, 128, 20, T2)``
stage 4: 3 BasicBlocks, first with stride 2  ``(batch, 8C, F3, T3)``              ``(B, 256, 10, T3)``
channels x frequency flattened               ``(batch, 8C * F3, T3)``             ``(B, 2560, T3)``
pooling (injected)                           ``(batch, pooling.output_dim)``      ``(B, 5120)`` (stats)
Linear                                       ``(batch, embedding_size)``          ``(B, 256)``
===========================================  ===================================  ====================

BasicBlock: conv3x3(stride) + BN + ReLU -> conv3x3 + BN, plus the input (through a strided 1x1 conv +
BN where the shape changes), then ReLU. Poolings (``model.pooling``), all over time, of each of the
8C * F3 channel-frequency rows: ``stats`` (mean and standard deviation, WeSpeaker's TSTP, the published
system), ``gap`` (the mean, WeSpeaker's TAP) and ``asp`` (this kit's attentive statistics, WeSpeaker's
ASTP with global context). WeSpeaker's stats dimension ``int(F / 8) * 8C`` assumes F divisible by 8;
here F3 = ceil(F / 8), so 20 or 40 MFCCs work too.

Size at the published settings (80 fbank, C = 32, stats pooling, embedding 256): 6,634,336 parameters;
WeSpeaker's ``examples/voxceleb/v2`` README lists ResNet34-TSTP-emb256 at 6.63 M. Forward cost per
second of audio (100 frames, one utterance), counted by ``torch.utils.flop_counter`` (2 FLOPs per
multiply-add; ``svlab.models.forward_flops``): 4.56 GFLOPs, 99 % of them in the 3x3 convolutions.
(WeSpeaker's 4.55 G is ``thop``'s count of multiply-adds for 200 frames: the same work.)

Padding: ``forward(x, lengths)`` zeroes the frames past each item's length before every 3x3
convolution (lengths become ceil(length / 2) at each stride-2 stage) and pools only valid frames. A
stride-2 convolution's last valid output then sees exactly the zeros an unpadded item's own padding
gives, so in eval mode a padded item's embedding equals the item's alone (to float rounding),
whatever the padding holds. In training mode BatchNorm's batch statistics include the padded frames,
so there it does not; training uses equal-length crops, and evaluation embeds equal-length batches.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def ceil_half(n):
    """Frames (or bins) after a stride-2, kernel-3, padding-1 convolution: ``ceil(n / 2)`` (ints or tensors)."""
    return (n + 1) // 2


def time_mask(lengths: torch.Tensor | None, frames: int, like: torch.Tensor) -> torch.Tensor | None:
    """1.0 on valid frames, 0.0 on padding: ``(batch, 1, frames)`` for a 3-D ``like``,
    ``(batch, 1, 1, frames)`` for a 4-D one; None when ``lengths`` is None."""
    if lengths is None:
        return None
    idx = torch.arange(frames, device=like.device)
    mask = (idx[None, :] < lengths.to(like.device)[:, None]).to(like.dtype)
    return mask.view(mask.shape[0], *([1] * (like.dim() - 2)), frames)


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions (He et al. 2016).

    ``(batch, in_channels, F, T)`` -> ``(batch, channels, ceil(F / sf), ceil(T / st))`` for
    ``stride = (sf, st)`` (1 or 2 each; an int means both). ``mask_in`` / ``mask_out``: time masks at
    the input and output frame rates (``time_mask``), applied before each 3x3 convolution.
    """

    def __init__(self, in_channels: int, channels: int, stride: int | tuple[int, int] = 1):
        super().__init__()
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != (1, 1) or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor, mask_in: torch.Tensor | None = None,
                mask_out: torch.Tensor | None = None) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(masked(x, mask_in))))
        out = self.bn2(self.conv2(masked(out, mask_out)))
        # the shortcut is per-frame (1x1; stride 2 samples frames 2j, valid for every valid output j)
        return F.relu(out + self.shortcut(x))


class ResNet34(nn.Module):
    """ResNet34 r-vector embedding network.

    Args:
        pooling: a module from ``pooling.py`` built for ``pooled_channels(in_channels, base_channels)``
            channels; it maps ``(batch, 8C * F3, T3)`` to ``(batch, pooling.output_dim)``.
        in_channels: feature dimension F (``svlab.features.feature_dim``; 80 fbank in WeSpeaker).
        base_channels: C, the width of stage 1 (32 in WeSpeaker; stages 2-4 have 2C, 4C, 8C).
        embedding_size: output dimension (256 in WeSpeaker's ResNet34-TSTP-emb256).

    ``forward(x, lengths=None)``: ``x`` ``(batch, in_channels, frames)``, any number of frames;
    ``lengths`` (optional, ``(batch,)``) counts the valid frames of padded items. Returns
    ``(batch, embedding_size)``.
    """

    BLOCKS = (3, 4, 6, 3)

    def __init__(self, pooling: nn.Module, in_channels: int = 80, base_channels: int = 32,
                 embedding_size: int = 256):
        super().__init__()
        pooled = self.pooled_channels(in_channels, base_channels)
        if getattr(pooling, "channels", pooled) != pooled:
            raise ValueError(f"the pooling was built for {pooling.channels} channels, but ResNet34 with "
                             f"{in_channels} features and C={base_channels} pools {pooled}; build it with "
                             f"ResNet34.pooled_channels({in_channels}, {base_channels})")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.embedding_size = embedding_size
        self.conv1 = nn.Conv2d(1, base_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        stages, width = [], base_channels
        for i, n in enumerate(self.BLOCKS):
            out = base_channels * 2 ** i
            stages.append(nn.ModuleList([BasicBlock(width, out, 1 if i == 0 else 2)]
                                        + [BasicBlock(out, out) for _ in range(n - 1)]))
            width = out
        self.stages = nn.ModuleList(stages)
        self.pooling = pooling
        self.embedding = nn.Linear(pooling.output_dim, embedding_size)

    @staticmethod
    def output_bins(in_channels: int) -> int:
        """Frequency bins after the three stride-2 stages: ``ceil(F / 8)``."""
        return ceil_half(ceil_half(ceil_half(in_channels)))

    @classmethod
    def pooled_channels(cls, in_channels: int, base_channels: int) -> int:
        """Rows the pooling receives: ``8 * base_channels * ceil(in_channels / 8)`` (2560 at 80, 32)."""
        return 8 * base_channels * cls.output_bins(in_channels)

    @staticmethod
    def output_frames(frames):
        """Frames reaching the pooling: ``ceil(frames / 8)`` (ints or tensors)."""
        return ceil_half(ceil_half(ceil_half(frames)))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            hint = (" it looks like (batch, frames, feat): pass x.transpose(1, 2)"
                    if x.dim() == 3 and x.shape[2] == self.in_channels else "")
            raise ValueError(f"ResNet34 expects (batch, {self.in_channels}, frames), got {tuple(x.shape)};{hint}")
        h = x.unsqueeze(1)                                          # (batch, 1, F, T)
        if lengths is not None:
            lengths = lengths.to(x.device).clamp(min=1, max=x.shape[2])
        mask = time_mask(lengths, h.shape[-1], h)
        h = F.relu(self.bn1(self.conv1(masked(h, mask))))           # (batch, C, F, T)
        frames = h.shape[-1]
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                mask_in = mask
                if i > 0 and j == 0:                                # the stride-2 block of stages 2-4
                    frames = ceil_half(frames)
                    lengths = None if lengths is None else ceil_half(lengths)
                    mask = time_mask(lengths, frames, h)
                h = block(h, mask_in, mask)
        b, c, f, t = h.shape
        pooled = self.pooling(h.reshape(b, c * f, t), lengths)      # (batch, pooling.output_dim)
        return self.embedding(pooled)                               # (batch, embedding_size)

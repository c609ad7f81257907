"""ECAPA-TDNN (Desplanques, Thienpondt, Demuynck, "ECAPA-TDNN: Emphasized Channel Attention,
Propagation and Aggregation in TDNN Based Speaker Verification", Interspeech 2020, arXiv 2005.07143).

Layers (paper Fig. 2; C = ``channels``, T = frames; every layer keeps T, convolutions are
zero-padded "same"):

====================================================  =================================
layer                                                 output shape
====================================================  =================================
input features                                        ``(batch, in_channels, T)``
Conv1D(k=5) + ReLU + BN                               ``(batch, C, T)``
SE-Res2Block (k=3, d=2, scale 8)                      ``(batch, C, T)``
SE-Res2Block (k=3, d=3, scale 8)                      ``(batch, C, T)``
SE-Res2Block (k=3, d=4, scale 8)                      ``(batch, C, T)``
concat of the three block outputs (MFA)               ``(batch, 3C, T)``
Conv1D(k=1) + ReLU                                    ``(batch, P, T)``, P = 1536
pooling (injected; attentive statistics in the paper) ``(batch, pooling.output_dim)`` (2P = 3072)
BN                                                    ``(batch, pooling.output_dim)``
FC + BN                                               ``(batch, embedding_size)`` (192)
====================================================  =================================

SE-Res2Block (paper Fig. 1): Conv1D(k=1)+ReLU+BN -> Res2 dilated Conv1D(k=3, d)+ReLU+BN with scale 8
-> Conv1D(k=1)+ReLU+BN -> SE block (bottleneck 128) -> + residual. Res2: the C channels are split
into 8 groups x_1..x_8; y_1 = x_1, y_2 = K_2(x_2), y_i = K_i(x_i + y_{i-1}), each K_i a dilated
conv + ReLU + BN on C/8 channels. SE: s = sigmoid(W_2 ReLU(W_1 mean_t(h) + b_1) + b_2), h * s.

Choices, following the paper where it is explicit:

* Summed residual connections (paper section 3.4): the input of each SE-Res2Block is the sum of the
  outputs of the first conv layer and of every SE-Res2Block before it (Fig. 2 omits these arrows).
* The MFA conv has ReLU and no BN (as in Fig. 2). Its width P is ``pooled_channels(C)`` =
  ``min(3C, 1536)``: the paper's 1536 for both C = 512 and C = 1024 (3072 for C = 1024 would give
  about 20.7M parameters instead of the published 14.7M), and 3C for the narrow models used in
  tests and CPU labs so the MFA layer does not dwarf them.
* BN after the FC layer, as in Fig. 2 ("FC + BN"); the SpeechBrain lobe has no BN there.
* Zero "same" padding (SpeechBrain pads by reflection). With ``lengths`` the model zeroes padded
  frames before every convolution wider than 1 and the SE means use valid frames only, so a padded
  item's embedding equals that of the unpadded item in eval mode (in training mode BatchNorm
  statistics include padded frames; training uses equal-length crops, so that never arises).

Parameter counts measured with 80 input features, embedding 192 and attentive statistics pooling
with global context (attention bottleneck 128):
C = 512: 6,191,104 (paper: 6.2M); C = 1024: 14,657,472 (paper: 14.7M). Both round to the paper's
figures; the BN after the FC layer adds 384 of them.

Input layout: every model in this project takes ``(batch, n_mfcc, frames)`` (channels first, what
``nn.Conv1d`` wants). Reference implementations (SpeechBrain, wespeaker) take
``(batch, frames, feat)`` and transpose dims 1 and 2 inside ``forward``; to feed such a tensor
here, call ``model(x.transpose(1, 2))``. ``forward`` checks ``x.shape[1] == in_channels`` and says
so when the layout looks transposed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MFA_CHANNELS = 1536  # output of the multi-layer feature aggregation conv in the paper


def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded frames: ``x`` ``(batch, channels, frames)``, ``mask`` ``(batch, 1, frames)`` or None."""
    return x if mask is None else x * mask


class ConvReluBn(nn.Module):
    """Conv1d (zero "same" padding) -> ReLU -> BatchNorm1d.

    ``(batch, in_channels, frames)`` -> ``(batch, out_channels, frames)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                              padding=(kernel_size - 1) // 2 * dilation)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv.kernel_size[0] > 1:  # a 1x1 conv never mixes padded frames into valid ones
            x = _mask(x, mask)
        return self.norm(F.relu(self.conv(x)))


class Res2Conv(nn.Module):
    """Res2Net dilated convolution (Gao et al., 2019) with ``scale`` groups.

    ``(batch, channels, frames)`` -> ``(batch, channels, frames)``; the groups are
    ``(batch, channels // scale, frames)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, scale: int = 8):
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels ({channels}) must be divisible by the Res2Net scale ({scale})")
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(
            [ConvReluBn(width, width, kernel_size, dilation) for _ in range(scale - 1)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        groups = torch.chunk(x, self.scale, dim=1)
        out = [groups[0]]  # y_1 = x_1
        y = None
        for block, g in zip(self.blocks, groups[1:]):
            y = block(g if y is None else g + y, mask)
            out.append(y)
        return torch.cat(out, dim=1)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation over channels (Hu et al., 2018), squeezing by the mean over valid frames.

    ``(batch, channels, frames)`` -> same shape; the gate is ``(batch, channels)``.
    """

    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(channels, bottleneck)
        self.fc2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            z = x.mean(dim=2)
        else:
            z = (x * mask).sum(dim=2) / mask.sum(dim=2).clamp_min(1.0)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(z))))
        return x * s.unsqueeze(2)


class SERes2Block(nn.Module):
    """1x1 ConvReluBn -> Res2Conv -> 1x1 ConvReluBn -> SE, plus the input (residual).

    ``(batch, channels, frames)`` -> ``(batch, channels, frames)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, scale: int = 8,
                 se_bottleneck: int = 128):
        super().__init__()
        self.conv_in = ConvReluBn(channels, channels, 1)
        self.res2 = Res2Conv(channels, kernel_size, dilation, scale)
        self.conv_out = ConvReluBn(channels, channels, 1)
        self.se = SqueezeExcitation(channels, se_bottleneck)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_in(x)
        h = self.res2(h, mask)
        h = self.conv_out(h)
        return self.se(h, mask) + x


class ECAPA_TDNN(nn.Module):
    """ECAPA-TDNN embedding network.

    Args:
        pooling: a module from ``pooling.py`` built for ``pooled_channels(channels)`` channels (the
            paper: ``AttentiveStatisticsPooling(1536, 128, global_context=True)``); it maps
            ``(batch, P, frames)`` to ``(batch, pooling.output_dim)``.
        in_channels: feature dimension (``features.n_mfcc``; 80 filter banks in the paper).
        channels: C, the width of the SE-Res2Blocks (512 or 1024 in the paper); divisible by ``scale``.
        embedding_size: output dimension (192 in the paper).
        scale: Res2Net scale (8).
        se_bottleneck: SE bottleneck width (128).
        mfa_channels: P, the width of the aggregation conv; default ``pooled_channels(channels)``.

    ``forward(x, lengths=None)``: ``x`` is ``(batch, in_channels, frames)`` (transpose a
    ``(batch, frames, feat)`` tensor with ``x.transpose(1, 2)`` first); ``lengths`` (optional,
    ``(batch,)``) counts the valid frames of padded items; the frame count is kept through the
    network, so it goes to the pooling unchanged. Returns ``(batch, embedding_size)``.
    """

    DILATIONS = (2, 3, 4)

    def __init__(self, pooling: nn.Module, in_channels: int = 80, channels: int = 512,
                 embedding_size: int = 192, scale: int = 8, se_bottleneck: int = 128,
                 mfa_channels: int | None = None):
        super().__init__()
        mfa_channels = self.pooled_channels(channels) if mfa_channels is None else mfa_channels
        pooled = getattr(pooling, "channels", mfa_channels)
        if pooled != mfa_channels:
            raise ValueError(f"the pooling was built for {pooled} channels, but ECAPA-TDNN with C={channels} "
                             f"pools {mfa_channels}; build it with ECAPA_TDNN.pooled_channels({channels})")
        self.in_channels = in_channels
        self.channels = channels
        self.mfa_channels = mfa_channels
        self.embedding_size = embedding_size
        self.layer0 = ConvReluBn(in_channels, channels, kernel_size=5)
        self.blocks = nn.ModuleList([
            SERes2Block(channels, kernel_size=3, dilation=d, scale=scale, se_bottleneck=se_bottleneck)
            for d in self.DILATIONS
        ])
        self.mfa = nn.Conv1d(len(self.DILATIONS) * channels, mfa_channels, kernel_size=1)
        self.pooling = pooling
        self.pool_norm = nn.BatchNorm1d(pooling.output_dim)
        self.embedding = nn.Linear(pooling.output_dim, embedding_size)
        self.embedding_norm = nn.BatchNorm1d(embedding_size)

    @staticmethod
    def pooled_channels(channels: int) -> int:
        """Channels the pooling receives (the MFA conv's width): ``min(3 * channels, 1536)``.

        1536 for C = 512 and for C = 1024, as in the paper (which is what reproduces its 6.2M and
        14.7M parameters); 3C for narrower models.
        """
        return min(3 * channels, MFA_CHANNELS)

    @staticmethod
    def output_frames(frames: int | torch.Tensor) -> int | torch.Tensor:
        """Frames reaching the pooling: all of them ("same" padding)."""
        return frames

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            hint = (" it looks like (batch, frames, feat): pass x.transpose(1, 2)"
                    if x.dim() == 3 and x.shape[2] == self.in_channels else "")
            raise ValueError(f"ECAPA-TDNN expects (batch, {self.in_channels}, frames), got "
                             f"{tuple(x.shape)};{hint}")
        mask = None
        if lengths is not None:
            idx = torch.arange(x.shape[2], device=x.device)
            mask = (idx[None, :] < lengths.to(x.device)[:, None]).to(x.dtype).unsqueeze(1)
        h = self.layer0(x, mask)
        summed, outs = h, []
        for block in self.blocks:
            out = block(summed, mask)
            outs.append(out)
            summed = summed + out
        h = F.relu(self.mfa(torch.cat(outs, dim=1)))
        pooled = self.pooling(h, lengths)
        return self.embedding_norm(self.embedding(self.pool_norm(pooled)))

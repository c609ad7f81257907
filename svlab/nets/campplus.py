"""CAM++: a densely connected TDNN with context-aware masking and a 2-D convolutional front.

Reference: Wang, Zheng, Chen, Cheng, Chen, "CAM++: A Fast and Efficient Network for Speaker
Verification Using Context-Aware Masking" (Interspeech 2023, arXiv 2303.00332), released in
3D-Speaker (``speakerlab/models/campplus/DTDNN.py``, whose widths and layer order are followed here).

Widths scale with g = ``base_channels`` (the paper: g = 32): FCM width g, growth rate g, bottleneck
4g, first TDNN 4g. F = ``in_channels`` features, T = frames, F3 = ceil(F / 8), T' = ceil(T / 2):

=====================================================  ==============================  ====================
layer                                                  output shape                    80 fbank, g = 32
=====================================================  ==============================  ====================
input features, a one-channel image                    ``(batch, 1, F, T)``            ``(B, 1, 80, T)``
FCM: conv 3x3 + BN + ReLU                              ``(batch, g, F, T)``            ``(B, 32, 80, T)``
FCM: 2 + 2 BasicBlocks, each pair's first with         ``(batch, g, ceil(F / 4), T)``  ``(B, 32, 20, T)``
frequency stride 2
FCM: conv 3x3, frequency stride 2 + BN + ReLU          ``(batch, g, F3, T)``           ``(B, 32, 10, T)``
channels x frequency flattened                         ``(batch, g * F3, T)``          ``(B, 320, T)``
TDNN: conv k=5, time stride 2 + BN + ReLU              ``(batch, 4g, T')``             ``(B, 128, T')``
D-TDNN block 1: 12 CAM layers (k=3, d=1), dense        ``(batch, 16g, T')``            ``(B, 512, T')``
transit: BN + ReLU + conv 1x1 halving                  ``(batch, 8g, T')``             ``(B, 256, T')``
D-TDNN block 2: 24 CAM layers (k=3, d=2) + transit     ``(batch, 16g, T')``            ``(B, 512, T')``
D-TDNN block 3: 16 CAM layers (k=3, d=2) + transit     ``(batch, 16g, T')``            ``(B, 512, T')``
BN + ReLU                                              ``(batch, 16g, T')``            ``(B, 512, T')``
pooling (injected; statistics in the paper)            ``(batch, pooling.output_dim)`` ``(B, 1024)``
Linear (no bias) + BN without affine parameters        ``(batch, embedding_size)``     ``(B, 512)``
=====================================================  ==============================  ====================

A CAM layer (D-TDNN layer with context-aware masking): BN + ReLU + conv 1x1 to the 4g bottleneck +
BN + ReLU = h; its output is ``conv_k,d(h) * sigmoid(W2 relu(W1 (mean_T(h) + segment_mean(h))))``,
the context being the utterance mean plus the mean of the 100-frame segment (at the TDNN's halved
frame rate: 2 s of audio) each frame is in; a dense block concatenates each layer's g new channels
to its input. Poolings (``model.pooling``): ``stats`` (mean and standard deviation, the paper's),
``gap`` and ``asp`` (this kit's attentive statistics), all over the 16g channels.

Size at the published settings (80 fbank, g = 32, stats pooling, embedding 512): 7,176,224
parameters (the CAM++ paper, table 1, and WeSpeaker's ``examples/voxceleb/v2`` README: 7.18 M).
Forward cost per second of audio (100 frames, one utterance), counted by ``torch.utils.flop_counter``
(2 FLOPs per multiply-add of convolutions and matrix products; ``svlab.models.forward_flops``):
1.13 GFLOPs, a quarter of ResNet34's for about the same number of parameters. (WeSpeaker lists
1.15 G, ``thop``'s multiply-adds of 200 frames, which is the same work; thop also counts some
element-wise operations.) The FCM head's ceil(F / 8) bins (3D-Speaker: F // 8) let F be any size.

Padding: ``forward(x, lengths)`` zeroes the frames past each item's length before every convolution
that spans frames (the FCM's 3x3, the stride-2 TDNN, the CAM layers' k=3) and takes the CAM context
means and the pooling over valid frames only (lengths become ceil(length / 2) after the TDNN). In eval
mode a padded item's embedding then equals the item's alone (to float rounding), whatever the padding
holds; in training mode BatchNorm's batch statistics include the padded frames, so there it does not
(training uses equal-length crops, and evaluation embeds equal-length batches).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from svlab.nets.resnet import BasicBlock, ceil_half, masked, time_mask

SEGMENT_FRAMES = 100   # CAM context segment, in frames at the TDNN's rate (3D-Speaker's seg_len)
DENSE_LAYERS = (12, 24, 16)
DILATIONS = (1, 2, 2)


def segment_mean(x: torch.Tensor, mask: torch.Tensor | None, segment: int = SEGMENT_FRAMES) -> torch.Tensor:
    """Each frame's segment mean: ``x`` ``(batch, channels, T)`` cut into ``segment``-frame pieces (the
    last one shorter), each averaged over its (valid) frames, spread back to ``(batch, channels, T)``.
    Without ``mask`` this is ``avg_pool1d(x, segment, segment, ceil_mode=True)`` repeated."""
    frames = x.shape[-1]
    if mask is None:
        seg = F.avg_pool1d(x, segment, segment, ceil_mode=True)
    else:
        pad = -frames % segment
        b, c = x.shape[:2]
        sums = F.pad(x * mask, (0, pad)).view(b, c, -1, segment).sum(-1)
        counts = F.pad(mask, (0, pad)).view(b, 1, -1, segment).sum(-1)
        seg = sums / counts.clamp_min(1.0)
    return seg.repeat_interleave(segment, dim=-1)[..., :frames]


class CAMLayer(nn.Module):
    """One D-TDNN layer with context-aware masking: ``(batch, in_channels, T)`` -> ``(batch, growth, T)``.

    ``mask`` ``(batch, 1, T)`` (or None) marks the valid frames."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm1d(in_channels)
        self.squeeze = nn.Conv1d(in_channels, bottleneck, 1, bias=False)
        self.norm2 = nn.BatchNorm1d(bottleneck)
        self.local = nn.Conv1d(bottleneck, growth, kernel_size, padding=(kernel_size - 1) // 2 * dilation,
                               dilation=dilation, bias=False)
        self.context1 = nn.Conv1d(bottleneck, bottleneck // 2, 1)
        self.context2 = nn.Conv1d(bottleneck // 2, growth, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.norm2(self.squeeze(F.relu(self.norm1(x)))))      # (batch, bottleneck, T)
        y = self.local(masked(h, mask))                                   # (batch, growth, T)
        if mask is None:
            utterance = h.mean(-1, keepdim=True)
        else:
            utterance = (h * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1.0)
        context = utterance + segment_mean(h, mask)                       # (batch, bottleneck, T)
        return y * torch.sigmoid(self.context2(F.relu(self.context1(context))))


class DenseBlock(nn.ModuleList):
    """``layers`` CAM layers, each fed the concatenation of the block input and all earlier outputs:
    ``(batch, C, T)`` -> ``(batch, C + layers * growth, T)``."""

    def __init__(self, layers: int, in_channels: int, growth: int, bottleneck: int, dilation: int):
        super().__init__([CAMLayer(in_channels + i * growth, growth, bottleneck, 3, dilation) for i in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x, mask)], dim=1)
        return x


class Transit(nn.Sequential):
    """BN + ReLU + conv 1x1 (no bias): ``(batch, in_channels, T)`` -> ``(batch, out_channels, T)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.BatchNorm1d(in_channels), nn.ReLU(), nn.Conv1d(in_channels, out_channels, 1, bias=False))


class FCM(nn.Module):
    """The 2-D convolutional front (FCM): ``(batch, F, T)`` -> ``(batch, g * ceil(F / 8), T)``; frequency
    is strided, time is not. ``mask`` ``(batch, 1, 1, T)`` (or None) marks the valid frames."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.blocks = nn.ModuleList([BasicBlock(channels, channels, (2, 1)), BasicBlock(channels, channels),
                                     BasicBlock(channels, channels, (2, 1)), BasicBlock(channels, channels)])
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * ceil_half(ceil_half(ceil_half(in_channels)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(masked(x.unsqueeze(1), mask))))
        for block in self.blocks:
            h = block(h, mask, mask)
        h = F.relu(self.bn2(self.conv2(masked(h, mask))))
        b, c, f, t = h.shape
        return h.reshape(b, c * f, t)


class CAMPPlus(nn.Module):
    """CAM++ embedding network.

    Args:
        pooling: a module from ``pooling.py`` built for ``pooled_channels(base_channels)`` channels (16g;
            the paper: statistics pooling of 512); it maps ``(batch, 16g, T')`` to
            ``(batch, pooling.output_dim)``.
        in_channels: feature dimension F (``svlab.features.feature_dim``; 80 fbank in the paper).
        base_channels: g, the growth rate (32 in the paper); the FCM has g channels, the bottlenecks
            and the first TDNN 4g.
        embedding_size: output dimension (512 in the paper).

    ``forward(x, lengths=None)``: ``x`` ``(batch, in_channels, frames)``, any number of frames;
    ``lengths`` (optional, ``(batch,)``) counts the valid frames of padded items. Returns
    ``(batch, embedding_size)``.
    """

    def __init__(self, pooling: nn.Module, in_channels: int = 80, base_channels: int = 32,
                 embedding_size: int = 512):
        super().__init__()
        pooled = self.pooled_channels(base_channels)
        if getattr(pooling, "channels", pooled) != pooled:
            raise ValueError(f"the pooling was built for {pooling.channels} channels, but CAM++ with g={base_channels} "
                             f"pools {pooled}; build it with CAMPPlus.pooled_channels({base_channels})")
        g = base_channels
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.embedding_size = embedding_size
        self.head = FCM(in_channels, g)
        self.tdnn = nn.Conv1d(self.head.out_channels, 4 * g, 5, stride=2, padding=2, bias=False)
        self.tdnn_norm = nn.BatchNorm1d(4 * g)
        blocks, transits, width = [], [], 4 * g
        for layers, dilation in zip(DENSE_LAYERS, DILATIONS):
            blocks.append(DenseBlock(layers, width, g, 4 * g, dilation))
            width += layers * g
            transits.append(Transit(width, width // 2))
            width //= 2
        self.blocks = nn.ModuleList(blocks)
        self.transits = nn.ModuleList(transits)
        self.out_norm = nn.BatchNorm1d(width)
        self.pooling = pooling
        self.embedding = nn.Linear(pooling.output_dim, embedding_size, bias=False)
        self.embedding_norm = nn.BatchNorm1d(embedding_size, affine=False)
        for m in self.modules():  # 3D-Speaker's initialisation of the 1-D convolutions and the dense layer
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def pooled_channels(base_channels: int) -> int:
        """Channels the pooling receives: ``16 * base_channels`` (512 at g = 32)."""
        width = 4 * base_channels
        for layers in DENSE_LAYERS:
            width = (width + layers * base_channels) // 2
        return width

    @staticmethod
    def output_frames(frames):
        """Frames reaching the pooling: ``ceil(frames / 2)`` (ints or tensors)."""
        return ceil_half(frames)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            hint = (" it looks like (batch, frames, feat): pass x.transpose(1, 2)"
                    if x.dim() == 3 and x.shape[2] == self.in_channels else "")
            raise ValueError(f"CAM++ expects (batch, {self.in_channels}, frames), got {tuple(x.shape)};{hint}")
        if lengths is not None:
            lengths = lengths.to(x.device).clamp(min=1, max=x.shape[2])
        h = self.head(x, time_mask(lengths, x.shape[2], x.unsqueeze(1)))               # (batch, g * F3, T)
        h = F.relu(self.tdnn_norm(self.tdnn(masked(h, time_mask(lengths, h.shape[2], h)))))  # (batch, 4g, T')
        lengths = None if lengths is None else self.output_frames(lengths)
        mask = time_mask(lengths, h.shape[2], h)
        for block, transit in zip(self.blocks, self.transits):
            h = transit(block(h, mask))
        h = F.relu(self.out_norm(h))                                                     # (batch, 16g, T')
        return self.embedding_norm(self.embedding(self.pooling(h, lengths)))            # (batch, embedding_size)

"""The x-vector TDNN (Snyder et al., "X-vectors: Robust DNN embeddings for speaker recognition", 2018).

Frame layers (kernel, dilation): (5, 1), (3, 2), (3, 3), (1, 1), (1, 1), each Conv1d -> ReLU ->
BatchNorm. Without padding they consume 4 + 4 + 6 = 14 frames of context: 100 input frames give 86
pooled frames. Then pooling (given to the model, see ``pooling.py``) and a linear layer to the
embedding.

Shapes: input ``(batch, n_mfcc, frames)``; frame layers ``(batch, stat_channels, frames - 14)``;
output ``(batch, embedding_size)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# (kernel_size, dilation) of the five frame-level layers.
FRAME_LAYERS = ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))
CONTEXT = sum((k - 1) * d for k, d in FRAME_LAYERS)  # 14 frames


class TDNNLayer(nn.Module):
    """Time-delay layer: dilated Conv1d -> ReLU -> BatchNorm1d.

    ``(batch, in_channels, frames)`` -> ``(batch, out_channels, frames - (kernel_size - 1) * dilation)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)
        self.activation = nn.ReLU(inplace=True)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.activation(self.conv(x)))


class Xvector(nn.Module):
    """x-vector embedding network.

    Args:
        pooling: a module from ``pooling.py`` built for ``stat_channels`` channels; it maps
            ``(batch, stat_channels, frames)`` to ``(batch, pooling.output_dim)``.
        in_channels: feature dimension (``features.n_mfcc``).
        channels: width of frame layers 1-4 (512 in the paper).
        stat_channels: width of frame layer 5, the one that is pooled (1500 in the paper).
        embedding_size: output dimension (512 in the paper and the lab).

    ``forward(x, lengths=None)``: ``x`` is ``(batch, in_channels, frames)`` with ``frames > 14``;
    ``lengths`` (optional, ``(batch,)``) counts valid input frames of padded items. Returns
    ``(batch, embedding_size)``.
    """

    def __init__(self, pooling: nn.Module, in_channels: int = 40, channels: int = 512,
                 stat_channels: int = 1500, embedding_size: int = 512):
        super().__init__()
        widths = [in_channels, channels, channels, channels, channels, stat_channels]
        self.frame_layers = nn.Sequential(*[
            TDNNLayer(widths[i], widths[i + 1], k, d) for i, (k, d) in enumerate(FRAME_LAYERS)
        ])
        # Handout step 2.2: the pooling, then a linear layer from the pooled vector to the embedding.
        # =====> code <=====
        self.pooling = pooling
        self.embedding = nn.Linear(pooling.output_dim, embedding_size)
        # =====> code <=====
        self.stat_channels = stat_channels
        self.embedding_size = embedding_size

    @staticmethod
    def output_frames(frames: int | torch.Tensor) -> int | torch.Tensor:
        """Frames left after the frame layers: ``frames - 14``."""
        return frames - CONTEXT

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[2] <= CONTEXT:
            raise ValueError(f"x-vector needs more than {CONTEXT} frames, got {x.shape[2]}")
        pooled_lengths = None if lengths is None else self.output_frames(lengths).clamp_min(1)
        # Handout step 2.2: frame layers -> pooling over frames -> embedding.
        # =====> code <=====
        h = self.frame_layers(x)                       # (batch, stat_channels, frames - 14)
        pooled = self.pooling(h, pooled_lengths)       # (batch, pooling.output_dim)
        return self.embedding(pooled)                  # (batch, embedding_size)
        # =====> code <=====

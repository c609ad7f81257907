"""Classification heads used as training losses. Each maps embeddings to ``(loss, acc)``.

``forward(x, label)``: ``x`` is ``(batch, embedding_size)``, ``label`` is ``(batch,)`` class ids;
returns the mean cross-entropy loss (scalar tensor) and the top-1 training accuracy in percent
(scalar tensor, no gradient). The heads hold the class weights, so they are trained with the model
and saved in the checkpoint.

==============  ==========================================================================
head            logits ``(batch, num_classes)``, theta = angle between x and class weight
==============  ==========================================================================
Softmax         ``W x + b``
Amsoftmax       ``s * (cos(theta) - m)`` for the target class, ``s * cos(theta)`` otherwise
AAMsoftmax      ``s * cos(theta + m)`` for the target class, ``s * cos(theta)`` otherwise
==============  ==========================================================================

The margin heads compute cosines in float32 even under autocast, report the accuracy of the
cosines without margin, and read ``self.margin`` at every forward, so the trainer's margin warm-up
(assigning ``head.margin``) takes effect at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return (logits.argmax(dim=1) == label).float().mean() * 100.0


def cosine_logits(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Cosines between embeddings ``x`` ``(batch, embedding_size)`` and the columns of ``W``
    ``(embedding_size, num_classes)``: ``(batch, num_classes)``, in float32 even under autocast
    (a half-precision cosine can leave [-1, 1] and the margins are small)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.normalize(x.float(), dim=1) @ F.normalize(W.float(), dim=0)


class Softmax(nn.Module):
    """Linear layer + softmax cross-entropy (the lab baseline).

    ``(batch, embedding_size)`` -> logits ``(batch, num_classes)`` -> ``(loss, acc)``.
    """

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Handout step 2.3: logits of the linear layer, their cross-entropy with the labels, the accuracy.
        # =====> code <=====
        logits = self.fc(x)                            # (batch, num_classes)
        return F.cross_entropy(logits, label), accuracy(logits, label)
        # =====> code <=====


class Amsoftmax(nn.Module):
    """Additive-margin softmax (Wang et al., "Additive Margin Softmax for Face Verification",
    arXiv 1801.05599), as given in the lab handout.

    Embeddings and class weights are L2-normalised, so the logits are cosines; the target cosine is
    lowered by ``margin`` and everything is scaled by ``s``:
    ``loss = CE(s * (cos(theta) - m * onehot), label)``.

    ``(batch, embedding_size)`` -> cosines ``(batch, num_classes)`` -> ``(loss, acc)``.
    ``margin`` can be changed during training (margin warm-up) by assigning ``self.margin``.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 30.0, margin: float = 0.2):
        super().__init__()
        self.s = s
        self.margin = margin
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.xavier_normal_(self.W, gain=1)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, embedding_size)`` -> cosines ``(batch, num_classes)``."""
        return cosine_logits(x, self.W)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        costh = self.cosine(x)
        delta = torch.zeros_like(costh).scatter_(1, label.view(-1, 1), float(self.margin))
        logits = self.s * (costh - delta)
        return F.cross_entropy(logits, label), accuracy(costh, label)

    def extra_repr(self) -> str:
        return f"embedding_size={self.W.shape[0]}, num_classes={self.W.shape[1]}, s={self.s}, margin={self.margin}"


class AAMsoftmax(Amsoftmax):
    """Additive angular margin softmax, ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss
    for Deep Face Recognition", CVPR 2019, arXiv 1801.07698); the loss of ECAPA-TDNN.

    Embeddings and class weights are L2-normalised; the angle to the target class is enlarged by
    ``margin`` (radians) and everything is scaled by ``s``:
    ``loss = CE(s * [cos(theta_y + m) for the target, cos(theta_j) for the others], label)``.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``, which would reward pushing an
    embedding further away from its class. As in insightface and voxceleb_trainer, the target logit
    there is replaced by a CosFace-style penalty that keeps decreasing with theta: with
    ``th = cos(pi - m)`` and ``mm = sin(pi - m) * m`` (= ``m * sin(m)``) the target cosine becomes
    ``cos(theta + m)`` where ``cos(theta) > th`` (theta + m < pi) and ``cos(theta) - mm``
    otherwise (at theta = pi - m the two differ by about ``m^2 / 2``; the switch is not exactly
    continuous, as in the reference code). ``cos(theta + m)`` is computed as ``cos * cos(m) - sin * sin(m)`` with
    ``sin = sqrt(max(1 - cos^2, eps))``, and only for the target entries, so no gradient through a
    square root of 0 can turn into NaN. ``cos(m)``, ``sin(m)``, ``th`` and ``mm`` are recomputed
    from ``self.margin`` at every forward (margin warm-up).

    ``(batch, embedding_size)`` -> cosines ``(batch, num_classes)`` -> ``(loss, acc)``; ``W`` is
    ``(embedding_size, num_classes)`` as in :class:`Amsoftmax`, whose weights and cosines it shares.
    """

    def target_cosine(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Cosine of the target class (any shape) -> ``cos(theta + m)`` with the ``theta + m > pi`` fix."""
        m = float(self.margin)
        cos_m, sin_m = math.cos(m), math.sin(m)
        th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
        sin_t = (1.0 - cos_t * cos_t).clamp_min(1e-12).sqrt()
        phi = cos_t * cos_m - sin_t * sin_m
        return torch.where(cos_t > th, phi, cos_t - mm)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        costh = self.cosine(x)
        index = label.view(-1, 1)
        phi = self.target_cosine(costh.gather(1, index))
        logits = self.s * costh.scatter(1, index, phi)
        return F.cross_entropy(logits, label), accuracy(costh, label)

    def extra_repr(self) -> str:
        return f"embedding_size={self.W.shape[0]}, num_classes={self.W.shape[1]}, s={self.s}, margin={self.margin}"

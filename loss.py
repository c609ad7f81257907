"""Classification heads used as training losses. Each maps embeddings to ``(loss, acc)``.

``forward(x, label)``: ``x`` is ``(batch, embedding_size)``, ``label`` is ``(batch,)`` class ids;
returns the mean cross-entropy loss (scalar tensor) and the top-1 training accuracy in percent
(scalar tensor, no gradient). The heads hold the class weights, so they are trained with the model
and saved in the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return (logits.argmax(dim=1) == label).float().mean() * 100.0


class Softmax(nn.Module):
    """Linear layer + softmax cross-entropy (the lab baseline).

    ``(batch, embedding_size)`` -> logits ``(batch, num_classes)`` -> ``(loss, acc)``.
    """

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return F.cross_entropy(logits, label), accuracy(logits, label)


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
        return F.normalize(x, dim=1) @ F.normalize(self.W, dim=0)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        costh = self.cosine(x)
        delta = torch.zeros_like(costh).scatter_(1, label.view(-1, 1), self.margin)
        logits = self.s * (costh - delta)
        return F.cross_entropy(logits, label), accuracy(costh, label)

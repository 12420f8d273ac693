"""Pointwise activations used by EquiformerV2."""

from __future__ import annotations

import torch
from torch import nn


class SmoothLeakyReLU(nn.Module):
    """f(x) = (1+a)/2 · x + (1−a)/2 · x · (2σ(x) − 1), a = ``negative_slope``."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.a = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 + self.a) * x + 0.5 * (1 - self.a) * x * (2 * torch.sigmoid(x) - 1)

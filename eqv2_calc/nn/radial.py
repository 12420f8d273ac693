"""Distance features: Gaussian basis and the radial MLP.

Shapes: E edges.
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianBasis(nn.Module):
    """``num`` Gaussians centred on linspace(0, cutoff) with width factor ``width``: [E] Å → [E, num].

    exp(coeff · (d − μ_k)²), coeff = −0.5 / (width · Δ)², Δ = the float32 centre spacing
    (EquiformerV2 uses num = 600, width = 2.0; there is no smooth cutoff envelope).
    """

    def __init__(self, cutoff: float, num: int = 600, width: float = 2.0):
        super().__init__()
        offset = torch.linspace(0.0, cutoff, num, dtype=torch.float32)
        self.coeff = -0.5 / (width * float(offset[1] - offset[0])) ** 2
        self.register_buffer("offset", offset.double(), persistent=False)

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (dist.unsqueeze(-1) - self.offset.to(dist.dtype)) ** 2)


class RadialMLP(nn.Module):
    """Linear → LayerNorm → SiLU → Linear → LayerNorm → SiLU → Linear, over ``channels``.

    Keys ``net.{0,1,3,4,6}`` match fairchem's ``RadialFunction``.
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(channels) - 1):
            layers.append(nn.Linear(channels[i], channels[i + 1]))
            if i < len(channels) - 2:
                layers += [nn.LayerNorm(channels[i + 1]), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

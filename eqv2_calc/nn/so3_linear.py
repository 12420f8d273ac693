"""Degree-wise linear map of SO(3) features [N, K, Cin] → [N, K, Cout] (bias on l = 0 only)."""

from __future__ import annotations

import torch
from torch import nn

from eqv2_calc.so3.layout import degrees


class SO3Linear(nn.Module):
    """out[n, i, o] = Σ_c x[n, i, c] · W[l(i), o, c]  (+ bias[o] on row 0). Keys ``weight``, ``bias``."""

    def __init__(self, in_channels: int, out_channels: int, lmax: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.uniform_(self.weight, -in_channels**-0.5, in_channels**-0.5)
        self.register_buffer("expand_index", torch.tensor(degrees(lmax)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num, lmax = x.shape[0], self.weight.shape[0] - 1
        out = torch.cat(
            [
                (x[:, l * l : (l + 1) ** 2].reshape(-1, x.shape[2]) @ self.weight[l].T).view(num, 2 * l + 1, -1)
                for l in range(lmax + 1)
            ],
            dim=1,
        )
        out[:, 0, :] += self.bias
        return out

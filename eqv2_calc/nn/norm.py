"""Equivariant layer norm of SO(3) features ("layer_norm_sh").

l = 0: an ordinary LayerNorm over channels. l > 0: one balanced RMS per node,
s = mean_c Σ_{rows i, l_i ≥ 1} x_ic² / ((2 l_i + 1) L), then x_l · (s + eps)^(−½) · w[l−1, c].
"""

from __future__ import annotations

import torch
from torch import nn

from eqv2_calc.so3.layout import degrees


class EquivariantLayerNormSH(nn.Module):
    """Keys: ``norm_l0.{weight,bias}`` [C], ``affine_weight`` [L, C]. Input/output [N, K, C]."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.norm_l0 = nn.LayerNorm(channels, eps=eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax, channels))
        deg = torch.tensor(degrees(lmax)[1:])
        self.register_buffer("balance", 1.0 / ((2 * deg + 1) * lmax).double(), persistent=False)
        self.register_buffer("row_degree", deg - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out0 = self.norm_l0(x[:, :1, :])
        if self.lmax == 0:
            return out0
        rest = x[:, 1:, :]
        s = torch.einsum("nic,i->n", rest.pow(2), self.balance.to(x.dtype)) / x.shape[2]
        scale = (s + self.eps).rsqrt()[:, None, None]
        return torch.cat([out0, rest * scale * self.affine_weight[self.row_degree]], dim=1)

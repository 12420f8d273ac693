"""Deterministic edge frames and their Wigner-D matrices.

Every edge gets a rotation R_e with R_e · x̂_e = +ŷ (the edge direction becomes the
polar axis of the e3nn convention). We take the rotation with zero third Euler angle:
with (α, β) the azimuth/polar angles of x̂ (α = atan2(x, z), β = acos(y)),
R_e = (Y(α) X(β))ᵀ and D^l(R_e) = D^l(α, β, 0)ᵀ (e3nn's YXY Euler convention).

fairchem 1.x instead draws a random roll about the edge axis on every call. The network
is invariant to that roll except through the finite S2 grid samples, so the choice only
moves outputs at the 1e-6 level — but ours gives bit-identical results on every call.

Shapes: E edges, K = (L+1)², Kr = rows with |m| ≤ M (see :mod:`layout`).
"""

from __future__ import annotations

import torch
from e3nn.o3 import wigner_D

from eqv2_calc.so3.layout import num_coefficients


def edge_angles(edge_vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Azimuth α (about y, from z towards x) and polar angle β (from +y) of edge vectors [E, 3]."""
    unit = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
    alpha = torch.atan2(unit[:, 0], unit[:, 2])
    beta = torch.acos(unit[:, 1].clamp(-1.0, 1.0))
    return alpha, beta


def edge_wigner(edge_vec: torch.Tensor, lmax: int) -> torch.Tensor:
    """Block-diagonal D(R_e) [E, K, K] mapping global-frame coefficients to the edge frame."""
    alpha, beta = edge_angles(edge_vec)
    gamma = torch.zeros_like(alpha)
    num_edges, size = edge_vec.shape[0], num_coefficients(lmax)
    out = edge_vec.new_zeros(num_edges, size, size)
    for l in range(lmax + 1):
        a, b = l * l, (l + 1) * (l + 1)
        out[:, a:b, a:b] = wigner_D(l, alpha, beta, gamma).transpose(1, 2)
    return out

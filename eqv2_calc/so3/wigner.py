"""Deterministic edge frames and their Wigner-D matrices.

Every edge gets a rotation R_e with R_e · x̂_e = +ŷ (the edge direction becomes the polar
axis of the e3nn convention). We take the rotation with zero third Euler angle: with
(α, β) the azimuth/polar angles of x̂ (α = atan2(x, z), β = acos(y)),
R_e = (Y(α) X(β))ᵀ, so D^l(R_e) = D^l(α, β, 0)ᵀ in e3nn's YXY Euler convention, where

    D^l(α, β, γ) = Z_l(α) J_l Z_l(β) J_l Z_l(γ),

Z_l(θ) is the rotation about y in the real-SH basis (cos(mθ) on the diagonal, sin(mθ) on
the anti-diagonal, rows m = l..−l) and J_l is the (symmetric, involutory) representation of
the reflection (x, y, z) → (−y, −x, z), which turns a rotation about y into one about x.
J_l is obtained once by a least-squares fit of e3nn's real spherical harmonics.

fairchem 1.x instead draws a random roll about the edge axis on every call. The network is
invariant to that roll except through the finite S2 grid samples, so the choice moves
outputs only at the 1e-6 level — but ours gives bit-identical results on every call.

Shapes: E edges, K = (L+1)².
"""

from __future__ import annotations

from functools import lru_cache

import torch
from e3nn.o3 import spherical_harmonics

from eqv2_calc.so3.layout import num_coefficients


@lru_cache(maxsize=None)
def _reflection_rep(l: int) -> torch.Tensor:
    """J_l [2l+1, 2l+1] float64 with Y_l(J_1 x) = J_l Y_l(x)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8 * (2 * l + 1), 3, generator=gen, dtype=torch.float64)
    jx = torch.stack([-x[:, 1], -x[:, 0], x[:, 2]], dim=1)
    y = spherical_harmonics(l, x, normalize=True, normalization="component")
    yj = spherical_harmonics(l, jx, normalize=True, normalization="component")
    return torch.linalg.lstsq(y, yj).solution.T.contiguous()


def _y_rotation(l: int, angle: torch.Tensor) -> torch.Tensor:
    """Z_l(angle) [E, 2l+1, 2l+1]: rotation about y by ``angle`` [E] in the degree-l basis."""
    freq = torch.arange(l, -l - 1, -1, dtype=angle.dtype, device=angle.device)
    idx = torch.arange(2 * l + 1, device=angle.device)
    out = angle.new_zeros(angle.shape[0], 2 * l + 1, 2 * l + 1)
    out[:, idx, idx.flip(0)] = torch.sin(freq * angle[:, None])
    out[:, idx, idx] = torch.cos(freq * angle[:, None])  # the centre (m = 0) is cos(0) = 1
    return out


def edge_angles(edge_vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Azimuth α (about y, from z towards x) and polar angle β (from +y) of edge vectors [E, 3]."""
    unit = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
    alpha = torch.atan2(unit[:, 0], unit[:, 2])
    beta = torch.acos(unit[:, 1].clamp(-1.0, 1.0))
    return alpha, beta


def wigner_blocks(edge_vec: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """D^l(R_e) [E, 2l+1, 2l+1] for l = 0..L, mapping global-frame coefficients to the edge frame."""
    alpha, beta = edge_angles(edge_vec)
    blocks = [edge_vec.new_ones(edge_vec.shape[0], 1, 1)]
    for l in range(1, lmax + 1):
        j = _reflection_rep(l).to(dtype=edge_vec.dtype, device=edge_vec.device)
        # D(α, β, 0)ᵀ = J Z(β)ᵀ J Z(α)ᵀ
        blocks.append(j @ _y_rotation(l, beta).transpose(1, 2) @ j @ _y_rotation(l, alpha).transpose(1, 2))
    return blocks


def edge_wigner(edge_vec: torch.Tensor, lmax: int) -> torch.Tensor:
    """Block-diagonal D(R_e) [E, K, K] (see :func:`wigner_blocks`)."""
    size = num_coefficients(lmax)
    out = edge_vec.new_zeros(edge_vec.shape[0], size, size)
    for l, block in enumerate(wigner_blocks(edge_vec, lmax)):
        out[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = block
    return out

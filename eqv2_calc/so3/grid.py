"""Projection between spherical-harmonic coefficients and an S2 grid (for S2 activations).

The grid has ``res`` polar samples β_i = (i + ½)π/res (from +y) times ``res`` azimuths
α_j = 2πj/res, flattened β-major to G = res² points. Values on the grid are
``to_grid @ x`` and coefficients back are ``from_grid @ g`` (e3nn ``ToS2Grid`` /
``FromS2Grid`` with "component" normalization; ``from_grid`` uses their quadrature).

For an edge-frame grid (|m| ≤ M < L), the columns of degrees l > M of *both* matrices are
multiplied by sqrt((2l+1)/(2M+1)), the EquiformerV2 convention.
"""

from __future__ import annotations

import torch
from e3nn.o3 import FromS2Grid, ToS2Grid

from eqv2_calc.so3.layout import degree_rescale, full_index, mprimary_lm


def _full_grid(lmax: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(to [G, K], from [G, K]) in the full l-primary layout, float64."""
    to = ToS2Grid(lmax, (res, res), normalization="component", dtype=torch.float64)
    fr = FromS2Grid((res, res), lmax, normalization="component", dtype=torch.float64)
    to_full = torch.einsum("mbi,am->bai", to.shb, to.sha).reshape(res * res, -1)
    from_full = torch.einsum("am,mbi->bai", fr.sha, fr.shb).reshape(res * res, -1)
    return to_full, from_full


def node_grid(lmax: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_grid [G, K], from_grid [K, G]) for full-layout node features, float64."""
    to_full, from_full = _full_grid(lmax, res)
    return to_full, from_full.T.contiguous()


def edge_grid(lmax: int, mmax: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_grid [G, Kr], from_grid [Kr, G]) for m-primary edge-frame features, float64, rescaled."""
    to_full, from_full = _full_grid(lmax, res)
    cols = torch.tensor([full_index(l, m) for l, m in mprimary_lm(lmax, mmax)])
    scale = degree_rescale(lmax, mmax)
    return to_full[:, cols] * scale, (from_full[:, cols] * scale).T.contiguous()

"""Coefficient layouts of real spherical-harmonic features.

Convention (e3nn, y is the polar axis): inside degree l the coefficient of order m
(−l ≤ m ≤ l) sits at index ``l² + m + l`` of the **full l-primary** layout of
K = (L+1)² rows. The l = 1 rows are the Cartesian components (x, y, z).

In an edge frame only orders |m| ≤ M are kept. Those Kr rows are stored in the
**m-primary** layout used by the SO(2) convolutions:

    m = 0 rows for l = 0..L,
    then for m = 1..M: the +m rows for l = m..L, followed by the −m rows for l = m..L.

Example L=4, M=2 as (l, m): (0,0)(1,0)(2,0)(3,0)(4,0) | (1,1)(2,1)(3,1)(4,1) |
(1,−1)(2,−1)(3,−1)(4,−1) | (2,2)(3,2)(4,2) | (2,−2)(3,−2)(4,−2).

fairchem stores edge-frame tensors in the *reduced l-primary* layout (the l-primary
order restricted to |m| ≤ M). This package works in m-primary order throughout the edge
frame, which removes every permutation from the hot path; :func:`reduced_to_mprimary`
converts fairchem's reduced-layout buffers.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def num_coefficients(lmax: int) -> int:
    """K = (L+1)², the size of the full layout."""
    return (lmax + 1) ** 2


def full_index(l: int, m: int) -> int:
    """Row of (l, m) in the full l-primary layout."""
    return l * l + m + l


@lru_cache(maxsize=None)
def degrees(lmax: int) -> tuple[int, ...]:
    """Degree l of every row of the full layout (length K)."""
    return tuple(l for l in range(lmax + 1) for _ in range(2 * l + 1))


@lru_cache(maxsize=None)
def mprimary_lm(lmax: int, mmax: int) -> tuple[tuple[int, int], ...]:
    """(l, m) of every row of the m-primary layout (length Kr)."""
    rows = [(l, 0) for l in range(lmax + 1)]
    for m in range(1, mmax + 1):
        rows += [(l, m) for l in range(m, lmax + 1)]
        rows += [(l, -m) for l in range(m, lmax + 1)]
    return tuple(rows)


def m_sizes(lmax: int, mmax: int) -> list[int]:
    """Number of degrees per order m = 0..M: L+1−m."""
    return [lmax + 1 - m for m in range(mmax + 1)]


def mprimary_index(lmax: int, mmax: int) -> torch.Tensor:
    """Full-layout row of each m-primary row, int64 [Kr]."""
    return torch.tensor([full_index(l, m) for l, m in mprimary_lm(lmax, mmax)], dtype=torch.long)


def reduced_to_mprimary(lmax: int, mmax: int) -> torch.Tensor:
    """Position in fairchem's reduced l-primary layout of each m-primary row, int64 [Kr]."""
    reduced = [
        (l, m) for l in range(lmax + 1) for m in range(-l, l + 1) if abs(m) <= mmax
    ]
    pos = {lm: i for i, lm in enumerate(reduced)}
    return torch.tensor([pos[lm] for lm in mprimary_lm(lmax, mmax)], dtype=torch.long)


def degree_rescale(lmax: int, mmax: int) -> torch.Tensor:
    """sqrt((2l+1)/(2M+1)) for degrees l > M, else 1, per m-primary row, float64 [Kr].

    Truncating to |m| ≤ M drops 2(l−M) of the 2l+1 orders of degree l; this factor
    restores their norm when going back from the edge frame (EquiformerV2 convention).
    """
    return torch.tensor(
        [math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0 for l, _ in mprimary_lm(lmax, mmax)],
        dtype=torch.float64,
    )

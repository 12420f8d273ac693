"""Matrix functions for batches of small float64 matrices (the cell maths of
:mod:`eqv2_calc.relax.cell`), built from elementwise operations and batched matmuls only.

Shapes: ``[..., n, n]`` (any leading batch dimensions); :func:`det3`, :func:`inv3` and
:func:`logm3` are for 3×3 matrices, :func:`expm` for any n (the cell maths uses 3×3 and the 6×6
block of :func:`expm_frechet_adjoint`).

==============================  ===============================================================
function                        method
==============================  ===============================================================
``det3(a)``                     triple product of the rows, ``r0 · (r1 × r2)``
``inv3(a)``                     adjugate over determinant: columns ``r1×r2, r2×r0, r0×r1``
``expm(a)``                     scaling and squaring: ``exp(a) = exp(a / 2^s)^(2^s)`` with ``s``
                                the smallest integer >= 0 such that ``‖a / 2^s‖₁ <= 1/4``, and the
                                degree-12 Taylor polynomial (Paterson–Stockmeyer) for
                                ``exp(a / 2^s)``: truncation error <= 2.5e-18 relative
``logm3(a)``                    inverse scaling and squaring: ``log(a) = 2^k log(a^(1/2^k))``
                                with Denman–Beavers square roots until ``‖a^(1/2^k) − I‖₁ <= 1/4``,
                                then ``log(b) = 2 atanh(z) = 2 Σ z^(2j+1)/(2j+1)``,
                                ``z = (b − I)(b + I)⁻¹`` (‖z‖₁ <= 1/7; 10 terms, truncation
                                error < 1e-17 relative)
``expm_frechet_adjoint(a, g)``  upper-right block of ``exp([[aᵀ, g], [0, aᵀ]])``
==============================  ===============================================================

Why not ``torch.linalg``: on the CPU its batched kernels (``matrix_exp``, ``inv``, ``det``,
``solve``) open an OpenMP parallel region over the batch on every call; with another process
busy on the same cores that region waits for a descheduled thread, about 5 ms per call
(``benchmarks/cell_relax.py --contend``) instead of 0.05 ms. The operations here stay on the
calling thread for small batches.

Every matrix is treated on its own (its own scaling ``s`` / ``k``; no batch-wide choice), so the
result for one matrix does not depend on the other matrices of the batch. ``expm`` and
``logm3`` read one integer per call (the largest ``s``; the number of square-root rounds) on
the host.
"""

from __future__ import annotations

import math

import torch

EXPM_THETA = 0.25
"""Largest 1-norm of the scaled argument of the Taylor polynomial in :func:`expm`."""

EXPM_DEGREE = 12
"""Degree of the Taylor polynomial in :func:`expm` (``θ^13 / 13! = 2.4e-18`` for ``θ = 1/4``)."""

LOGM_THETA = 0.25
"""Largest ``‖b − I‖₁`` of the argument of the atanh series in :func:`logm3`."""

LOGM_TERMS = 10
"""Terms of the atanh series in :func:`logm3` (``(1/7)^20 / 21 < 1e-18``)."""

_SQRT_ROUNDS = 64  # square roots before logm3 gives up (eigenvalues on or near the negative axis)
_DB_ITERATIONS = 100  # Denman–Beavers iterations per square root at most (quadratic convergence)


def det3(a: torch.Tensor) -> torch.Tensor:
    """Determinants of 3×3 matrices, ``[..., 3, 3] -> [...]``."""
    return torch.linalg.vecdot(a[..., 0, :], torch.linalg.cross(a[..., 1, :], a[..., 2, :]))


def inv3(a: torch.Tensor) -> torch.Tensor:
    """Inverses of (non-singular) 3×3 matrices, ``[..., 3, 3] -> [..., 3, 3]``; a singular
    matrix gives inf/NaN entries."""
    r0, r1, r2 = a[..., 0, :], a[..., 1, :], a[..., 2, :]
    c0 = torch.linalg.cross(r1, r2)
    adj = torch.stack([c0, torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], dim=-1)
    return adj / torch.linalg.vecdot(r0, c0)[..., None, None]


def _eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand(a.shape)


def _norm1(a: torch.Tensor) -> torch.Tensor:
    """Matrix 1-norms (largest column sum of absolute values), ``[..., n, n] -> [...]``."""
    return a.abs().sum(dim=-2).amax(dim=-1)


def _taylor_coefficients(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[3, 5] Paterson–Stockmeyer blocks of the degree-12 Taylor polynomial of exp: row j holds
    the coefficients of ``I, x, x², x³, x⁴`` in ``B_j`` with
    ``p(x) = B_0 + x⁴ (B_1 + x⁴ B_2)`` (``B_2`` also takes the ``x¹²`` term as ``x⁴``)."""
    c = [1.0 / math.factorial(k) for k in range(EXPM_DEGREE + 1)]
    rows = [c[0:4] + [0.0], c[4:8] + [0.0], c[8:13]]
    return torch.tensor(rows, dtype=dtype, device=device)


def expm(a: torch.Tensor) -> torch.Tensor:
    """Matrix exponentials ``exp(a)``, ``[..., n, n] -> [..., n, n]`` (see the module docstring
    for the method; relative accuracy ~1e-16 for ``‖a‖₁`` up to 1, ~1e-13 at 20)."""
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expm needs square matrices, got shape {tuple(a.shape)}")
    # s = max(0, ceil(log2(‖a‖₁ / θ))): frexp gives ‖a‖₁ / θ = m 2^e with m in [0.5, 1)
    _, e = torch.frexp(_norm1(a) / EXPM_THETA)
    s = e.clamp_min(0)
    s_max = int(s.max()) if s.numel() else 0
    x = torch.ldexp(a, -s[..., None, None].to(a.dtype)) if s_max else a  # exact: powers of 2
    x2 = x @ x
    x4 = x2 @ x2
    powers = torch.stack([_eye_like(x), x, x2, x2 @ x, x4], dim=-3)  # [..., 5, n, n]
    b = torch.einsum("jk,...knm->j...nm", _taylor_coefficients(a.dtype, a.device), powers)
    y = b[1] + x4 @ b[2]
    y = b[0] + x4 @ y
    for k in range(s_max):
        y = torch.where((k < s)[..., None, None], y @ y, y)
    return y


def _sqrtm3(a: torch.Tensor, todo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal square roots of the 3×3 matrices with ``todo`` (the others are returned as they
    are) by the product form of the Denman–Beavers iteration, ``M ← (I + (M + M⁻¹)/2)/2``,
    ``Y ← Y (I + M⁻¹)/2`` from ``M = Y = a`` (``Y → a^(1/2)``, ``M → I``, quadratically). Also
    returns which of them converged: ``‖M − I‖₁ <= 1e-15``, or it stopped decreasing below
    1e-10 (the rounding floor); without a real principal square root it does not."""
    eye = _eye_like(a)
    y, m = a, a
    active = todo.clone()
    converged = torch.zeros_like(todo)
    dist = _norm1(m - eye)
    for _ in range(_DB_ITERATIONS):
        m_inv = inv3(m)
        act = active[..., None, None]
        y = torch.where(act, 0.5 * (y @ (eye + m_inv)), y)
        m = torch.where(act, 0.5 * (eye + 0.5 * (m + m_inv)), m)
        new_dist = _norm1(m - eye)
        done = active & ((new_dist <= 1e-15) | ((new_dist >= dist) & (dist <= 1e-10)))
        converged = converged | done
        active = active & ~done & torch.isfinite(new_dist)
        dist = new_dist
        if not bool(active.any()):
            break
    return y, converged


def logm3(a: torch.Tensor) -> torch.Tensor:
    """Principal matrix logarithms of 3×3 matrices, ``[..., 3, 3] -> [..., 3, 3]`` (the real
    ``L`` with ``exp(L) = a`` whose eigenvalues have imaginary parts in (−π, π)). ``a`` must have
    no eigenvalue on the closed negative real axis; such a matrix (or a non-finite one) gives
    NaN."""
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"logm3 needs 3x3 matrices, got shape {tuple(a.shape)}")
    eye = _eye_like(a)
    b = a
    k = torch.zeros(a.shape[:-2], dtype=torch.long, device=a.device)
    failed = ~torch.isfinite(a).flatten(-2).all(dim=-1)
    for _ in range(_SQRT_ROUNDS):
        todo = ~(_norm1(b - eye) <= LOGM_THETA) & ~failed
        if not bool(todo.any()):
            break
        b, ok = _sqrtm3(b, todo)
        k = k + todo.to(torch.long)
        failed = failed | (todo & ~ok)
    e = b - eye
    z = e @ inv3(eye + b)  # (b − I)(b + I)⁻¹; the two factors commute
    w = z @ z
    series = eye / (2 * LOGM_TERMS - 1)
    for j in range(LOGM_TERMS - 2, -1, -1):
        series = eye / (2 * j + 1) + w @ series
    log = torch.ldexp(2.0 * (z @ series), k[..., None, None].to(a.dtype))
    bad = failed | ~(_norm1(e) <= LOGM_THETA)
    return torch.where(bad[..., None, None], torch.full_like(log, math.nan), log)


def expm_frechet_adjoint(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Dexp(a)*[g]`` for batches of 3×3 matrices [S, 3, 3]: the matrix ``M`` with
    ``⟨M, E⟩ = ⟨Dexp(a)[E], g⟩`` for every ``E`` (Frobenius products), i.e. the gradient of
    ``⟨exp(a), g⟩`` with respect to ``a``. Equals the Fréchet derivative of ``exp`` at ``aᵀ``
    in the direction ``g``, computed as the upper-right block of ``exp([[aᵀ, g'], [0, aᵀ]])``
    with ``g' = g / 2^p`` scaled exactly to a largest entry in [2^-7, 2^-6) (the block is
    linear in ``g'``; a small ``g'`` keeps the block's norm that of ``a``)."""
    at = a.transpose(-1, -2)
    _, p = torch.frexp(g.abs().amax(dim=(-2, -1)))
    p = (p + 6).to(g.dtype)[..., None, None]
    zeros = torch.zeros_like(a)
    block = torch.cat([torch.cat([at, torch.ldexp(g, -p)], dim=-1), torch.cat([zeros, at], dim=-1)], dim=-2)
    return torch.ldexp(expm(block)[..., :3, 3:], p)

"""Stress head of the EquiformerV2 materials models (fairchem ``rank2_symmetric_head`` with
``decompose=True, use_source_target_embedding=True``; OMat24, MPtrj, sAlex and DeNS checkpoints).

A symmetric 3×3 tensor has six independent entries: a trace (one scalar, degree l = 0) and a
traceless symmetric part (five numbers, degree l = 2). The head predicts the two parts
separately and combines them after each has been de-normalised with its own normalizer.

Math, per graph (N atoms, E edges j → i with vector r_e = r_j + shift − r_i, node features
x [N, K, C] after the backbone's final norm, K = (L+1)²):

1. Edge weights: w_e = LN_SH(Y(r_e)) ∈ R^K, where Y are e3nn's real spherical harmonics of
   degrees 0..L of the *unnormalised* vector (so Y_l scales as |r_e|^l), "integral"
   normalisation (Y_0 = 1/√(4π)), and LN_SH is the equivariant layer norm of
   :mod:`eqv2_calc.nn.norm` with one channel (``sphharm_norm``; with one channel its l = 0
   output is its bias).
2. Edge features: h_e = LayerNorm([Σ_k w_ek x_jk ‖ Σ_k w_ek x_ik]) ∈ R^{2C}
   (``xedge_layer_norm``; source features first). Σ_k w_ek x_k contracts two equivariant
   quantities of the same degrees, so h_e is rotation invariant.
3. Node pooling, mean over the edges arriving at atom i (zero for an atom without edges):
   s_i = mean_e h_e ∈ R^{2C},  t_i = mean_e Ŷ₂(r̂_e) h_eᵀ ∈ R^{5×2C}, with Ŷ₂ the degree-2
   harmonics of the unit vector (integral normalisation).
4. Node MLPs (``block.scalar_MLP`` and ``block.irrep2_MLP``: Linear, SiLU, ..., Linear to one
   output): a_i = MLP₀(s_i); b_im = MLP₂(t_im), the same MLP on each of the five rows.
5. System means: α = mean_i a_i, β = mean_i b_i ∈ R^5 (every atom counts, also atoms without
   edges).
6. De-normalisation per part: α' = α·rmsd₀ + mean₀ (``stress_isotropic``), β' = β·rmsd₂ + mean₂
   (``stress_anisotropic``; mean and rmsd may be scalars or 5-vectors).
7. Change of basis l = 0 ⊕ l = 2 → Cartesian: σ = α' I/√3 + Σ_m β'_m B_m, with the orthonormal
   (Frobenius) basis of symmetric traceless matrices in e3nn's order of l = 2 (y is e3nn's polar
   axis), m = −2..2: B₋₂ = (xz + zx)/√2, B₋₁ = (xy + yx)/√2, B₀ = (2yy − xx − zz)/√6,
   B₁ = (yz + zy)/√2, B₂ = (zz − xx)/√2 (ab = e_a e_bᵀ). For a unit vector r, rᵀ B_m r is
   proportional to Y₂,m(r) with one common factor, so this basis rotates like the harmonics
   (checked in tests/test_stress.py). The antisymmetric (l = 1) part is zero: σ is symmetric by
   construction.

Conventions of the output: eV/Å³; ASE's sign convention (the training labels were
``atoms.get_stress(voigt=False)`` of the DFT data): σ = (1/V) ∂E/∂ε, negative under compression,
pressure = −tr(σ)/3. The stress is predicted directly (no virial, no autograd) and is defined for
systems periodic in all three directions only.

Equivariance. Steps 1–3 are exactly equivariant (the pooled t_i rotate with the l = 2 Wigner
matrix), but two later steps of fairchem's design are not: ``irrep2_MLP`` applies a biased Linear
and SiLU to each of the five m-rows separately, and the ``stress_anisotropic`` normalizer adds
one mean to all five components (a fixed traceless tensor, whatever the orientation). The
anisotropic part of these models therefore rotates as a tensor only approximately (exactly, up to
the backbone's S2-grid error, when that MLP is linear and the mean is zero; tests/test_stress.py).
The isotropic part (the pressure) is invariant up to the grid error. We compute what fairchem
computes.
"""

from __future__ import annotations

import math

import torch
from e3nn.o3 import spherical_harmonics
from torch import nn

from eqv2_calc.nn.context import EDGE_CHUNK, row_chunks
from eqv2_calc.nn.norm import EquivariantLayerNormSH

_S2 = 2.0**-0.5
_S6 = 6.0**-0.5


def irreps_to_cartesian(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[6, 3, 3]: row 0 = I/√3 (l = 0), rows 1..5 = B_m for m = −2..2 (l = 2, see module docstring).

    σ = Σ_p c_p M_p for c = [α', β'₋₂, ..., β'₂]. Orthonormal: Σ_ab M_pab M_qab = δ_pq.
    """
    m = torch.zeros(6, 3, 3, dtype=torch.float64)
    x, y, z = 0, 1, 2
    m[0] = torch.eye(3, dtype=torch.float64) / math.sqrt(3.0)
    m[1, x, z] = m[1, z, x] = _S2
    m[2, x, y] = m[2, y, x] = _S2
    m[3] = torch.diag(torch.tensor([-_S6, 2 * _S6, -_S6], dtype=torch.float64))
    m[4, y, z] = m[4, z, y] = _S2
    m[5] = torch.diag(torch.tensor([-_S2, 0.0, _S2], dtype=torch.float64))
    return m.to(dtype)


def _mlp(channels: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_layers - 1):
        layers += [nn.Linear(channels, channels), nn.SiLU()]
    layers.append(nn.Linear(channels, 1))
    return nn.Sequential(*layers)


class _Rank2Block(nn.Module):
    """Keys ``scalar_MLP.*`` (l = 0) and ``irrep2_MLP.*`` (l = 2), as fairchem's decomposition block."""

    def __init__(self, channels: int, num_layers: int):
        super().__init__()
        self.scalar_MLP = _mlp(channels, num_layers)
        self.irrep2_MLP = _mlp(channels, num_layers)


class Rank2StressHead(nn.Module):
    """Keys ``sphharm_norm.*``, ``xedge_layer_norm.*``, ``block.{scalar_MLP,irrep2_MLP}.*`` and the
    normalizer buffers ``isotropic_{mean,rmsd}`` [1], ``anisotropic_{mean,rmsd}`` [5].

    ``channels`` = C of the backbone (the edge features have 2C: source and target).
    Output: stress [S, 3, 3] (eV/Å³, de-normalised, symmetric).
    """

    def __init__(self, channels: int, lmax: int, num_mlp_layers: int = 2):
        super().__init__()
        self.lmax = lmax
        width = 2 * channels
        self.sphharm_norm = EquivariantLayerNormSH(lmax, 1)
        self.xedge_layer_norm = nn.LayerNorm(width)
        self.block = _Rank2Block(width, num_mlp_layers)
        self.register_buffer("isotropic_mean", torch.zeros(1))
        self.register_buffer("isotropic_rmsd", torch.ones(1))
        self.register_buffer("anisotropic_mean", torch.zeros(5))
        self.register_buffer("anisotropic_rmsd", torch.ones(5))
        self.register_buffer("basis", irreps_to_cartesian(torch.float32), persistent=False)

    def reset_derived_buffers(self) -> None:
        """The change-of-basis matrices in float64, cast to the module's dtype."""
        self.basis = irreps_to_cartesian().to(dtype=self.isotropic_mean.dtype, device=self.isotropic_mean.device)

    def edge_features(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """h_e [E', 2C] for the given edges (steps 1–2)."""
        sh = spherical_harmonics(list(range(self.lmax + 1)), vec, normalize=False, normalization="integral")
        w = self.sphharm_norm(sh[:, :, None])  # [E', K, 1]
        xs = torch.bmm(w.transpose(1, 2), x[src])[:, 0]  # Σ_k w_ek x_jk  [E', C]
        xd = torch.bmm(w.transpose(1, 2), x[dst])[:, 0]
        return self.xedge_layer_norm(torch.cat([xs, xd], dim=1))

    def node_parts(
        self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, vec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled node features s [N, 2C] and t [N, 5, 2C] (step 3)."""
        num_nodes = x.shape[0]
        width = self.xedge_layer_norm.normalized_shape[0]
        s = x.new_zeros(num_nodes, width)
        t = x.new_zeros(num_nodes, 5, width)
        for edges in row_chunks(src.shape[0], EDGE_CHUNK, x):  # in edge order: same sums as one pass
            h = self.edge_features(x, src[edges], dst[edges], vec[edges])
            y2 = spherical_harmonics(2, vec[edges], normalize=True, normalization="integral")  # [E', 5]
            s.index_add_(0, dst[edges], h)
            t.index_add_(0, dst[edges], y2[:, :, None] * h[:, None, :])
        count = torch.bincount(dst, minlength=num_nodes).clamp_(min=1).to(x.dtype)
        return s / count[:, None], t / count[:, None, None]

    def forward(
        self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, vec: torch.Tensor,
        system_idx: torch.Tensor, num_systems: int,
    ) -> torch.Tensor:
        """Stress [S, 3, 3] in eV/Å³ (ASE sign convention) from node features x [N, K, C]."""
        s, t = self.node_parts(x, src, dst, vec)
        a = self.block.scalar_MLP(s)[:, 0]  # [N]
        b = self.block.irrep2_MLP(t)[:, :, 0]  # [N, 5]
        natoms = torch.bincount(system_idx, minlength=num_systems).to(x.dtype)
        alpha = x.new_zeros(num_systems).index_add_(0, system_idx, a) / natoms
        beta = x.new_zeros(num_systems, 5).index_add_(0, system_idx, b) / natoms[:, None]
        alpha = alpha * self.isotropic_rmsd + self.isotropic_mean
        beta = beta * self.anisotropic_rmsd + self.anisotropic_mean
        coeffs = torch.cat([alpha[:, None], beta], dim=1)  # [S, 6]
        return torch.einsum("sp,pab->sab", coeffs, self.basis)

"""EquiformerV2 (Liao et al., ICLR 2024) for energies and direct forces.

Pure model: packed graph tensors in, energies (eV) and forces (eV/Å) out; no ASE, no I/O.
Graph building lives in :mod:`eqv2_calc.graph`, checkpoint reading in
:mod:`eqv2_calc.checkpoint`, packing of ASE structures and the batched potential in
:mod:`eqv2_calc.graph` and :mod:`eqv2_calc.potential`.

Shapes: N atoms, E edges, S systems, K = (L+1)², Kr = edge-frame rows, C channels.

Node features [N, K, C] live in the global frame (full l-primary layout); per-edge features
live in the edge frame (m-primary layout). Outputs are de-normalized inside the model:
energy = (Σ_i e_i / avg_num_nodes [+ Σ_i lin_ref[Z_i]]) · energy_std + energy_mean
[+ Σ_i element_ref[Z_i]] and forces = f_i · force_std + force_mean. Models of the materials
checkpoints (OMat24, MPtrj, sAlex, DeNS) also have a stress head
(:class:`eqv2_calc.nn.rank2.Rank2StressHead`, ``regress_stress``): stress [S, 3, 3] in eV/Å³.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from eqv2_calc.nn.attention import SO2GraphAttention
from eqv2_calc.nn.context import EdgeContext
from eqv2_calc.nn.embedding import EdgeDegreeEmbedding
from eqv2_calc.nn.feedforward import GridFeedForward
from eqv2_calc.nn.norm import EquivariantLayerNormSH
from eqv2_calc.nn.radial import GaussianBasis
from eqv2_calc.nn.rank2 import Rank2StressHead
from eqv2_calc.so3.grid import edge_grid, node_grid
from eqv2_calc.so3.layout import degree_rescale, mprimary_index
from eqv2_calc.so3.wigner import edge_wigner

AVG_NUM_NODES_OC20 = 77.81317
AVG_DEGREE_OC20 = 23.395238876342773
NUM_DISTANCE_GAUSSIANS = 600


@dataclass(frozen=True)
class EquiformerV2Config:
    """Architecture and graph hyper-parameters (names follow fairchem's ``model_attributes``).

    ``max_radius`` is the graph cutoff in Å; ``max_neighbors`` caps neighbours per atom
    (``enforce_max_neighbors_strictly``: exactly that many, else all within 0.01 Å² of the
    (max_neighbors+1)-th). ``avg_num_nodes`` / ``avg_degree`` are the normalisation
    constants of the energy sum and the edge-degree embedding; ``energy_reduce`` "sum" divides
    the energy sum by ``avg_num_nodes`` (every official checkpoint), "mean" by the number of
    atoms of each system. ``regress_stress`` adds the rank-2 stress head of the materials
    checkpoints (``stress_mlp_layers`` linear layers in each of its MLPs).
    """

    num_layers: int = 12
    sphere_channels: int = 128
    attn_hidden_channels: int = 128
    num_heads: int = 8
    attn_alpha_channels: int = 32
    attn_value_channels: int = 16
    ffn_hidden_channels: int = 512
    lmax: int = 6
    mmax: int = 2
    grid_resolution: int = 18
    edge_channels: int = 128
    max_num_elements: int = 90
    max_radius: float = 5.0
    max_neighbors: int = 500
    enforce_max_neighbors_strictly: bool = True
    use_pbc: bool = True
    use_atom_edge_embedding: bool = True
    share_atom_edge_embedding: bool = False
    use_attn_renorm: bool = True
    avg_num_nodes: float = AVG_NUM_NODES_OC20
    avg_degree: float = AVG_DEGREE_OC20
    use_energy_lin_ref: bool = False
    regress_forces: bool = True
    energy_reduce: str = "sum"
    regress_stress: bool = False
    stress_mlp_layers: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


class TransBlock(nn.Module):
    """x + attention(norm_1(x)), then + ffn(norm_2(x)). Keys ``norm_1``, ``ga``, ``norm_2``, ``ffn``."""

    def __init__(self, cfg: EquiformerV2Config, radial_channels: list[int], emb_elements: int | None):
        super().__init__()
        C, L = cfg.sphere_channels, cfg.lmax
        self.norm_1 = EquivariantLayerNormSH(L, C)
        self.ga = SO2GraphAttention(
            C, cfg.attn_hidden_channels, cfg.num_heads, cfg.attn_alpha_channels,
            cfg.attn_value_channels, C, L, cfg.mmax, radial_channels, emb_elements, cfg.use_attn_renorm,
        )
        self.norm_2 = EquivariantLayerNormSH(L, C)
        self.ffn = GridFeedForward(C, cfg.ffn_hidden_channels, C, L)

    def forward(self, x, ctx, edge_grids, node_grids):
        x = x + self.ga(self.norm_1(x), ctx, *edge_grids)
        return x + self.ffn(self.norm_2(x), *node_grids)


class EquiformerV2(nn.Module):
    """EquiformerV2 with an energy head and a direct-force head (fairchem ``equiformer_v2``).

    Parameter names equal fairchem's state_dict keys without the ``module.`` prefixes.
    """

    def __init__(self, cfg: EquiformerV2Config):
        super().__init__()
        self.cfg = cfg
        C, L, M, Z = cfg.sphere_channels, cfg.lmax, cfg.mmax, cfg.max_num_elements
        self.sphere_embedding = nn.Embedding(Z, C)
        self.distance_expansion = GaussianBasis(cfg.max_radius, NUM_DISTANCE_GAUSSIANS, 2.0)
        ec = cfg.edge_channels
        shared = cfg.use_atom_edge_embedding and cfg.share_atom_edge_embedding
        own = Z if cfg.use_atom_edge_embedding and not cfg.share_atom_edge_embedding else None
        if shared:
            self.source_embedding = nn.Embedding(Z, ec)
            self.target_embedding = nn.Embedding(Z, ec)
        rad_in = NUM_DISTANCE_GAUSSIANS + (2 * ec if cfg.use_atom_edge_embedding else 0)
        radial = [rad_in, ec, ec]
        self.edge_degree_embedding = EdgeDegreeEmbedding(C, L, radial, own, cfg.avg_degree)
        self.blocks = nn.ModuleList(TransBlock(cfg, radial, own) for _ in range(cfg.num_layers))
        self.norm = EquivariantLayerNormSH(L, C)
        self.energy_block = GridFeedForward(C, cfg.ffn_hidden_channels, 1, L)
        if cfg.regress_forces:
            self.force_block = SO2GraphAttention(
                C, cfg.attn_hidden_channels, cfg.num_heads, cfg.attn_alpha_channels,
                cfg.attn_value_channels, 1, L, M, radial, own, cfg.use_attn_renorm,
            )
        if cfg.regress_stress:
            self.stress_head = Rank2StressHead(C, L, cfg.stress_mlp_layers)
        if cfg.use_energy_lin_ref:
            self.register_buffer("energy_lin_ref", torch.zeros(Z))
        # output de-normalisation (set from the checkpoint's normalizers / elementrefs)
        self.register_buffer("energy_mean", torch.tensor(0.0))
        self.register_buffer("energy_std", torch.tensor(1.0))
        self.register_buffer("force_mean", torch.tensor(0.0))
        self.register_buffer("force_std", torch.tensor(1.0))
        self.register_buffer("element_refs", torch.zeros(Z))
        self.reset_derived_buffers()

    def reset_derived_buffers(self) -> None:
        """(Re)compute the constant buffers (layout maps, degree rescale, S2 grids) exactly, in
        float64, then cast them to the model's dtype and device. Not saved in state_dicts;
        load_model swaps in the checkpoint's float32 S2 grids for float32 models, as fairchem
        uses those."""
        cfg, dtype, device = self.cfg, self.dtype, self.device
        L, M = cfg.lmax, cfg.mmax
        edge_to, edge_from = edge_grid(L, M, cfg.grid_resolution)
        node_to, node_from = node_grid(L, cfg.grid_resolution)
        consts = {
            "rescale": degree_rescale(L, M), "edge_to_grid": edge_to, "edge_from_grid": edge_from,
            "node_to_grid": node_to, "node_from_grid": node_from,
        }
        self.register_buffer("mprimary", mprimary_index(L, M).to(device), persistent=False)
        for name, value in consts.items():
            self.register_buffer(name, value.to(dtype=dtype, device=device), persistent=False)
        if cfg.regress_stress:
            self.stress_head.reset_derived_buffers()

    @property
    def dtype(self) -> torch.dtype:
        return self.sphere_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.sphere_embedding.weight.device

    def edge_context(
        self, numbers: torch.Tensor, edge_src: torch.Tensor, edge_dst: torch.Tensor, edge_vec: torch.Tensor
    ) -> EdgeContext:
        """Everything per edge that all layers share: distances, features and edge frames."""
        wigner = edge_wigner(edge_vec, self.cfg.lmax)  # [E, K, K]
        feats = self.distance_expansion(edge_vec.norm(dim=1))
        src_z, dst_z = numbers[edge_src], numbers[edge_dst]
        if self.cfg.use_atom_edge_embedding and self.cfg.share_atom_edge_embedding:
            feats = torch.cat([feats, self.source_embedding(src_z), self.target_embedding(dst_z)], dim=1)
        return EdgeContext(
            src=edge_src, dst=edge_dst, src_z=src_z, dst_z=dst_z, distance_feats=feats,
            rot=wigner[:, self.mprimary, :],
            rot_inv=wigner.transpose(1, 2)[:, :, self.mprimary] * self.rescale,
            num_nodes=numbers.shape[0],
        )

    def forward(
        self,
        numbers: torch.Tensor,
        edge_src: torch.Tensor,
        edge_dst: torch.Tensor,
        edge_vec: torch.Tensor,
        system_idx: torch.Tensor,
        num_systems: int,
        stress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Energies [S] (eV) and forces [N, 3] (eV/Å; None without a force head); with
        ``stress=True`` also the stress [S, 3, 3] (eV/Å³, needs ``cfg.regress_stress``; only
        meaningful for systems periodic in 3-D, which the caller checks).

        numbers [N] int64 (0 < Z < max_num_elements), edge_src/edge_dst [E] int64 (message
        j → i), edge_vec [E, 3] = r_j + shift − r_i in Å (model dtype), system_idx [N].
        """
        if stress and not self.cfg.regress_stress:
            raise ValueError("this model has no stress head (cfg.regress_stress is False)")
        edge_vec = edge_vec.to(self.dtype)
        ctx = self.edge_context(numbers, edge_src, edge_dst, edge_vec)
        x = self.edge_degree_embedding(ctx)
        x[:, 0] += self.sphere_embedding(numbers)
        edge_grids = (self.edge_to_grid, self.edge_from_grid)
        node_grids = (self.node_to_grid, self.node_from_grid)
        for block in self.blocks:
            x = block(x, ctx, edge_grids, node_grids)
        x = self.norm(x)
        node_energy = self.energy_block(x, *node_grids)[:, 0, 0]
        energy = x.new_zeros(num_systems).index_add_(0, system_idx, node_energy)
        if self.cfg.energy_reduce == "mean":
            energy = energy / torch.bincount(system_idx, minlength=num_systems).to(energy.dtype)
        else:
            energy = energy / self.cfg.avg_num_nodes
        if self.cfg.use_energy_lin_ref:
            energy = energy.index_add_(0, system_idx, self.energy_lin_ref[numbers])
        energy = energy * self.energy_std + self.energy_mean
        energy = energy.index_add_(0, system_idx, self.element_refs[numbers])
        forces = None
        if self.cfg.regress_forces:
            forces = self.force_block(x, ctx, *edge_grids)[:, 1:4, 0] * self.force_std + self.force_mean
        if stress:
            return energy, forces, self.stress_head(x, edge_src, edge_dst, edge_vec, system_idx, num_systems)
        return energy, forces

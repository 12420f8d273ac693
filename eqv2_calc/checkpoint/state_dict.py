"""fairchem's EquiformerV2 state_dict, built from an :class:`~eqv2_calc.model.EquiformerV2`.

:func:`fairchem_keys` lists every key fairchem's ``EquiformerV2`` (``equiformer_v2_deprecated.py``)
strict-loads, in its order; :func:`fairchem_state_dict` fills them, prefixed ``module.module.``:
the model's parameters, and the derived buffers fairchem repeats under every module that
holds the shared submodule: ``SO3_rotation.0.mapping.*`` and ``mappingReduced.*``
(coefficient maps), ``SO3_grid.{l}.{m}.*`` for all 0 ≤ l, m ≤ L (S2 grid matrices
[res, res, K_lm] in fairchem's reduced l-primary column order, rescaled by
sqrt((2l'+1)/(2m+1)) for l' > m < l), ``*.expand_index``, ``*.balance_degree_weight`` and
``distance_expansion.offset``. Their values come from the documented formulas and
:mod:`eqv2_calc.so3`; identical copies share one tensor, so a file is not larger than the
parameters. The grids ``SO3_grid.{L}.{M}`` and ``SO3_grid.{L}.{L}`` (the only ones the model
uses) are the model's own matrices, so a load → save → load cycle is exact.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Iterator

import torch

from eqv2_calc.model import NUM_DISTANCE_GAUSSIANS, EquiformerV2, EquiformerV2Config
from eqv2_calc.so3.grid import node_grid
from eqv2_calc.so3.layout import degrees, reduced_to_mprimary

PREFIX = "module.module."
_MAPPING_KEYS = ("l_harmonic", "m_harmonic", "m_complex", "res_size", "to_m", "m_size")
NORMALIZER_BUFFERS = ("energy_mean", "energy_std", "force_mean", "force_std")
_NOT_SAVED = set(NORMALIZER_BUFFERS) | {"element_refs"}


# --------------------------------------------------------------------------- derived buffers
def coefficient_mapping(lmax: int, mmax: int) -> dict[str, torch.Tensor]:
    """fairchem ``CoefficientMappingModule([lmax], [mmax])`` buffers.

    Rows of the reduced l-primary layout (l = 0..L, m = −min(l,M)..min(l,M)): ``l_harmonic``,
    ``m_harmonic`` (|m|), ``m_complex`` (signed m); ``res_size`` = [Kr]; ``to_m`` [Kr, Kr]
    float32 0/1 with ``to_m[p, q] = 1`` when m-primary row p is reduced row q; ``m_size``
    [M+1] = number of degrees per order, L+1−m.
    """
    rows = [(l, m) for l in range(lmax + 1) for m in range(-min(l, mmax), min(l, mmax) + 1)]
    kr = len(rows)
    to_m = torch.zeros(kr, kr)
    to_m[torch.arange(kr), reduced_to_mprimary(lmax, mmax)] = 1.0
    return {
        "l_harmonic": torch.tensor([l for l, _ in rows], dtype=torch.long),
        "m_harmonic": torch.tensor([abs(m) for _, m in rows], dtype=torch.long),
        "m_complex": torch.tensor([m for _, m in rows], dtype=torch.long),
        "res_size": torch.tensor([kr], dtype=torch.long),
        "to_m": to_m,
        "m_size": torch.tensor([lmax + 1 - m for m in range(mmax + 1)], dtype=torch.long),
    }


def _reduced_columns(lmax: int, mmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-layout column, rescale factor) of each reduced l-primary row of an SO3_grid(l, m)."""
    cols, scale = [], []
    for l in range(lmax + 1):
        factor = math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0
        for m in range(-l, l + 1):
            if abs(m) <= mmax:
                cols.append(l * l + m + l)
                scale.append(factor)
    return torch.tensor(cols), torch.tensor(scale, dtype=torch.float64)


@lru_cache(maxsize=32)
def _node_grid(lmax: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached :func:`eqv2_calc.so3.grid.node_grid` (e3nn is slow; callers only index it)."""
    return node_grid(lmax, res)


def s2_grid_matrices(lmax: int, mmax: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fairchem ``SO3_Grid(lmax, mmax, resolution=res, normalization="component")`` buffers.

    (to_grid_mat, from_grid_mat), each float32 [res (β), res (α), Kr] with columns in reduced
    l-primary order (|m| ≤ mmax) and the degrees l > mmax scaled by sqrt((2l+1)/(2 mmax+1)).
    """
    to_full, from_full_t = _node_grid(lmax, res)  # [G, K], [K, G], float64
    cols, scale = _reduced_columns(lmax, mmax)
    to = to_full[:, cols] * scale
    fr = from_full_t.T[:, cols] * scale
    return to.reshape(res, res, -1).float(), fr.reshape(res, res, -1).float()


def _model_grids(model: EquiformerV2) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """The grids the model runs with, back in fairchem's layout (inverse of ``load._set_grids``)."""
    cfg = model.cfg
    L, M, res = cfg.lmax, cfg.mmax, cfg.grid_resolution
    out = {}
    if M < L:
        perm = reduced_to_mprimary(L, M)
        to_mp = model.edge_to_grid.detach().cpu().float()  # [G, Kr] m-primary
        from_mp = model.edge_from_grid.detach().cpu().float().T  # [G, Kr]
        to = torch.empty_like(to_mp)
        fr = torch.empty_like(from_mp)
        to[:, perm] = to_mp
        fr[:, perm] = from_mp
        out[(L, M)] = (to.reshape(res, res, -1).contiguous(), fr.reshape(res, res, -1).contiguous())
    to = model.node_to_grid.detach().cpu().float()
    fr = model.node_from_grid.detach().cpu().float().T
    out[(L, L)] = (to.reshape(res, res, -1).contiguous(), fr.reshape(res, res, -1).contiguous())
    return out


def expand_index(lmax: int) -> torch.Tensor:
    """``SO3_LinearV2.expand_index``: the degree of every full-layout row, int64 [K]."""
    return torch.tensor(degrees(lmax), dtype=torch.long)


def balance_degree_weight(lmax: int) -> torch.Tensor:
    """``EquivariantLayerNormArray(SphericalHarmonics).balance_degree_weight``: [K−1, 1] float32,
    1/(2l+1) for each row of degree l ≥ 1, divided by L (computed in float32 like fairchem)."""
    w = torch.zeros((lmax + 1) ** 2 - 1, 1)
    for l in range(1, lmax + 1):
        w[l * l - 1 : l * l - 1 + 2 * l + 1] = 1.0 / (2 * l + 1)
    return w / lmax


def distance_offset(max_radius: float) -> torch.Tensor:
    """``GaussianSmearing(0, max_radius, 600, 2.0).offset``: linspace centres, float32 [600]."""
    return torch.linspace(0.0, max_radius, NUM_DISTANCE_GAUSSIANS)


# --------------------------------------------------------------------------- fairchem key layout
def _rad_keys(prefix: str) -> Iterator[str]:
    for i in (0, 1, 3, 4, 6):  # Linear, LayerNorm, (SiLU), Linear, LayerNorm, (SiLU), Linear
        yield f"{prefix}rad_func.net.{i}.weight"
        yield f"{prefix}rad_func.net.{i}.bias"


def _mapping_keys(prefix: str) -> Iterator[str]:
    for name in _MAPPING_KEYS:
        yield prefix + name


def _grid_keys(prefix: str, lmax: int) -> Iterator[str]:
    for l in range(lmax + 1):
        for m in range(lmax + 1):
            yield f"{prefix}SO3_grid.{l}.{m}.to_grid_mat"
            yield f"{prefix}SO3_grid.{l}.{m}.from_grid_mat"
            yield from _mapping_keys(f"{prefix}SO3_grid.{l}.{m}.mapping.")


def _norm_keys(prefix: str) -> Iterator[str]:
    yield from (prefix + "affine_weight", prefix + "balance_degree_weight",
                prefix + "norm_l0.weight", prefix + "norm_l0.bias")


def _attention_keys(p: str, cfg: EquiformerV2Config, own_embedding: bool) -> Iterator[str]:
    """``SO2EquivariantGraphAttention`` (``blocks.i.ga`` / ``force_block``)."""
    L, M = cfg.lmax, cfg.mmax
    yield p + "alpha_dot"
    yield from _mapping_keys(p + "SO3_rotation.0.mapping.")
    yield from _mapping_keys(p + "mappingReduced.")
    yield from _grid_keys(p, L)
    if own_embedding:
        yield from (p + "source_embedding.weight", p + "target_embedding.weight")
    yield from _mapping_keys(p + "so2_conv_1.mappingReduced.")
    yield from (p + "so2_conv_1.fc_m0.weight", p + "so2_conv_1.fc_m0.bias")
    for i in range(M):
        yield f"{p}so2_conv_1.so2_m_conv.{i}.fc.weight"
    yield from _rad_keys(p + "so2_conv_1.")
    if cfg.use_attn_renorm:
        yield from (p + "alpha_norm.weight", p + "alpha_norm.bias")
    yield from _mapping_keys(p + "so2_conv_2.mappingReduced.")
    yield from (p + "so2_conv_2.fc_m0.weight", p + "so2_conv_2.fc_m0.bias")
    for i in range(M):
        yield f"{p}so2_conv_2.so2_m_conv.{i}.fc.weight"
    yield from (p + "proj.weight", p + "proj.bias", p + "proj.expand_index")


def _ffn_keys(p: str, lmax: int) -> Iterator[str]:
    """``FeedForwardNetwork`` with use_grid_mlp and use_sep_s2_act (``blocks.i.ffn`` / ``energy_block``)."""
    yield from _grid_keys(p, lmax)
    yield from (p + "so3_linear_1.weight", p + "so3_linear_1.bias", p + "so3_linear_1.expand_index")
    yield from (p + "scalar_mlp.0.weight", p + "scalar_mlp.0.bias")
    yield from (p + "grid_mlp.0.weight", p + "grid_mlp.2.weight", p + "grid_mlp.4.weight")
    yield from (p + "so3_linear_2.weight", p + "so3_linear_2.bias", p + "so3_linear_2.expand_index")


def fairchem_keys(cfg: EquiformerV2Config) -> list[str]:
    """fairchem 1.10 ``EquiformerV2`` state_dict keys (no ``module.`` prefix), in its order."""
    L = cfg.lmax
    own = cfg.use_atom_edge_embedding and not cfg.share_atom_edge_embedding
    keys: list[str] = []
    if cfg.use_energy_lin_ref:
        keys.append("energy_lin_ref")
    keys += ["sphere_embedding.weight", "distance_expansion.offset"]
    if cfg.use_atom_edge_embedding and cfg.share_atom_edge_embedding:
        keys += ["source_embedding.weight", "target_embedding.weight"]
    keys += _mapping_keys("SO3_rotation.0.mapping.")
    keys += _mapping_keys("mappingReduced.")
    keys += _grid_keys("", L)
    p = "edge_degree_embedding."
    keys += _mapping_keys(p + "SO3_rotation.0.mapping.")
    keys += _mapping_keys(p + "mappingReduced.")
    if own:
        keys += [p + "source_embedding.weight", p + "target_embedding.weight"]
    keys += _rad_keys(p)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        keys += _norm_keys(p + "norm_1.")
        keys += _attention_keys(p + "ga.", cfg, own)
        keys += _norm_keys(p + "norm_2.")
        keys += _ffn_keys(p + "ffn.", L)
    keys += _norm_keys("norm.")
    keys += _ffn_keys("energy_block.", L)
    if cfg.regress_forces:
        keys += _attention_keys("force_block.", cfg, own)
    return keys


class _DerivedBuffers:
    """Values of the derived buffers, one shared tensor per distinct value."""

    def __init__(self, model: EquiformerV2):
        cfg = model.cfg
        self.cfg = cfg
        self._cache: dict[tuple, Any] = {}
        self._model_grids = _model_grids(model)

    def _get(self, key: tuple, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def grid(self, l: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (l, m) in self._model_grids:
            return self._model_grids[(l, m)]
        return self._get(("grid", l, m), lambda: s2_grid_matrices(l, m, self.cfg.grid_resolution))

    def __call__(self, key: str) -> torch.Tensor | None:
        """The value of a derived key, or None if ``key`` is a model parameter."""
        cfg = self.cfg
        parts = key.split(".")
        leaf = parts[-1]
        if key == "distance_expansion.offset":
            return self._get(("offset",), lambda: distance_offset(cfg.max_radius))
        if leaf == "expand_index":
            return self._get(("expand",), lambda: expand_index(cfg.lmax))
        if leaf == "balance_degree_weight":
            return self._get(("balance",), lambda: balance_degree_weight(cfg.lmax))
        if "SO3_grid" in parts:
            i = parts.index("SO3_grid")
            l, m = int(parts[i + 1]), int(parts[i + 2])
            if leaf == "to_grid_mat":
                return self.grid(l, m)[0]
            if leaf == "from_grid_mat":
                return self.grid(l, m)[1]
            return self._get(("map", l, l), lambda: coefficient_mapping(l, l))[leaf]
        if "SO3_rotation" in parts:
            return self._get(("map", cfg.lmax, cfg.lmax), lambda: coefficient_mapping(cfg.lmax, cfg.lmax))[leaf]
        if "mappingReduced" in parts:
            return self._get(("map", cfg.lmax, cfg.mmax), lambda: coefficient_mapping(cfg.lmax, cfg.mmax))[leaf]
        return None


def fairchem_state_dict(model: EquiformerV2, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The model's weights as fairchem's full state_dict (float32, CPU, every derived buffer)."""
    cfg = model.cfg
    own = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in _NOT_SAVED}
    derived = _DerivedBuffers(model)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for key in fairchem_keys(cfg):
        value = derived(key)
        if value is None:
            if key not in own:
                raise ValueError(f"the model has no parameter {key!r} that fairchem's EquiformerV2 needs")
            value = own[key]
            value = value.float() if value.is_floating_point() else value
            used.add(key)
        out[prefix + key] = value
    extra = sorted(set(own) - used)
    if extra:
        raise ValueError(f"model parameters with no place in fairchem's EquiformerV2 state_dict: {extra[:8]}")
    return out


__all__ = [
    "PREFIX", "NORMALIZER_BUFFERS", "fairchem_keys", "fairchem_state_dict", "coefficient_mapping",
    "s2_grid_matrices", "expand_index", "balance_degree_weight", "distance_offset",
]

"""What a checkpoint's config says: the model layout (plain, fairchem 1.x or hydra with heads),
the EquiformerV2 hyper-parameters, and the output normalizers / element references.

Config layouts read:

* 2023 OCP trainer files (official OC20 2023_06 / OC22 2023_10): ``config["model"] =
  "equiformer_v2"`` + ``config["model_attributes"]``;
* fairchem 1.x: ``config["model"] = {"name": "equiformer_v2", ...}``;
* hydra: ``config["model"] = {"name": "hydra", "backbone": {...}, "heads": {...}}`` with energy,
  force and rank-2 stress heads under every name fairchem releases gave them
  (:data:`BACKBONE_NAMES`, :data:`HEAD_NAMES`).

The normalisation constants ``avg_num_nodes`` / ``avg_degree`` are also read under the names the
ODAC direct IS2RE config uses, ``norm_scale_nodes`` / ``norm_scale_degree``
(:data:`NORM_SCALE_NAMES`); a config with neither name of one gets fairchem 1.10's default
(:data:`FAIRCHEM_DEFAULT_CONSTANTS`). ``regress_forces=False`` (a plain config) or a hydra file
without a force head describes an energy-only model.

Normalizers: 2023 files key them ``target`` / ``grad_target`` (``{mean, std}``), fairchem 1.x
files ``energy`` / ``forces`` (``std`` or ``rmsd``) and, for stress heads,
``<name>_isotropic`` / ``<name>_anisotropic``; fairchem 1.x ``elementrefs`` hold per-element
energies (eV) indexed by atomic number.

Used by :func:`eqv2_calc.checkpoint.load.load_model`; the names are also importable from
:mod:`eqv2_calc.checkpoint.load`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eqv2_calc.checkpoint.keymap import DEFAULT_HEAD_ROLES
from eqv2_calc.errors import CheckpointError
from eqv2_calc.model import AVG_DEGREE_OC20, AVG_NUM_NODES_OC20, EquiformerV2Config

_DENS_BACKBONES = {"equiformer_v2_dens_backbone", "EqV2DeNSBackbone"}
_EQV2_NAMES = {"equiformer_v2", "equiformerv2", "equiformer_v2_backbone", "EquiformerV2", "EquiformerV2Backbone",
               *_DENS_BACKBONES}
BACKBONE_NAMES = frozenset(_EQV2_NAMES)
"""Model / backbone names read (registry names or the last component of a module path, e.g.
``fairchem.core.models.equiformer_v2.equiformer_v2_dens.EqV2DeNSBackbone`` or the early
``fairchem.experimental....equiformer_v2_denoising.EqV2DeNSBackbone``)."""
HEAD_NAMES: dict[str, frozenset[str]] = {
    "energy": frozenset({"equiformerV2_scalar_head", "equiformer_v2_energy_head", "EqV2ScalarHead",
                         "EquiformerV2EnergyHead", "eqV2_DeNS_scalar_head", "DeNSScalarHead",
                         "equiformer_v2_dens_energy_head", "DeNSEnergyHead"}),
    "forces": frozenset({"equiformerV2_vector_head", "equiformer_v2_force_head", "EqV2VectorHead",
                         "EquiformerV2ForceHead", "eqV2_DeNS_vector_head", "DeNSVectorHead",
                         "equiformer_v2_dens_force_head", "DeNSForceHead"}),
    "stress": frozenset({"rank2_symmetric_head", "Rank2SymmetricTensorHead", "dens_rank2_symmetric_head",
                         "DeNSRank2Head"}),
}
"""Head role → module names read (registry names or the class name ending a module path such as
``fairchem.core.models.equiformer_v2.heads.EqV2ScalarHead`` or
``fairchem.core.models.equiformer_v2.prediction_heads.rank2.Rank2SymmetricTensorHead``)."""
_HEAD_OPTIONS = {  # options a head config may carry (others could change the computation: refused)
    "energy": {"module", "output_name", "reduce", "use_denoising"},
    "forces": {"module", "output_name"},
    "stress": {"module", "output_name", "decompose", "edge_level_mlp", "num_mlp_layers",
               "use_source_target_embedding", "extensive", "avg_num_nodes", "default_norm_type", "use_denoising"},
}
_STRESS_REQUIRED = {  # option: (value required, fairchem default) — every official stress head
    "decompose": (True, False), "edge_level_mlp": (False, False), "use_source_target_embedding": (True, False),
    "extensive": (False, False),
}
_REQUIRED_VALUES = {  # option: values this implementation supports (all official checkpoints use these)
    "norm_type": {"layer_norm_sh"},
    "use_grid_mlp": {True},
    "use_sep_s2_act": {True},
    "use_gate_act": {False},
    "use_s2_act_attn": {False},
    "use_m_share_rad": {False},
    "distance_function": {"gaussian"},
}
_FAIRCHEM_DEFAULTS = {  # fairchem 1.x constructor defaults for options a config may omit
    "max_neighbors": 500, "max_radius": 5.0, "max_num_elements": 90, "num_layers": 12,
    "sphere_channels": 128, "attn_hidden_channels": 128, "num_heads": 8, "attn_alpha_channels": 32,
    "attn_value_channels": 16, "ffn_hidden_channels": 512, "norm_type": "rms_norm_sh",
    "lmax_list": [6], "mmax_list": [2], "grid_resolution": None, "edge_channels": 128,
    "use_atom_edge_embedding": True, "share_atom_edge_embedding": False, "use_m_share_rad": False,
    "distance_function": "gaussian", "use_s2_act_attn": False, "use_attn_renorm": True,
    "use_gate_act": False, "use_grid_mlp": False, "use_sep_s2_act": True,
    "enforce_max_neighbors_strictly": True, "avg_num_nodes": None, "avg_degree": None,
    "use_energy_lin_ref": False, "load_energy_lin_ref": False, "use_pbc": True, "regress_forces": True,
}
NORM_SCALE_NAMES: dict[str, str] = {"norm_scale_nodes": "avg_num_nodes", "norm_scale_degree": "avg_degree"}
"""Other config names of the two normalisation constants → the names fairchem 1.10 reads.

The ODAC direct IS2RE checkpoint (``EquiformerV2-IS2RE-ODAC``; fairchem's
``configs/odac/is2re/eqv2_31M.yml``) names them ``norm_scale_nodes`` / ``norm_scale_degree``,
with the values the ODAC S2EF configs give as ``avg_num_nodes`` / ``avg_degree`` (192.561 and
21.024127419363214): the same two quantities, the divisor of the summed atom energies and that
of the edge-degree embedding (not their square roots). fairchem 1.10 itself cannot build that
model, as its constructor has no parameters of these names (fairchem issue #892)."""
FAIRCHEM_DEFAULT_CONSTANTS: dict[str, float] = {"avg_num_nodes": AVG_NUM_NODES_OC20, "avg_degree": AVG_DEGREE_OC20}
"""The constants fairchem 1.10 uses when a config gives neither name of one: its ``EquiformerV2``
and ``EquiformerV2Backbone`` constructors default ``avg_num_nodes`` / ``avg_degree`` to None
and replace a missing (None or 0) value with the module constants ``_AVG_NUM_NODES = 77.81317``
/ ``_AVG_DEGREE = 23.395238876342773`` (OC20 IS2RE-100k statistics: 5 Å cutoff, 100
neighbours). The official OC20 and OC22 configs rely on this default. The DeNS backbones are
different: their releases used different defaults, so a DeNS config without the constants is
refused."""


@dataclass(frozen=True)
class _Layout:
    """What a config says about the model: backbone options and, for hydra files, the heads."""

    opts: dict
    head_roles: dict = field(default_factory=lambda: dict(DEFAULT_HEAD_ROLES))  # hydra head name → role
    energy_reduce: str = "sum"
    stress: dict | None = None  # {"output_name", "num_mlp_layers"} of the stress head
    dens: bool = False


def _short(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1]


def _finetune_error(model: dict, path: Path) -> CheckpointError:
    start = (model.get("finetune_config") or {}).get("starting_checkpoint")
    return CheckpointError(
        f"{path}: config['model'] is a hydra fine-tuning config without a 'backbone' section: it takes the "
        f"architecture from its starting checkpoint {start!r} (finetune_config.starting_checkpoint), which "
        "is not part of this file. The weights in state_dict are complete; to use the file, convert it: copy "
        "config['model']['backbone'] (and config['model']['heads'] if this file has none) from the starting "
        "checkpoint's config into this file's config['model'], delete config['model']['finetune_config'] "
        "and save it again (torch.load / torch.save). The published OMat24/MPtrj/sAlex files already have it."
    )


def _hydra_heads(model: dict, path: Path) -> tuple[dict, str, dict | None]:
    """(head name → role, energy reduction, stress-head settings) of a hydra config."""
    heads = model.get("heads")
    if not isinstance(heads, dict) or not heads:
        raise _finetune_error(model, path) if "finetune_config" in model else CheckpointError(
            f"{path}: hydra config without 'heads'")
    roles: dict[str, str] = {}
    reduce, stress = "sum", None
    for head, hcfg in heads.items():
        hcfg = hcfg or {}
        module = _short(hcfg.get("module", ""))
        role = next((r for r, names in HEAD_NAMES.items() if module in names), None)
        if role is None:
            raise CheckpointError(
                f"{path}: output head {head!r} ({hcfg.get('module')!r}) is not supported; supported: "
                "EquiformerV2 energy, force and rank-2 stress heads (including DeNS) under their fairchem names"
            )
        if role in roles.values():
            raise CheckpointError(f"{path}: more than one {role} head ({sorted(heads)})")
        unknown = set(hcfg) - _HEAD_OPTIONS[role]
        if unknown:
            raise CheckpointError(f"{path}: {role} head {head!r} has options eqv2-calc does not implement: "
                                  f"{sorted(unknown)}")
        roles[head] = role
        if role == "energy":
            reduce = hcfg.get("reduce", "sum")
            if reduce not in ("sum", "mean"):
                raise CheckpointError(f"{path}: energy head reduce={reduce!r}; expected 'sum' or 'mean'")
        elif role == "stress":
            for key, (required, default) in _STRESS_REQUIRED.items():
                if bool(hcfg.get(key, default)) != required:
                    raise CheckpointError(
                        f"{path}: stress head {key}={hcfg.get(key, default)!r} is not supported (supported: "
                        f"{required}, as in every official OMat24/MPtrj/sAlex/DeNS checkpoint)")
            layers = int(hcfg.get("num_mlp_layers", 2))
            if layers < 1:
                raise CheckpointError(f"{path}: stress head num_mlp_layers={layers}")
            stress = {"output_name": hcfg.get("output_name", "stress"), "num_mlp_layers": layers}
    if "energy" not in roles.values():
        raise CheckpointError(f"{path}: hydra model without an energy head ({sorted(heads)})")
    return roles, reduce, stress


def _model_options(config: dict, path: Path) -> _Layout:
    """The EquiformerV2 hyper-parameters (and hydra heads) from any of the three config layouts."""
    model = config.get("model")
    layout: dict[str, Any] = {}
    if isinstance(model, str):
        name, opts = model, dict(config.get("model_attributes", {}))
    elif isinstance(model, dict):
        name = model.get("name", "")
        opts = dict(model)
        if name == "hydra":
            if not isinstance(model.get("backbone"), dict):
                raise _finetune_error(model, path)
            backbone = dict(model["backbone"])
            name = backbone.pop("model", "")
            opts = backbone
            roles, reduce, stress = _hydra_heads(model, path)
            layout = dict(head_roles=roles, energy_reduce=reduce, stress=stress)
            opts["regress_forces"] = "forces" in roles.values()
    else:
        raise CheckpointError(f"{path}: config['model'] is missing; not a fairchem model checkpoint")
    short = _short(name)
    if name not in _EQV2_NAMES and short not in _EQV2_NAMES:
        raise CheckpointError(
            f"{path} holds a {name!r} model, not EquiformerV2; eqv2-calc only runs EquiformerV2 checkpoints"
        )
    opts = _rename_norm_scale(opts, path)
    dens = short in _DENS_BACKBONES
    if dens:
        missing = [k for k in ("avg_num_nodes", "avg_degree") if not opts.get(k)]
        if missing:  # the DeNS classes of different releases default to different constants
            raise CheckpointError(f"{path}: DeNS backbone config without {missing}; its releases used different "
                                  "defaults, so the value cannot be inferred")
    return _Layout(opts={**_FAIRCHEM_DEFAULTS, **opts}, dens=dens, **layout)


def _rename_norm_scale(opts: dict, path: Path | str) -> dict:
    """``opts`` with ``norm_scale_nodes`` / ``norm_scale_degree`` renamed as :data:`NORM_SCALE_NAMES`
    says; a config giving a constant under both names with different values is refused."""
    out = dict(opts)
    for old, new in NORM_SCALE_NAMES.items():
        if old not in out:
            continue
        value = out.pop(old)
        current = out.get(new)
        if current and value and current != value:
            raise CheckpointError(
                f"{path}: the config gives {new}={current!r} and {old}={value!r}, two different values of the "
                "same normalisation constant; it cannot be told which one the model was trained with"
            )
        if not current:
            out[new] = value
    return out


def _constant(opts: dict, name: str, path: Path | str) -> float:
    """The normalisation constant ``name`` (avg_num_nodes or avg_degree) of ``opts``: its value,
    or fairchem 1.10's default (:data:`FAIRCHEM_DEFAULT_CONSTANTS`) when missing, None or 0."""
    value = opts.get(name)
    if not value:
        return FAIRCHEM_DEFAULT_CONSTANTS[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise CheckpointError(f"{path}: {name}={value!r}; the normalisation constant must be a positive number")
    return number


def config_from_options(
    opts: dict, path: Path | str = "checkpoint", energy_reduce: str = "sum", stress_mlp_layers: int | None = None
) -> EquiformerV2Config:
    """Map fairchem hyper-parameters onto :class:`EquiformerV2Config`, rejecting unsupported variants.

    ``energy_reduce`` / ``stress_mlp_layers`` (None: no stress head) come from a hydra file's heads.
    The normalisation constants are read as ``avg_num_nodes`` / ``avg_degree`` or under their ODAC
    IS2RE names ``norm_scale_nodes`` / ``norm_scale_degree`` (:data:`NORM_SCALE_NAMES`); a config
    with neither name of a constant gets fairchem 1.10's default (:data:`FAIRCHEM_DEFAULT_CONSTANTS`).
    ``regress_forces=False`` (direct IS2RE models) builds a model without a force head.
    """
    opts = _rename_norm_scale(opts, path)
    for key, allowed in _REQUIRED_VALUES.items():
        if opts.get(key) not in allowed:
            raise CheckpointError(
                f"{path}: {key}={opts.get(key)!r} is not supported (supported: {sorted(map(str, allowed))}); "
                "every official EquiformerV2 checkpoint uses the supported setting"
            )
    lmax, mmax = list(opts["lmax_list"]), list(opts["mmax_list"])
    if len(lmax) != 1 or len(mmax) != 1:
        raise CheckpointError(f"{path}: multi-resolution lmax_list={lmax} is not supported")
    if not isinstance(opts["grid_resolution"], int):
        raise CheckpointError(f"{path}: grid_resolution={opts['grid_resolution']!r}; an integer is required")
    if opts["use_energy_lin_ref"] and not opts["load_energy_lin_ref"]:
        raise CheckpointError(f"{path}: use_energy_lin_ref=True needs load_energy_lin_ref=True")
    return EquiformerV2Config(
        num_layers=opts["num_layers"], sphere_channels=opts["sphere_channels"],
        attn_hidden_channels=opts["attn_hidden_channels"], num_heads=opts["num_heads"],
        attn_alpha_channels=opts["attn_alpha_channels"], attn_value_channels=opts["attn_value_channels"],
        ffn_hidden_channels=opts["ffn_hidden_channels"], lmax=lmax[0], mmax=mmax[0],
        grid_resolution=opts["grid_resolution"], edge_channels=opts["edge_channels"],
        max_num_elements=opts["max_num_elements"], max_radius=float(opts["max_radius"]),
        max_neighbors=int(opts["max_neighbors"]),
        enforce_max_neighbors_strictly=bool(opts["enforce_max_neighbors_strictly"]),
        use_pbc=bool(opts["use_pbc"]), use_atom_edge_embedding=bool(opts["use_atom_edge_embedding"]),
        share_atom_edge_embedding=bool(opts["share_atom_edge_embedding"]),
        use_attn_renorm=bool(opts["use_attn_renorm"]),
        avg_num_nodes=_constant(opts, "avg_num_nodes", path),
        avg_degree=_constant(opts, "avg_degree", path),
        use_energy_lin_ref=bool(opts["use_energy_lin_ref"] and opts["load_energy_lin_ref"]),
        regress_forces=bool(opts["regress_forces"]),
        energy_reduce=energy_reduce,
        regress_stress=stress_mlp_layers is not None,
        stress_mlp_layers=stress_mlp_layers or 2,
    )


def _normalizer(norms: dict, *names: str) -> tuple[float, float]:
    """(mean, std) of the first normalizer present under ``names``; identity if none."""
    for name in names:
        if name in norms and norms[name] is not None:
            entry = norms[name]
            std = entry.get("std", entry.get("rmsd", 1.0))
            return float(torch.as_tensor(entry.get("mean", 0.0))), float(torch.as_tensor(std))
    return 0.0, 1.0


def _normalizer_tensors(norms: dict, name: str, size: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rmsd) of normalizer ``name`` as [size] tensors (a scalar broadcasts); identity if absent."""
    entry = norms.get(name)
    if entry is None:
        return torch.zeros(size), torch.ones(size)
    out = []
    for value in (entry.get("mean", 0.0), entry.get("std", entry.get("rmsd", 1.0))):
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() not in (1, size):
            raise CheckpointError(f"{path}: normalizer {name!r} has {t.numel()} values, expected 1 or {size}")
        out.append(t.expand(size).clone())
    return out[0], out[1]


def _element_refs(ckpt: dict) -> torch.Tensor | None:
    refs = (ckpt.get("elementrefs") or {}).get("energy")
    if refs is None:
        return None
    if isinstance(refs, dict):
        refs = next((v for k, v in refs.items() if "element_references" in k), None)
    return None if refs is None else torch.as_tensor(refs, dtype=torch.float32).flatten()

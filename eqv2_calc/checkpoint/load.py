"""Load fairchem EquiformerV2 checkpoints into :class:`eqv2_calc.model.EquiformerV2`.

Supported layouts:

* 2023 OCP trainer files (official OC20 2023_06 / OC22 2023_10): ``config["model"] =
  "equiformer_v2"`` + ``config["model_attributes"]``, keys prefixed ``module.module.``,
  ``normalizers = {"target": {mean, std}, "grad_target": {mean, std}}``;
* fairchem 1.x: ``config["model"] = {"name": "equiformer_v2", ...}``, normalizers keyed
  ``energy`` / ``forces`` with ``std`` or ``rmsd``, optional ``elementrefs``;
* hydra: ``config["model"] = {"name": "hydra", "backbone": {...}, "heads": {...}}`` with
  ``backbone.*``, ``output_heads.energy.energy_block.*``, ``output_heads.forces.force_block.*``;
  the materials checkpoints (OMat24, MPtrj, sAlex) add a stress head
  (``rank2_symmetric_head``: ``output_heads.stress.*``, normalizers ``stress_isotropic`` /
  ``stress_anisotropic``), and the DeNS ones use the DeNS backbone and heads under every name
  fairchem releases gave them (:data:`BACKBONE_NAMES`, :data:`HEAD_NAMES`; keys in
  :mod:`eqv2_calc.checkpoint.keymap`).

Weights come from ``state_dict`` like fairchem's OCPCalculator; ``use_ema=True`` takes the
``ema`` shadow weights instead when the file has them. Output de-normalisation
(normalizers, OC22 ``energy_lin_ref``, fairchem 1.x ``elementrefs``, the two stress parts) is
applied exactly as OCPCalculator does, inside the model.

Files are unpickled with ``torch.load(weights_only=True)`` plus the small allow-list
:func:`checkpoint_safe_globals`, scoped to the call (torch's global allow-list is left as it
was). Anything else in a file's pickle (a class, a function) could run arbitrary code when
unpickled, so such a file is refused with a :class:`CheckpointError` unless the caller passes
``trust_checkpoint=True`` (``--trust-checkpoint`` on the command line), which loads it with the
full unpickler and warns (:class:`TrustedCheckpointWarning`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eqv2_calc.checkpoint.keymap import DEFAULT_HEAD_ROLES, is_derived, is_folded, is_ignored, strip_prefixes
from eqv2_calc.checkpoint.registry import file_sha256, model_info, resolve_checkpoint
from eqv2_calc.errors import CheckpointError
from eqv2_calc.model import AVG_DEGREE_OC20, AVG_NUM_NODES_OC20, EquiformerV2, EquiformerV2Config
from eqv2_calc.so3.layout import reduced_to_mprimary

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


@dataclass(frozen=True)
class CheckpointMeta:
    """What a loaded checkpoint is. Energies in eV, cutoff in Å."""

    path: str
    sha256: str
    architecture: str
    energy_convention: str
    cutoff: float
    max_neighbors: int
    strict_max_neighbors: bool
    num_parameters: int
    weights: str
    config: dict = field(repr=False)
    properties: tuple[str, ...] = ("energy", "forces")
    model_info: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "config"}

    @property
    def has_stress(self) -> bool:
        return "stress" in self.properties


class TrustedCheckpointWarning(UserWarning):
    """A checkpoint was unpickled with the full pickle unpickler because the caller trusted it."""


def checkpoint_safe_globals() -> list:
    """The globals a checkpoint's pickle may name beyond torch's weights-only defaults.

    torch's defaults already cover what the fairchem layouts hold: tensors and parameters,
    ``collections.OrderedDict`` (every ``state_dict``), dicts, lists, tuples, sets, str, int,
    float, bool and None (``config``, ``normalizers``, ``elementrefs``, ``ema``, ``optimizer``,
    ``scheduler``, ``amp``, ``epoch``/``step``, ``val_metrics``, ``best_val_metric``). The
    fairchem-written parity fixtures, the shipped model and the files written by
    :mod:`eqv2_calc.checkpoint.save` load with the defaults alone.

    The one addition is **numpy scalars** (``np.float64(0.2)``, ``np.int64(7)``, ``np.bool_``):
    fairchem's trainers store ``val_metrics`` and ``best_val_metric`` as returned by its
    evaluator, and the metrics computed with numpy (e.g. IS2RS ``average_distance_within_threshold``
    in a single-process run) are numpy scalars; torch names them as one of the most common
    reasons a checkpoint fails to load with ``weights_only=True``. Unpickling a numpy scalar
    needs three things, all pure data constructors that call no user code:

    * ``numpy.core.multiarray.scalar`` (numpy 1.x name) / ``numpy._core.multiarray.scalar``
      (numpy 2.x name; both are listed, the pickle records the writer's name);
    * ``numpy.dtype`` (the scalar's dtype is pickled as ``numpy.dtype('f8', ...)``);
    * the dtype classes of bool, signed/unsigned integer and float dtypes
      (``numpy.dtypes.Float64DType``, ...): the dtype's state is set with BUILD, which torch
      only allows for allow-listed types.

    Not listed, because no official layout stores them: numpy arrays (``_reconstruct``,
    ``ndarray``), ``argparse.Namespace``, ``torch.torch_version.TorchVersion``, datetime,
    pathlib paths or any fairchem class. Such a file needs ``trust_checkpoint=True``.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core.multiarray import scalar

    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dict.fromkeys(type(np.dtype(k)) for k in kinds),
    ]


@contextlib.contextmanager
def _allow(extra: list):
    """Add ``extra`` to torch's weights-only allow-list for the duration of the block.

    Only the entries not already allowed are added (and later removed), so an allow-list the
    user set up with ``torch.serialization.add_safe_globals`` is left exactly as it was.
    """
    present = set(torch.serialization.get_safe_globals())
    missing = [g for g in extra if g not in present]
    with torch.serialization.safe_globals(missing):
        yield


_TORCH_REASON = re.compile(
    r"(Unsupported global: GLOBAL \S+|Trying to load unsupported GLOBAL \S+ whose module \S+ is blocked"
    r"|Trying to call reduce for unrecognized function [^\n]+|Can only [^\n]+|Unsupported operand [^\n]+)"
)


def _unsafe_globals(path: Path, allowed: list) -> list[str]:
    """The globals in the file's pickle outside the allow-list (static scan, nothing executed)."""
    try:
        with _allow(allowed):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format, unreadable file
        return []


def _refusal(path: Path, exc: Exception, unsafe: list[str]) -> str:
    m = _TORCH_REASON.search(str(exc))
    reason = m.group(1).rstrip(".") if m else str(exc).strip().splitlines()[-1]
    if not unsafe and m and "GLOBAL " in reason:  # legacy (non-zip) files: the static scan needs a zip
        unsafe = [reason.split("GLOBAL ", 1)[1].split()[0]]
    how = ("If you trust the source of this file, load it with trust_checkpoint=True "
           "(command line: --trust-checkpoint); that unpickles it in full.")
    if unsafe:
        return (
            f"refused to load {path}: its pickle holds {', '.join(unsafe)}, which a safe "
            "(weights-only) load does not allow; only tensors, containers, numbers, strings and "
            "numpy scalars are. Unpickling other objects can run arbitrary code on this machine. "
            f"{how} (torch: {reason})"
        )
    return (
        f"refused to load {path}: torch's safe (weights-only) unpickler cannot read it ({reason}). "
        "Either the file is corrupt, or its pickle holds objects beyond tensors, containers, numbers "
        f"and strings, whose unpickling can run arbitrary code. {how}"
    )


def _read(path: Path, trust_checkpoint: bool = False) -> dict:
    allowed = checkpoint_safe_globals()
    try:
        with _allow(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_checkpoint:
            raise CheckpointError(_refusal(path, exc, _unsafe_globals(path, allowed))) from exc
        warnings.warn(
            f"trust_checkpoint=True: unpickling {path} with the full pickle unpickler (it holds objects a "
            "safe load refuses; this can run code from the file)",
            TrustedCheckpointWarning, stacklevel=3,
        )
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"cannot read checkpoint {path} ({type(exc2).__name__}: {exc2})") from exc2
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file is corrupt, "
            "truncated or not a torch checkpoint"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a fairchem checkpoint (expected a dict with 'config' and 'state_dict', got {keys})"
        )
    return ckpt


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
    dens = short in _DENS_BACKBONES
    if dens:
        missing = [k for k in ("avg_num_nodes", "avg_degree") if not opts.get(k)]
        if missing:  # the DeNS classes of different releases default to different constants
            raise CheckpointError(f"{path}: DeNS backbone config without {missing}; its releases used different "
                                  "defaults, so the value cannot be inferred")
    return _Layout(opts={**_FAIRCHEM_DEFAULTS, **opts}, dens=dens, **layout)


def config_from_options(
    opts: dict, path: Path | str = "checkpoint", energy_reduce: str = "sum", stress_mlp_layers: int | None = None
) -> EquiformerV2Config:
    """Map fairchem hyper-parameters onto :class:`EquiformerV2Config`, rejecting unsupported variants.

    ``energy_reduce`` / ``stress_mlp_layers`` (None: no stress head) come from a hydra file's heads.
    """
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
        avg_num_nodes=float(opts["avg_num_nodes"] or AVG_NUM_NODES_OC20),
        avg_degree=float(opts["avg_degree"] or AVG_DEGREE_OC20),
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


def _mapped_state(sd: dict[str, torch.Tensor], model: EquiformerV2, roles: dict[str, str], path: Path):
    """Map keys; return (local key → tensor, grid buffers, local keys in the file's order).

    Derived buffers are left out (the S2 grids are returned separately); DeNS training-only
    blocks and encodings are kept here under their local names (dropped / folded later).
    """
    cfg = model.cfg
    L, M = cfg.lmax, cfg.mmax
    grids: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for key, value in sd.items():
        local = strip_prefixes(key, roles)
        for name, (l, m, kind) in {"edge_to": (L, M, "to"), "edge_from": (L, M, "from"),
                                   "node_to": (L, L, "to"), "node_from": (L, L, "from")}.items():
            if local == f"SO3_grid.{l}.{m}.{kind}_grid_mat":  # with M == L one buffer serves both
                grids.setdefault(name, value)
        if is_derived(local):
            continue
        if local.startswith("output_heads."):
            raise CheckpointError(
                f"{path}: output head {local.split('.')[1]!r} is not supported "
                "(only energy, forces and stress heads)"
            )
        raw[local] = value
        order.append(local)
    return raw, grids, order


def _is_parameter(local: str, params: set[str]) -> bool:
    """Whether fairchem holds ``local`` as a trainable parameter (so it has an EMA shadow)."""
    if is_folded(local):
        return True
    if is_ignored(local):  # denoising_pos_block: the same module type as force_block
        return "force_block." + local.split(".", 1)[1] in params
    return local in params


def _assemble(raw: dict[str, torch.Tensor], model: EquiformerV2, path: Path):
    """(state for load_state_dict, [DeNS biases to add to the l = 0 atom embedding, in fairchem's order])."""
    state, folded = {}, []
    for local, value in raw.items():
        if is_ignored(local):
            continue
        if is_folded(local):
            if local.endswith(".bias"):
                folded.append((local, value))
            continue
        if local == "energy_lin_ref" and not model.cfg.use_energy_lin_ref:
            continue
        state[local] = value
    order = {"force_embedding.bias": 0, "noise_schedule_sigma_embedding.bias": 1}  # fairchem adds them in this order
    folded.sort(key=lambda kv: order.get(kv[0], 2))
    for name, bias in folded:
        if bias.shape != (model.cfg.sphere_channels,):
            raise CheckpointError(f"{path}: {name} has shape {tuple(bias.shape)}, expected ({model.cfg.sphere_channels},)")
    return state, [b for _, b in folded]


def _set_grids(model: EquiformerV2, grids: dict[str, torch.Tensor]) -> None:
    """Use the checkpoint's S2 grid matrices (fairchem reduced l-primary [res, res, K])."""
    cfg = model.cfg
    perm = reduced_to_mprimary(cfg.lmax, cfg.mmax)
    for name, value in grids.items():
        mat = value.reshape(-1, value.shape[-1]).to(model.dtype)
        if name.startswith("edge"):
            mat = mat[:, perm]
        target = getattr(model, f"{name}_grid")
        mat = mat if name.endswith("to") else mat.T
        if mat.shape != target.shape:
            raise CheckpointError(f"S2 grid {name} has shape {tuple(mat.shape)}, expected {tuple(target.shape)}")
        target.copy_(mat)


def load_model(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
    trust_checkpoint: bool = False,
) -> tuple[EquiformerV2, CheckpointMeta]:
    """Build the model stored in a checkpoint file or named official checkpoint.

    Returns ``(model, meta)``: the model in eval mode with frozen parameters, on ``device``
    in ``dtype`` (float32 or float64). ``use_ema`` takes the EMA shadow weights if present.
    ``trust_checkpoint``: also load files whose pickle holds objects beyond the safe allow-list
    (:func:`checkpoint_safe_globals`), with the full unpickler, which can run code from the
    file; without it such a file is refused. Only for files from a source you trust.
    Raises :class:`~eqv2_calc.errors.CheckpointError` for missing, corrupt, unsafe or
    unsupported files (and for a registry file whose sha256 does not match).
    """
    if dtype not in (torch.float32, torch.float64):
        raise CheckpointError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    path = resolve_checkpoint(path_or_name)
    ckpt = _read(path, trust_checkpoint=trust_checkpoint)
    layout = _model_options(ckpt["config"], path)
    cfg = config_from_options(layout.opts, path, layout.energy_reduce,
                              layout.stress["num_mlp_layers"] if layout.stress else None)
    model = EquiformerV2(cfg)
    raw, grids, order = _mapped_state(ckpt["state_dict"], model, layout.head_roles, path)
    weights = "state_dict"
    if use_ema:
        raw, weights = _apply_ema(ckpt, raw, order, model, path)
    state, embedding_biases = _assemble(raw, model, path)
    norms = ckpt.get("normalizers") or {}
    e_mean, e_std = _normalizer(norms, "energy", "target")
    f_mean, f_std = _normalizer(norms, "forces", "grad_target")
    refs = _element_refs(ckpt)
    extra = {"energy_mean": e_mean, "energy_std": e_std, "force_mean": f_mean, "force_std": f_std}
    for k, v in extra.items():
        state[k] = torch.tensor(v)
    if layout.stress is not None:
        name = layout.stress["output_name"]
        if norms.get(name) is not None:
            raise CheckpointError(f"{path}: a {name!r} normalizer on the recombined stress is not supported "
                                  f"(the official files normalise {name}_isotropic / {name}_anisotropic)")
        for part, size in (("isotropic", 1), ("anisotropic", 5)):
            state[f"stress_head.{part}_mean"], state[f"stress_head.{part}_rmsd"] = _normalizer_tensors(
                norms, f"{name}_{part}", size, path)
    state["element_refs"] = torch.zeros(cfg.max_num_elements) if refs is None else refs[: cfg.max_num_elements]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: state_dict does not match the EquiformerV2 architecture in its config; "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model = model.to(dtype=dtype)
    with torch.no_grad():
        for bias in embedding_biases:  # DeNS: x_l0 = emb(Z) + bias(es), in fairchem's order and dtype
            model.sphere_embedding.weight.add_(bias.to(dtype))
    if dtype == torch.float32:
        with torch.no_grad():
            _set_grids(model, grids)
    else:  # float64: exact grids rather than the checkpoint's float32 copies
        model.reset_derived_buffers()
    model = model.to(device=device).eval().requires_grad_(False)
    convention = (
        "total energy (linear element references added)"
        if cfg.use_energy_lin_ref or refs is not None
        else "referenced energy (OC20: adsorption energy vs. clean slab + gas-phase references)"
    )
    properties = ("energy", "forces") + (("stress",) if cfg.regress_stress else ())
    arch = "EquiformerV2 DeNS" if layout.dens else "EquiformerV2"
    meta = CheckpointMeta(
        path=str(path), sha256=file_sha256(path),
        architecture=f"{arch} (L={cfg.lmax}, M={cfg.mmax}, {cfg.num_layers} layers, C={cfg.sphere_channels}"
                     f"{', stress head' if cfg.regress_stress else ''})",
        energy_convention=convention, cutoff=cfg.max_radius, max_neighbors=cfg.max_neighbors,
        strict_max_neighbors=cfg.enforce_max_neighbors_strictly,
        num_parameters=sum(p.numel() for p in model.parameters()), weights=weights, config=cfg.to_dict(),
        properties=properties, model_info=model_info(path_or_name, path),
    )
    return model, meta


def _apply_ema(ckpt: dict, raw: dict, order: list[str], model: EquiformerV2, path: Path):
    """Replace trainable parameters by ``ckpt['ema']['shadow_params']`` (fairchem parameter order,
    which includes the DeNS blocks that are folded or ignored afterwards)."""
    ema = ckpt.get("ema")
    if not ema or "shadow_params" not in ema:
        warnings.warn(f"{path} has no EMA weights; using state_dict", stacklevel=3)
        return raw, "state_dict"
    params = {n for n, _ in model.named_parameters()}
    keys = [k for k in order if _is_parameter(k, params)]
    shadow = list(ema["shadow_params"])
    if len(shadow) != len(keys) or any(s.shape != raw[k].shape for s, k in zip(shadow, keys)):
        raise CheckpointError(f"{path}: EMA shadow parameters do not match the model parameters")
    return {**raw, **dict(zip(keys, shadow))}, "ema"

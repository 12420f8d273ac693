"""Load fairchem EquiformerV2 checkpoints into :class:`eqv2_calc.model.EquiformerV2`.

:func:`load_model` puts the steps together:

1. read the file safely (:mod:`eqv2_calc.checkpoint.safe_unpickle`: weights-only unpickling
   plus a small allow-list; other files only with ``trust_checkpoint=True``);
2. parse its config (:mod:`eqv2_calc.checkpoint.config`): 2023 OCP trainer files
   (``config["model"] = "equiformer_v2"`` + ``model_attributes``, keys prefixed
   ``module.module.``), fairchem 1.x (``config["model"] = {"name": "equiformer_v2", ...}``) and
   hydra files (``backbone.*``, ``output_heads.energy.energy_block.*``,
   ``output_heads.forces.force_block.*``, the stress head ``output_heads.stress.*`` of the
   materials checkpoints (OMat24, MPtrj, sAlex) and the DeNS backbone and heads under every name
   fairchem releases gave them: :data:`BACKBONE_NAMES`, :data:`HEAD_NAMES`);
3. map the state_dict keys (:mod:`eqv2_calc.checkpoint.keymap`), fold the DeNS encodings into
   the atom embedding, and take the checkpoint's float32 S2 grids;
4. set the output de-normalisation (normalizers, OC22 ``energy_lin_ref``, fairchem 1.x
   ``elementrefs``, the two stress parts), applied exactly as OCPCalculator does, inside the
   model.

Weights come from ``state_dict`` like fairchem's OCPCalculator; ``use_ema=True`` takes the
``ema`` shadow weights instead when the file has them. The helpers of steps 1 and 2 are also
importable from here, where they were defined before (``checkpoint_safe_globals``,
``TrustedCheckpointWarning``, ``config_from_options``, ...).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eqv2_calc.checkpoint.config import (  # noqa: F401 - re-exported: the names were defined here
    BACKBONE_NAMES,
    HEAD_NAMES,
    _element_refs,
    _model_options,
    _normalizer,
    _normalizer_tensors,
    config_from_options,
)
from eqv2_calc.checkpoint.keymap import is_derived, is_folded, is_ignored, strip_prefixes
from eqv2_calc.checkpoint.registry import file_sha256, model_info, resolve_checkpoint
from eqv2_calc.checkpoint.safe_unpickle import (  # noqa: F401 - re-exported: the names were defined here
    TrustedCheckpointWarning,
    _read,
    checkpoint_safe_globals,
)
from eqv2_calc.errors import CheckpointError
from eqv2_calc.model import EquiformerV2
from eqv2_calc.so3.layout import reduced_to_mprimary


ENERGY_ONLY = ("energy-only model (direct IS2RE, regress_forces=False: no force head): it predicts, from the "
               "input (initial) structure, the energy of the relaxed structure, and gives no forces")
"""Added to ``CheckpointMeta.energy_convention`` of checkpoints without a force head."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a loaded checkpoint is. Energies in eV, cutoff in Å.

    ``properties``: what the model predicts, ``("energy", "forces")``, plus ``"stress"`` for the
    materials models; just ``("energy",)`` for a direct IS2RE checkpoint (no force head).
    """

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
    if not cfg.regress_forces:
        convention += f"; {ENERGY_ONLY}"
    properties = ("energy",) + (("forces",) if cfg.regress_forces else ())
    properties += ("stress",) if cfg.regress_stress else ()
    arch = "EquiformerV2 DeNS" if layout.dens else "EquiformerV2"
    heads = (", stress head" if cfg.regress_stress else "") + ("" if cfg.regress_forces else ", no force head")
    meta = CheckpointMeta(
        path=str(path), sha256=file_sha256(path),
        architecture=f"{arch} (L={cfg.lmax}, M={cfg.mmax}, {cfg.num_layers} layers, C={cfg.sphere_channels}"
                     f"{heads})",
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

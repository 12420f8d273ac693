"""Write an :class:`~eqv2_calc.model.EquiformerV2` as a fairchem checkpoint (2023 OCP layout).

The file has the layout of the official OC20 2023_06 / OC22 2023_10 checkpoints, so
fairchem-core 1.10's ``OCPCalculator(checkpoint_path=...)`` strict-loads it and
:func:`eqv2_calc.checkpoint.load_model` reads it back bit-for-bit:

* ``config = {"trainer": "equiformerv2_forces", "model": "equiformer_v2",
  "model_attributes": {...every constructor hyper-parameter...}, "dataset": {normalize_labels,
  target_mean/std, grad_target_mean/std[, lin_ref]}, "task": {...}, "optim": {...}, ...}``;
* ``normalizers = {"target": {mean, std}, "grad_target": {mean, std}}`` (0-d float32 tensors);
* ``state_dict``: every key of fairchem's ``EquiformerV2``, derived buffers included
  (:mod:`eqv2_calc.checkpoint.state_dict`).

Tensors are written in float32 (fairchem's dtype) with :func:`torch.save` on a file handle
(archive name "archive", so the bytes do not depend on the file name) and load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from eqv2_calc.checkpoint.state_dict import NORMALIZER_BUFFERS, fairchem_keys, fairchem_state_dict
from eqv2_calc.io import atomic_write
from eqv2_calc.model import EquiformerV2, EquiformerV2Config


# --------------------------------------------------------------------------- config
def model_attributes(cfg: EquiformerV2Config) -> dict[str, Any]:
    """fairchem ``EquiformerV2(**model_attributes)`` for this architecture (official settings
    for everything this package fixes: layer_norm_sh, grid MLP, separable S2 activation, ...)."""
    return {
        "use_pbc": cfg.use_pbc,
        "regress_forces": cfg.regress_forces,
        "otf_graph": True,
        "max_neighbors": cfg.max_neighbors,
        "max_radius": cfg.max_radius,
        "max_num_elements": cfg.max_num_elements,
        "num_layers": cfg.num_layers,
        "sphere_channels": cfg.sphere_channels,
        "attn_hidden_channels": cfg.attn_hidden_channels,
        "num_heads": cfg.num_heads,
        "attn_alpha_channels": cfg.attn_alpha_channels,
        "attn_value_channels": cfg.attn_value_channels,
        "ffn_hidden_channels": cfg.ffn_hidden_channels,
        "norm_type": "layer_norm_sh",
        "lmax_list": [cfg.lmax],
        "mmax_list": [cfg.mmax],
        "grid_resolution": cfg.grid_resolution,
        "num_sphere_samples": 128,
        "edge_channels": cfg.edge_channels,
        "use_atom_edge_embedding": cfg.use_atom_edge_embedding,
        "share_atom_edge_embedding": cfg.share_atom_edge_embedding,
        "use_m_share_rad": False,
        "distance_function": "gaussian",
        "num_distance_basis": 512,
        "attn_activation": "silu",
        "use_s2_act_attn": False,
        "use_attn_renorm": cfg.use_attn_renorm,
        "ffn_activation": "silu",
        "use_gate_act": False,
        "use_grid_mlp": True,
        "use_sep_s2_act": True,
        "alpha_drop": 0.1,
        "drop_path_rate": 0.1,
        "proj_drop": 0.0,
        "weight_init": "uniform",
        "enforce_max_neighbors_strictly": cfg.enforce_max_neighbors_strictly,
        "avg_num_nodes": cfg.avg_num_nodes,
        "avg_degree": cfg.avg_degree,
        "use_energy_lin_ref": cfg.use_energy_lin_ref,
        "load_energy_lin_ref": cfg.use_energy_lin_ref,
    }


def _normalizer_values(model: EquiformerV2, normalizers: dict | None) -> dict[str, float]:
    """{energy_mean, energy_std, force_mean, force_std} from ``normalizers`` or the model buffers.

    ``normalizers`` may be 2023-style ({"target": {mean, std}, "grad_target": {...}}), fairchem
    1.x-style ({"energy": {mean, std|rmsd}, "forces": {...}}) or flat {energy_mean, ...}.
    """
    vals = {k: float(getattr(model, k)) for k in NORMALIZER_BUFFERS}
    if not normalizers:
        return vals
    for names, (mean_key, std_key) in (
        (("target", "energy"), ("energy_mean", "energy_std")),
        (("grad_target", "forces"), ("force_mean", "force_std")),
    ):
        for name in names:
            entry = normalizers.get(name)
            if entry is not None:
                vals[mean_key] = float(torch.as_tensor(entry.get("mean", 0.0)))
                vals[std_key] = float(torch.as_tensor(entry.get("std", entry.get("rmsd", 1.0))))
                break
    for key in NORMALIZER_BUFFERS:
        if key in normalizers:
            vals[key] = float(torch.as_tensor(normalizers[key]))
    return vals


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict update (``extra`` wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def checkpoint_config(cfg: EquiformerV2Config, norms: dict[str, float], extra_config: dict | None = None) -> dict:
    """The 2023 OCP trainer config (``config["model"] = "equiformer_v2"`` + ``model_attributes``)."""
    dataset = {
        "src": "data/s2ef/train",
        "normalize_labels": True,
        "target_mean": norms["energy_mean"],
        "target_std": norms["energy_std"],
        "grad_target_mean": norms["force_mean"],
        "grad_target_std": norms["force_std"],
    }
    if cfg.use_energy_lin_ref:
        dataset["lin_ref"] = "data/oc22/linref.npz"
    config = {
        "trainer": "equiformerv2_forces",
        "model": "equiformer_v2",
        "model_attributes": model_attributes(cfg),
        "dataset": dataset,
        "task": {
            "dataset": "oc22_lmdb" if cfg.use_energy_lin_ref else "trajectory_lmdb_v2",
            "description": "Regressing to energies and forces for DFT trajectories",
            "type": "regression",
            "metric": "mae",
            "primary_metric": "forces_mae",
            "labels": ["potential energy"],
            "grad_input": "atomic forces",
            "train_on_free_atoms": True,
            "eval_on_free_atoms": True,
        },
        "optim": {
            "batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "lr_initial": 4e-4,
            "optimizer": "AdamW", "optimizer_params": {"weight_decay": 0.001},
            "scheduler": "LambdaLR", "max_epochs": 1, "force_coefficient": 100,
            "energy_coefficient": 4 if not cfg.use_energy_lin_ref else 1,
            "clip_grad_norm": 100, "ema_decay": 0.999, "loss_energy": "mae", "loss_force": "l2mae",
        },
        "logger": "tensorboard",
        "cmd": {"seed": 0},
    }
    return _merge(config, extra_config or {})


# --------------------------------------------------------------------------- writing
def _fairchem_parameter_keys(cfg: EquiformerV2Config, model: EquiformerV2) -> list[str]:
    """Trainable parameters in fairchem ``model.parameters()`` order (EMA shadow order)."""
    params = dict(model.named_parameters())
    return [k for k in fairchem_keys(cfg) if k in params]


def checkpoint_dict(
    model: EquiformerV2,
    *,
    normalizers: dict | None = None,
    extra_config: dict | None = None,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The checkpoint as a dict (see :func:`save_fairchem_checkpoint`)."""
    cfg = model.cfg
    if cfg.regress_stress or cfg.energy_reduce != "sum":
        raise ValueError(
            "the fairchem 2023 layout holds energy (sum) and force heads only; this model has "
            f"{'a stress head' if cfg.regress_stress else 'energy_reduce=' + repr(cfg.energy_reduce)}, "
            "which would be lost (hydra files are not written by eqv2-calc)"
        )
    norms = _normalizer_values(model, normalizers)
    ckpt: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "state_dict": fairchem_state_dict(model),
        "normalizers": {
            "target": {"mean": torch.tensor(norms["energy_mean"]), "std": torch.tensor(norms["energy_std"])},
            "grad_target": {"mean": torch.tensor(norms["force_mean"]), "std": torch.tensor(norms["force_std"])},
        },
        "config": checkpoint_config(cfg, norms, extra_config),
        "val_metrics": {},
        "amp": None,
    }
    refs = model.element_refs.detach().cpu().float()
    if bool((refs != 0).any()):
        # fairchem 1.x LinearReferences state_dict (not part of the 2023 layout)
        ckpt["elementrefs"] = {"energy": {"element_references": refs.clone()}}
    if ema_state_dict is not None:
        keys = _fairchem_parameter_keys(cfg, model)
        missing = [k for k in keys if k not in ema_state_dict]
        if missing:
            raise ValueError(f"ema_state_dict lacks parameters {missing[:8]}")
        ckpt["ema"] = {
            "decay": 0.999,
            "num_updates": 0,
            "shadow_params": [ema_state_dict[k].detach().cpu().float().clone() for k in keys],
            "collected_params": [],
        }
    return ckpt


def save_fairchem_checkpoint(
    model: EquiformerV2,
    path: str | os.PathLike,
    *,
    normalizers: dict | None = None,
    extra_config: dict | None = None,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as a fairchem 2023-layout EquiformerV2 checkpoint at ``path``.

    ``normalizers``: output (de)normalisation to record; default: the model's
    ``energy_mean/energy_std/force_mean/force_std`` buffers. A 2023 ({"target",
    "grad_target"}), 1.x ({"energy", "forces"}) or flat ({"energy_mean", ...}) dict.
    ``extra_config``: merged (recursively) into ``checkpoint["config"]``.
    ``ema_state_dict``: parameter name → tensor; stored as ``checkpoint["ema"]["shadow_params"]``
    in fairchem parameter order (fairchem's OCPCalculator ignores it; ``load_model(use_ema=True)``
    uses it). A non-zero ``model.element_refs`` is stored as fairchem 1.x ``elementrefs``.

    The file is written with :func:`eqv2_calc.io.atomic_write` (temporary file + rename; the
    bytes do not depend on the file name). Returns the path.
    """
    path = Path(path)
    ckpt = checkpoint_dict(model, normalizers=normalizers, extra_config=extra_config, ema_state_dict=ema_state_dict)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # through a file object: the bytes do not depend on the name
            torch.save(ckpt, fh)

    return atomic_write(path, _write)


__all__ = ["save_fairchem_checkpoint", "checkpoint_dict", "model_attributes", "checkpoint_config"]

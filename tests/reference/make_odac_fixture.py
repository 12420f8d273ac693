"""Reference fixture for the ODAC *direct IS2RE* EquiformerV2 layout (``EquiformerV2-IS2RE-ODAC``).

Runs inside the fairchem reference venv (../shared/reference/setup_refvenv.sh), never in the
project venv's tests:

    /tmp/eqv2-refvenv/bin/python tests/reference/make_odac_fixture.py
        → tests/data/odac_is2re_tiny.pt + tests/data/odac_is2re_tiny.reference.json

The published file (``dac/checkpoints_20231018/Equiformer_V2_Direct.pt``) is an energy-only
model: ``regress_forces: False`` (no ``force_block``), trainer ``equiformerv2_energy``, target
``y_relaxed`` (the relaxed energy, predicted from the initial structure), and its config names the
two normalisation constants ``norm_scale_nodes`` / ``norm_scale_degree`` (configs/odac/is2re/
eqv2_31M.yml: 192.561 / 21.024127419363214, the values the ODAC S2EF configs give as
``avg_num_nodes`` / ``avg_degree``).

The tiny model here has that layout: fairchem-core 1.10's own ``EquiformerV2`` class
(``equiformer_v2_deprecated.py``) with the ODAC IS2RE hyper-parameters (L=4, M=2, cutoff 8 Å,
20 neighbours, 100 elements, regress_forces False) at tiny widths, its weights perturbed at
random (seeded; every parameter gets Gaussian noise of a fraction ``PERTURB`` of its own
spread, and the energy block's last map is scaled by ``ENERGY_GAIN`` so that energies vary by
O(1) eV between structures), saved in the 2023 OCP trainer layout (``config["model"] =
"equiformer_v2"`` + ``model_attributes`` with ``norm_scale_nodes`` / ``norm_scale_degree``,
keys prefixed ``module.module.``, ``normalizers = {"target": {mean, std}}``, IS2RE ``task``).

fairchem 1.10 cannot build the model from that config: its ``EquiformerV2.__init__`` has no
``norm_scale_*`` parameters and raises TypeError (fairchem issue #892). For the reference
numbers the script therefore writes a temporary copy whose config names the two constants
``avg_num_nodes`` / ``avg_degree`` (the only change) and evaluates it with fairchem's
``OCPCalculator(checkpoint_path=..., cpu=True)`` (strict state_dict load, fairchem's
de-normalisation of the ``target`` normalizer). It also checks that fairchem really refuses the
original file, and records the energies of a control model built with fairchem's defaults (no
constant given) to show the constants matter. Structures: tests/data/structures.extxyz.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from make_hydra_fixtures import _sha256  # the same file hash as the hydra fixtures

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
NAME = "odac_is2re_tiny"

ODAC_IS2RE = dict(  # configs/odac/is2re/eqv2_31M.yml (fairchem repository), widths made tiny
    use_pbc=True, regress_forces=False, otf_graph=True, max_neighbors=20, max_radius=8.0, max_num_elements=100,
    num_layers=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
    attn_value_channels=4, ffn_hidden_channels=8, norm_type="layer_norm_sh", lmax_list=[4], mmax_list=[2],
    grid_resolution=18, num_sphere_samples=128, edge_channels=8, use_atom_edge_embedding=True,
    distance_function="gaussian", num_distance_basis=512, attn_activation="silu", use_s2_act_attn=False,
    ffn_activation="silu", use_gate_act=False, use_grid_mlp=True, alpha_drop=0.1, drop_path_rate=0.1,
    proj_drop=0.0, weight_init="uniform",
)
NORM_SCALE = {"norm_scale_nodes": 192.561, "norm_scale_degree": 21.024127419363214}
RENAMED = {"norm_scale_nodes": "avg_num_nodes", "norm_scale_degree": "avg_degree"}
TARGET = {"mean": -0.5249277949333191, "std": 0.943034291267395}  # configs/odac/is2re/base.yml
PERTURB = 0.25
ENERGY_GAIN = 12.0


def build_model(seed: int):
    from fairchem.core.models.equiformer_v2 import EquiformerV2

    attrs = {**ODAC_IS2RE, **{RENAMED[k]: v for k, v in NORM_SCALE.items()}}
    torch.manual_seed(seed)
    model = EquiformerV2(**attrs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = p.std().item() if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=gen) * PERTURB * (s if s > 0 else 0.1))
        model.energy_block.so3_linear_2.weight.mul_(ENERGY_GAIN)
    assert not any(k.startswith("force_block") for k in model.state_dict()), "regress_forces=False has no force_block"
    return model


def checkpoint_dict(model, seed: int) -> dict:
    """The 2023 OCP trainer layout of an IS2RE (energy-only) EquiformerV2 with ``norm_scale_*``."""
    attrs = {**ODAC_IS2RE, **NORM_SCALE}
    config = {
        "trainer": "equiformerv2_energy",
        "model": "equiformer_v2",
        "model_attributes": attrs,
        "dataset": {"src": "data_odac/is2r/train", "normalize_labels": True,
                    "target_mean": TARGET["mean"], "target_std": TARGET["std"]},
        "val_dataset": {"src": "data_odac/is2r/val"},
        "task": {"dataset": "single_point_lmdb", "description": "Relaxed state energy prediction from initial "
                 "structure.", "type": "regression", "metric": "mae", "labels": ["relaxed energy"]},
        "optim": {"batch_size": 6, "eval_batch_size": 4, "num_workers": 0, "lr_initial": 0.0004,
                  "optimizer": "AdamW", "optimizer_params": {"weight_decay": 0.2}, "scheduler": "LambdaLR",
                  "scheduler_params": {"lambda_type": "cosine", "warmup_factor": 0.2, "warmup_epochs": 0.01,
                                       "lr_min_factor": 0.01},
                  "max_epochs": 30, "energy_coefficient": 4, "clip_grad_norm": 100, "ema_decay": 0.999,
                  "loss_energy": "mae"},
        "logger": "wandb",
        "cmd": {"seed": 0},
        "eqv2_fixture": {"generator": "tests/reference/make_odac_fixture.py", "seed": seed},
    }
    sd = {"module.module." + k: v for k, v in model.state_dict().items()}  # shared buffers stay shared
    normalizers = {"target": {k: torch.tensor(v) for k, v in TARGET.items()}}
    return {"epoch": 30, "step": 1000, "state_dict": sd, "normalizers": normalizers, "config": config,
            "val_metrics": {}, "amp": None}


def fairchem_readable(ckpt: dict, without_constants: bool = False) -> dict:
    """A copy fairchem 1.10 can build: ``norm_scale_*`` renamed to ``avg_*`` (or dropped)."""
    out = copy.deepcopy(ckpt)
    attrs = out["config"]["model_attributes"]
    for old, new in RENAMED.items():
        value = attrs.pop(old)
        if not without_constants:
            attrs[new] = value
    return out


def fairchem_refuses(path: Path) -> str:
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    try:
        OCPCalculator(checkpoint_path=str(path), cpu=True, seed=0)
    except TypeError as exc:
        assert "norm_scale" in str(exc), exc
        return f"TypeError: {exc}"
    raise SystemExit("fairchem 1.10 unexpectedly built the norm_scale_* config")


def evaluate(path: Path, structures: dict) -> dict:
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    calc = OCPCalculator(checkpoint_path=str(path), cpu=True, seed=0)  # strict load
    calc.trainer.model.eval()
    assert list(calc.implemented_properties) == ["energy"], calc.implemented_properties
    results = {}
    for name, atoms in structures.items():
        energies = []
        for _ in range(2):  # fairchem draws a new random roll of the edge frames per call
            calc.reset()
            a = atoms.copy()
            a.calc = calc
            t0 = time.perf_counter()
            energies.append(float(a.get_potential_energy()))
            dt = time.perf_counter() - t0
        assert "forces" not in calc.results, sorted(calc.results)
        results[name] = {"natoms": len(atoms), "energy": energies[0], "repeat_diff": abs(energies[1] - energies[0]),
                         "seconds": round(dt, 3)}
        print(f"  {name}: {len(atoms)} atoms, E = {energies[0]:.6f} eV, {dt:.2f} s", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DATA), help="output folder (default tests/data)")
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    import ase
    import fairchem.core
    from ase.io import read

    names = json.loads((DATA / "structure_names.json").read_text())
    structures = dict(zip(names, read(DATA / "structures.extxyz", ":")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.seed)
    ckpt = checkpoint_dict(model, args.seed)
    path = out / f"{NAME}.pt"
    torch.save(ckpt, path)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, {sum(p.numel() for p in model.parameters())} parameters")
    refusal = fairchem_refuses(path)
    with tempfile.TemporaryDirectory() as tmp:
        renamed = Path(tmp) / "renamed.pt"
        torch.save(fairchem_readable(ckpt), renamed)
        results = evaluate(renamed, structures)
        default = Path(tmp) / "default.pt"
        torch.save(fairchem_readable(ckpt, without_constants=True), default)
        control = evaluate(default, structures)
    record = {
        "fairchem_version": fairchem.core.__version__, "torch_version": torch.__version__,
        "ase_version": ase.__version__, "seed": args.seed, "generator": "tests/reference/make_odac_fixture.py",
        "checkpoint": path.name, "checkpoint_sha256": _sha256(path), "structures_file": "structures.extxyz",
        "norm_scale": NORM_SCALE, "target_normalizer": TARGET,
        "fairchem_on_original_config": refusal,
        "evaluated_as": "a copy with norm_scale_nodes/norm_scale_degree renamed avg_num_nodes/avg_degree, "
                        "through fairchem's OCPCalculator (strict load)",
        "structures": results,
        "fairchem_defaults_control": {
            "note": "the same weights with neither constant in the config (fairchem's defaults 77.81317 / "
                    "23.395238876342773): not the model's energies",
            "energies": {k: v["energy"] for k, v in control.items()},
        },
    }
    (out / f"{NAME}.reference.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / (NAME + '.reference.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

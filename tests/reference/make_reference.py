"""Reference energies/forces from fairchem-core 1.10 for seeded random EquiformerV2 checkpoints.

Runs inside the fairchem reference venv (../shared/reference/setup_refvenv.sh), never in the
project venv's tests:

    /tmp/eqv2-refvenv/bin/python tests/reference/make_reference.py --size 31M --seed 0
        → writes tests/data/reference_31M_seed0.json
    /tmp/eqv2-refvenv/bin/python tests/reference/make_reference.py --checkpoint X.pt --out X.json
        → evaluates an existing checkpoint (used by tests/test_checkpoint_save.py, marker "reference")

The checkpoint is generated with the project's own ``eqv2_calc.checkpoint.random_init``
(imported from this source tree; only torch/numpy/e3nn are needed, not vesin), written in the
fairchem 2023 layout by ``eqv2_calc.checkpoint.save`` and then loaded by fairchem's
``OCPCalculator(checkpoint_path=..., cpu=True)`` — a strict load, so a missing or unexpected
state_dict key fails here. The script also builds a fresh fairchem ``EquiformerV2`` from the
file's ``model_attributes`` and compares every buffer fairchem derives itself (coefficient maps,
S2 grids, expand_index, balance weights, Gaussian offsets) with the values in the file.
Forces are the unconstrained ones (``calc.results["forces"]``). Checkpoints are never committed:
they are regenerated from the seed (the JSON holds their sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def import_project():
    """Make ``eqv2_calc`` importable from the source tree without running its package
    ``__init__`` (which imports the ASE calculator and, through the graph code, vesin)."""
    if "eqv2_calc" not in sys.modules:
        pkg = types.ModuleType("eqv2_calc")
        pkg.__path__ = [str(ROOT / "eqv2_calc")]
        pkg.__file__ = str(ROOT / "eqv2_calc" / "__init__.py")
        sys.modules["eqv2_calc"] = pkg
    from eqv2_calc.checkpoint import random_init

    return random_init


def _strip(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _buffer_kind(key: str) -> str:
    kind = re.sub(r"^.*?(SO3_grid|SO3_rotation|mappingReduced)", r"\1", key)
    kind = re.sub(r"^(blocks\.\d+\.|edge_degree_embedding\.|force_block\.|energy_block\.|norm\.)+", "", kind)
    kind = re.sub(r"(ga|ffn|norm_[12])\.", "", kind)
    return re.sub(r"SO3_grid\.\d+\.\d+\.", "SO3_grid.l.m.", kind)


def check_derived_buffers(path: str) -> dict:
    """Max |file − fairchem's own value| per derived-buffer kind (fresh fairchem model)."""
    import torch
    from fairchem.core.models.equiformer_v2 import EquiformerV2 as FairchemEquiformerV2

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    attrs = dict(ckpt["config"]["model_attributes"])
    with torch.random.fork_rng(devices=[]):
        fresh = FairchemEquiformerV2(**attrs)
    params = {k for k, _ in fresh.named_parameters()}
    file_sd = {_strip(k): v for k, v in ckpt["state_dict"].items()}
    fresh_sd = fresh.state_dict()
    out: dict[str, float] = {}
    for key, value in fresh_sd.items():
        if key in params:
            continue
        mine = file_sd[key]
        if mine.shape != value.shape or mine.dtype != value.dtype:
            raise SystemExit(f"buffer {key}: file {tuple(mine.shape)} {mine.dtype} vs fairchem "
                             f"{tuple(value.shape)} {value.dtype}")
        diff = float((mine.double() - value.double()).abs().max()) if value.numel() else 0.0
        kind = _buffer_kind(key)
        out[kind] = max(out.get(kind, 0.0), diff)
    return {
        "keys_equal_in_order": list(file_sd) == list(fresh_sd),
        "num_keys": len(fresh_sd),
        "max_abs_diff": dict(sorted(out.items())),
    }


def evaluate(path: str, names: list[str], seed: int = 0) -> dict:
    """fairchem OCPCalculator energies (eV) and unconstrained forces (eV/Å)."""
    import numpy as np
    import torch
    from ase.io import read
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    all_names = json.loads((DATA / "structure_names.json").read_text())
    structures = dict(zip(all_names, read(DATA / "structures.extxyz", ":")))
    calc = OCPCalculator(checkpoint_path=str(path), cpu=True, seed=seed)  # strict load
    model = calc.trainer.model
    while hasattr(model, "module"):
        model = model.module
    model.eval()
    file_keys = [_strip(k) for k in torch.load(path, map_location="cpu", weights_only=True)["state_dict"]]
    model_keys = list(model.state_dict())
    results = {}
    for name in names:
        atoms = structures[name].copy()
        atoms.calc = calc
        t0 = time.perf_counter()
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(calc.results["forces"], dtype=float).copy()  # unconstrained
        dt = time.perf_counter() - t0
        results[name] = {"natoms": len(atoms), "energy": energy, "forces": forces.tolist(), "seconds": round(dt, 3)}
        print(f"{name}: {len(atoms)} atoms, E = {energy:.6f} eV, max|F| = {np.abs(forces).max():.4f} eV/Å, "
              f"{dt:.2f} s", flush=True)
    return {
        "strict_load": True,  # OCPCalculator raises on any missing/unexpected key
        "state_dict_keys_match": sorted(file_keys) == sorted(model_keys),
        "num_state_dict_keys": len(file_keys),
        "structures": results,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="31M", help="31M or 153M (ignored with --checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--structures", default="", help="comma-separated names (default: all)")
    ap.add_argument("--checkpoint", help="evaluate this existing checkpoint instead of generating one")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"), help="where the checkpoint is written")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--no-buffer-check", action="store_true", help="skip the derived-buffer comparison")
    ap.add_argument("--out", help="output JSON (default tests/data/reference_{size}_seed{seed}.json)")
    args = ap.parse_args(argv)

    import e3nn
    import fairchem.core
    import torch

    random_init = import_project()
    names = args.structures.split(",") if args.structures else json.loads((DATA / "structure_names.json").read_text())
    record: dict = {
        "fairchem_version": fairchem.core.__version__,
        "torch_version": torch.__version__,
        "e3nn_version": e3nn.__version__,
    }
    generated = None
    if args.checkpoint:
        path = args.checkpoint
        out = args.out or (str(Path(path).with_suffix("")) + ".reference.json")
    else:
        t0 = time.perf_counter()
        path = generated = os.path.join(args.workdir, f"eqv2_random_{args.size}_seed{args.seed}.pt")
        random_init.make_random_checkpoint(args.size, args.seed, path)
        size_mb = os.path.getsize(path) / 1e6
        print(f"generated {path} ({size_mb:.1f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
        out = args.out or str(DATA / f"reference_{args.size}_seed{args.seed}.json")
        record.update({
            "size": args.size,
            "seed": args.seed,
            "generator": "eqv2_calc.checkpoint.random_init.make_random_checkpoint",
        })
    try:
        record["checkpoint_sha256"] = random_init.file_sha256(path)
        record["state_dict_sha256"] = random_init.state_dict_sha256(path)
        record["checkpoint_bytes"] = os.path.getsize(path)
        if not args.no_buffer_check:
            record["derived_buffers_vs_fairchem"] = check_derived_buffers(path)
            print("derived buffers vs fairchem:", json.dumps(record["derived_buffers_vs_fairchem"]), flush=True)
        record.update(evaluate(path, names))
    finally:
        if generated and not args.keep and os.path.exists(generated):
            os.unlink(generated)
    text = json.dumps(record, indent=1)
    # one line per force row: [fx, fy, fz]
    text = re.sub(r"\[\s+([-+0-9.eE]+),\s+([-+0-9.eE]+),\s+([-+0-9.eE]+)\s+\]", r"[\1, \2, \3]", text)
    Path(out).write_text(text + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate an EMT-trained EquiformerV2 (default: the shipped checkpoints/eqv2-emt-small.pt)
against EMT on the held-out systems of the EMT data set.

Measures, through the public inference path (EquiformerV2Calculator / predict_batch /
relax_batch), independent of the training code:

1. held-out frame errors (test.extxyz: systems never seen in training): energy MAE (eV/atom
   and eV), force MAE over free-atom Cartesian components (eV/Å, OC20 ``forces_mae``) and
   force L2-MAE (mean |ΔF| over free atoms, eV/Å); same on val.extxyz;
2. relaxation agreement: every held-out system is relaxed from its unrelaxed start
   (starts.extxyz) with the model and with EMT (the same batched L-BFGS, fmax 0.05 eV/Å,
   300 steps); EMT is evaluated at the ML-relaxed geometry; reported: the fraction of systems
   with |E_EMT(ML-relaxed) − E_EMT(EMT-relaxed)| ≤ 0.1 eV, median/max of that difference,
   and the model's own relaxed-energy error |E_ML(ML-relaxed) − E_EMT(EMT-relaxed)|;
3. forward time (energy + forces, one call) on a 40-atom slab (Pt(111) 3×3×4 + CH3):
   median of ``--repeat`` calls after a warm-up, with the torch thread count used.

usage::

    python -m eqv2_calc.train.emt_data runs/emt-data        # if not generated yet
    python benchmarks/emt_model_eval.py [--checkpoint PATH] [--data runs/emt-data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.io import read

from eqv2_calc import EquiformerV2Calculator
from eqv2_calc.relax import relax_batch
from eqv2_calc.relax.constraints import fixed_atoms
from eqv2_calc.train.emt_data import adsorbate_atoms

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"force_mae": 0.05, "energy_mae_per_atom": 0.02, "relax_within_0.1eV": 0.8}


def frame_errors(calc: EquiformerV2Calculator, path: Path) -> dict[str, float]:
    """Energy and force errors of the model on the labelled frames in ``path``."""
    frames = read(path, index=":")
    preds = calc.predict_batch(frames, max_atoms=400)
    e_atom, e_abs, f_comp, f_l2, nfree = [], [], 0.0, 0.0, 0
    for a, p in zip(frames, preds):
        de = abs(p["energy"] - a.get_potential_energy())
        e_abs.append(de)
        e_atom.append(de / len(a))
        free = ~fixed_atoms(a)
        df = p["forces"][free] - a.calc.results["forces"][free]
        f_comp += float(np.abs(df).sum())
        f_l2 += float(np.linalg.norm(df, axis=1).sum())
        nfree += int(free.sum())
    return {
        "frames": len(frames), "energy_mae_per_atom": float(np.mean(e_atom)), "energy_mae": float(np.mean(e_abs)),
        "force_mae": f_comp / (3 * nfree), "force_l2_mae": f_l2 / nfree,
    }


def relax_agreement(calc: EquiformerV2Calculator, starts_path: Path, fmax: float, steps: int,
                    max_systems: int = 0) -> dict:
    """ML relaxation + EMT single point vs EMT relaxation, from the same held-out starts."""
    starts = [a for a in read(starts_path, index=":") if a.info.get("split") == "test"]
    if max_systems:
        starts = starts[:max_systems]
    names = [a.info["system"] for a in starts]
    t = time.perf_counter()
    ml = relax_batch(starts, calc, fmax=fmax, steps=steps, progress=True)
    t_ml = time.perf_counter() - t
    t = time.perf_counter()
    ref = relax_batch(starts, EMT(), fmax=fmax, steps=steps, progress=True)
    t_emt = time.perf_counter() - t
    rows = []
    failed = []
    for name, r_ml, r_emt in zip(names, ml, ref):
        if r_ml.failed:  # e.g. atoms collapsed onto each other (invalid_geometry)
            failed.append({"system": name, "reason": r_ml.reason})
            continue
        at = r_ml.atoms.copy()
        at.calc = EMT()
        e_emt_at_ml = float(at.get_potential_energy())
        rows.append({
            "system": name, "emt_relaxed": r_emt.energy, "emt_at_ml_relaxed": e_emt_at_ml,
            "ml_relaxed": r_ml.energy, "delta": e_emt_at_ml - r_emt.energy,
            "ml_error": r_ml.energy - r_emt.energy, "ml_steps": r_ml.nsteps, "emt_steps": r_emt.nsteps,
            "ml_converged": r_ml.converged, "emt_converged": r_emt.converged,
        })
    # failed ML relaxations count as misses
    delta = np.abs([r["delta"] for r in rows] + [np.inf] * len(failed))
    ml_err = np.abs([r["ml_error"] for r in rows])
    return {
        "systems": len(starts), "fmax": fmax, "steps": steps, "ml_failed": failed,
        "within_0.1eV": float(np.mean(delta <= 0.1)), "within_0.05eV": float(np.mean(delta <= 0.05)),
        "delta_median": float(np.median(delta)), "delta_max": float(delta.max()),
        "ml_energy_mae": float(ml_err.mean()) if len(ml_err) else float("nan"), "ml_energy_within_0.1eV": float(np.mean(ml_err <= 0.1)),
        "ml_converged": int(sum(r["ml_converged"] for r in rows)),
        "seconds_ml": round(t_ml, 1), "seconds_emt": round(t_emt, 1),
        "worst": sorted(rows, key=lambda r: -abs(r["delta"]))[:5],
    }


def forward_time(calc: EquiformerV2Calculator, repeat: int) -> dict:
    """Median seconds of one energy+forces call on a 40-atom slab."""
    slab = fcc111("Pt", size=(3, 3, 4), vacuum=8.0)
    add_adsorbate(slab, adsorbate_atoms("CH3"), 2.0, "fcc")
    assert len(slab) == 40
    from eqv2_calc.graph import atoms_to_batch

    pot = calc.potential
    batch = atoms_to_batch([slab])
    pot(batch)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        pot(batch)  # graph + model, as in a relaxation step
        times.append(time.perf_counter() - t)
    return {"natoms": len(slab), "edges": int(pot.count_edges(batch).sum()), "median_s": statistics.median(times),
            "min_s": min(times), "threads": torch.get_num_threads(), "repeat": repeat}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "eqv2-emt-small.pt"))
    p.add_argument("--data", default=str(ROOT / "runs" / "emt-data"))
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--skip-relax", action="store_true")
    p.add_argument("--max-systems", type=int, default=0, help="relax only the first N held-out systems (0 = all)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "test.extxyz").is_file():
        raise SystemExit(f"no EMT data in {data}; run: python -m eqv2_calc.train.emt_data {data}")
    calc = EquiformerV2Calculator(checkpoint_path=args.checkpoint, device="cpu")
    out = {"checkpoint": args.checkpoint, "sha256": calc.metadata["sha256"],
           "architecture": calc.metadata["architecture"], "parameters": calc.metadata["num_parameters"]}
    out["forward_40_atoms"] = forward_time(calc, args.repeat)
    out["test"] = frame_errors(calc, data / "test.extxyz")
    out["val"] = frame_errors(calc, data / "val.extxyz")
    if not args.skip_relax:
        out["relax"] = relax_agreement(calc, data / "starts.extxyz", args.fmax, args.steps, args.max_systems)
    t, r = out["test"], out.get("relax")
    print(json.dumps(out, indent=1, default=float))
    print("\nheld-out (test) frames: {frames}, energy MAE {energy_mae_per_atom:.4f} eV/atom ({energy_mae:.3f} eV), "
          "force MAE {force_mae:.4f} eV/Å, force L2-MAE {force_l2_mae:.4f} eV/Å".format(**t))
    print(f"targets: force MAE <= {TARGETS['force_mae']} -> {'met' if t['force_mae'] <= TARGETS['force_mae'] else 'MISSED'}; "
          f"energy MAE <= {TARGETS['energy_mae_per_atom']} eV/atom -> "
          f"{'met' if t['energy_mae_per_atom'] <= TARGETS['energy_mae_per_atom'] else 'MISSED'}")
    if r:
        print(f"relaxation: {r['within_0.1eV']:.0%} of {r['systems']} held-out systems within 0.1 eV of EMT's own "
              f"relaxation (target >= 80% -> {'met' if r['within_0.1eV'] >= TARGETS['relax_within_0.1eV'] else 'MISSED'}); "
              f"median |dE| {r['delta_median']:.3f} eV, max {r['delta_max']:.3f} eV; model's relaxed-energy MAE "
              f"{r['ml_energy_mae']:.3f} eV")
    f = out["forward_40_atoms"]
    print(f"forward (energy+forces, 40 atoms, {f['edges']} edges, {f['threads']} thread(s)): median "
          f"{f['median_s'] * 1000:.1f} ms, min {f['min_s'] * 1000:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

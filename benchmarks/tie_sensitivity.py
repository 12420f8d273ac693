"""How much a model's energy jumps under a 1e-6 Å displacement of AdsorbML's starting structures.

AdsorbML starts from ideal slabs, whose neighbour shells are exactly degenerate. A graph that
keeps only the ``max_neighbors`` nearest neighbours strictly breaks those ties by atom order,
so the model is discontinuous exactly there. For each checkpoint and each held-out initial
placement of the distillation data (``test_initial.extxyz``, kind "initial"), this script
evaluates the energy at the stored positions and at ``--repeats`` copies displaced by
N(0, (1e-6 Å)²), and prints the spread (max − min, eV) and the graph's edge count.

    python benchmarks/tie_sensitivity.py [--checkpoint A.pt B.pt] [--data runs/distill-data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from ase.io import read

from eqv2_calc.calculator import EquiformerV2Calculator

ROOT = Path(__file__).resolve().parents[1]


def spreads(calc: EquiformerV2Calculator, frames, repeats: int, sigma: float) -> np.ndarray:
    """Per frame, max − min energy (eV) over the frame and ``repeats`` displaced copies."""
    out = []
    for k, f in enumerate(frames):
        rng = np.random.default_rng(k)
        energies = []
        for r in range(repeats + 1):
            a = f.copy()
            if r:
                a.positions += rng.normal(scale=sigma, size=a.positions.shape)
            a.calc = calc
            energies.append(a.get_potential_energy())
        out.append(np.ptp(energies))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=[str(ROOT / "checkpoints" / "eqv2-7net-small.pt"),
                                                        str(ROOT / "checkpoints" / "eqv2-emt-small.pt")])
    p.add_argument("--data", default=str(ROOT / "runs" / "distill-data"))
    p.add_argument("--frames", type=int, default=40, help="the first N held-out initial placements")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sigma", type=float, default=1e-6, help="displacement, Å")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.data) / "test_initial.extxyz"
    if not path.is_file():
        raise SystemExit(f"no held-out placements at {path}; run: python -m eqv2_calc.train.distill_data {args.data}")
    frames = [f for f in read(path, index=":") if f.info.get("kind") == "initial"][: args.frames]
    rows = {}
    for ckpt in args.checkpoint:
        calc = EquiformerV2Calculator(checkpoint_path=ckpt, device="cpu")
        s = spreads(calc, frames, args.repeats, args.sigma)
        m = calc.metadata
        rows[Path(ckpt).name] = {"cutoff": m["cutoff"], "max_neighbors": m["max_neighbors"],
                                 "strict": m["strict_max_neighbors"], "frames": len(s),
                                 "median_eV": float(np.median(s)), "max_eV": float(s.max()),
                                 "over_10meV": int((s > 0.01).sum())}
    print(json.dumps(rows, indent=1))
    print(f"\nenergy spread under N(0, {args.sigma:g} Å) displacements, {len(frames)} held-out initial placements")
    print("| model | cutoff / max neighbours | median | max | frames > 10 meV |\n|---|---|---|---|---|")
    for name, r in rows.items():
        cap = f"{r['max_neighbors']}{' strict' if r['strict'] else ''}"
        print(f"| {name} | {r['cutoff']} Å / {cap} | {r['median_eV'] * 1e3:.2f} meV | {r['max_eV'] * 1e3:.1f} meV | "
              f"{r['over_10meV']} / {r['frames']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Demo: EquiformerV2 energies and forces through the ASE calculator and the batch API.

Runs on the shipped model in checkpoints/ when it exists, otherwise on the small
fairchem-format parity checkpoint in tests/data (random weights: the numbers demonstrate
the machinery, not chemistry). Pass a checkpoint path or an official name to use another:

    python examples/demo.py [CHECKPOINT]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.constraints import FixAtoms

from eqv2_calc import EquiformerV2Calculator
from eqv2_calc.calculator import default_checkpoint
from eqv2_calc.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def slab(metal: str, facet, adsorbate: str, site: str):
    atoms = facet(metal, size=(3, 3, 4), vacuum=10.0)
    add_adsorbate(atoms, molecule(adsorbate) if len(adsorbate) > 1 else adsorbate, 1.9, site)
    atoms.pbc = True
    z = atoms.positions[:, 2]
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(z < z.min() + 2.5)))
    return atoms


def main() -> None:
    if len(sys.argv) > 1:
        checkpoint = sys.argv[1]
    else:
        try:
            checkpoint = default_checkpoint()
        except CheckpointError:
            checkpoint = str(ROOT / "tests" / "data" / "eqv2_tiny_l4m2.pt")
            print("No shipped model in checkpoints/ yet: using the random-weight parity fixture\n"
                  f"{checkpoint} (numbers are not chemistry).\n")
    calc = EquiformerV2Calculator(checkpoint, device="auto")
    for key, value in calc.metadata.items():
        print(f"  {key:22s} {value}")
    systems = {
        "Pt(111)+CO ontop": slab("Pt", fcc111, "CO", "ontop"),
        "Cu(100)+O hollow": slab("Cu", fcc100, "O", "hollow"),
        "Pt(111)+OH fcc": slab("Pt", fcc111, "OH", "fcc"),
    }
    print("\nASE calculator, one structure at a time:")
    for name, atoms in systems.items():
        atoms.calc = calc
        t = time.perf_counter()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()  # FixAtoms applied by ASE
        print(f"  {name:18s} {len(atoms):3d} atoms  E = {energy:10.4f} eV  "
              f"max|F| (free atoms) = {np.linalg.norm(forces, axis=1).max():.4f} eV/Å  "
              f"({time.perf_counter() - t:.2f} s)")
    print("\nBatch API, all structures in one packed batch:")
    t = time.perf_counter()
    results = calc.predict_batch(list(systems.values()))
    print(f"  {len(results)} structures in {time.perf_counter() - t:.2f} s")
    for name, res in zip(systems, results):
        print(f"  {name:18s} E = {res['energy']:10.4f} eV  forces {res['forces'].shape}")
    print("\nForces on the adsorbate of Pt(111)+CO (eV/Å):")
    atoms = systems["Pt(111)+CO ontop"]
    for i in range(len(atoms) - 2, len(atoms)):
        f = results[0]["forces"][i]
        print(f"  {atoms[i].symbol:2s} {f[0]:9.4f} {f[1]:9.4f} {f[2]:9.4f}")


if __name__ == "__main__":
    main()

"""Benchmark: batched in-flight L-BFGS (eqv2_calc.relax) vs sequential ase.optimize.LBFGS, both with EMT.

Prints, in one run:
  * utilization of the in-flight batches (capacity smaller than the set) and their occupancy,
    next to what synchronous batches of the same capacity would have needed (fairchem 1.x style);
  * total force calls (counted inside the EMT calculator) vs ASE;
  * wall time vs sequential ASE;
  * agreement of final energies and step counts with ASE.

Usage: python benchmarks/relax.py [--systems 60] [--capacity-fraction 0.25] [--rattle 0.1]
                                  [--curvature-guard skip|reset|none]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase.calculators.emt import EMT
from ase.optimize import LBFGS

from eqv2_calc.relax import RelaxStats, relax_batch
from eqv2_calc.relax.testing import slab_systems


class CountingEMT(EMT):
    """EMT that counts its real energy/force calculations (cache hits are not counted)."""

    calls = 0

    def calculate(self, *args, **kwargs):
        CountingEMT.calls += 1
        super().calculate(*args, **kwargs)


def synchronous_evaluations(nsteps: list[int], natoms: list[int], max_atoms: int) -> int:
    """Evaluations a synchronous batcher needs: input-order batches under ``max_atoms``, each
    running until its slowest member finishes (converged members keep being evaluated)."""
    total, batch, used = 0, [], 0
    for n, a in zip(nsteps, natoms):
        if batch and used + a > max_atoms:
            total += len(batch) * max(batch)
            batch, used = [], 0
        batch.append(n + 1)
        used += a
    return total + len(batch) * max(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", type=int, default=60)
    ap.add_argument("--capacity-fraction", type=float, default=0.25,
                    help="batch atom budget as a fraction of all atoms (default 0.25)")
    ap.add_argument("--rattle", type=float, default=0.1, help="Gaussian rattle of free atoms, Å")
    ap.add_argument("--fmax", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--curvature-guard", default="skip", choices=("skip", "reset", "none"),
                    help="'none' reproduces ASE exactly (default 'skip')")
    args = ap.parse_args()

    systems = slab_systems(args.systems, sizes=((2, 2, 3), (3, 3, 3), (2, 2, 4)), rattle=args.rattle)
    natoms = [len(s) for s in systems]
    max_atoms = max(max(natoms), int(args.capacity_fraction * sum(natoms)))
    print(f"{len(systems)} slab+adsorbate systems, {sum(natoms)} atoms ({min(natoms)}-{max(natoms)} per system); "
          f"fmax={args.fmax} eV/Å, steps={args.steps}, ASE defaults maxstep=0.2 memory=100 damping=1 alpha=70")

    # --- sequential ASE
    CountingEMT.calls = 0
    t0, c0 = time.perf_counter(), time.process_time()
    ase_e, ase_n, ase_conv = [], [], []
    for s in systems:
        a = s.copy()
        a.calc = CountingEMT()
        opt = LBFGS(a, logfile=None)
        ase_conv.append(opt.run(fmax=args.fmax, steps=args.steps))
        ase_e.append(a.get_potential_energy())
        ase_n.append(opt.nsteps)
    t_ase, cpu_ase = time.perf_counter() - t0, time.process_time() - c0
    calls_ase = CountingEMT.calls

    # --- batched, in-flight
    CountingEMT.calls = 0
    stats = RelaxStats()
    t0, c0 = time.perf_counter(), time.process_time()
    results = relax_batch(systems, CountingEMT(), fmax=args.fmax, steps=args.steps,
                          max_atoms=max_atoms, progress=False, stats=stats,
                          curvature_guard=args.curvature_guard)
    t_batch, cpu_batch = time.perf_counter() - t0, time.process_time() - c0
    calls_batch = CountingEMT.calls

    de = np.abs(np.array([r.energy for r in results]) - np.array(ase_e))
    n = [r.nsteps for r in results]
    sync = synchronous_evaluations(n, natoms, max_atoms)
    useful = sum(k + 1 for k in n)
    print()
    print(f"capacity                 : {max_atoms} atoms per potential call ({max_atoms / sum(natoms):.0%} of the set)")
    print(f"utilization (in-flight)  : {stats.utilization:.1%}  ({stats.useful_evaluations} useful / "
          f"{stats.system_evaluations} system-evaluations, {stats.potential_calls} batched calls)")
    print(f"occupancy                : {stats.occupancy:.1%} of the atom budget on average")
    print(f"synchronous batches      : would need {sync} system-evaluations (utilization {useful / sync:.1%})")
    print(f"force calls              : batched {calls_batch}  vs  ASE {calls_ase}  (ratio {calls_batch / calls_ase:.3f})")
    print(f"wall time                : batched {t_batch:.2f} s  vs  sequential ASE {t_ase:.2f} s  "
          f"(speed-up {t_ase / t_batch:.2f}x; EMT is evaluated structure by structure on the CPU either way)")
    print(f"CPU time                 : batched {cpu_batch:.2f} s  vs  sequential ASE {cpu_ase:.2f} s  "
          f"(ratio {cpu_ase / cpu_batch:.2f}x; steadier than wall time on a shared machine)")
    print(f"final energy vs ASE      : {np.mean(de < 1e-3):.0%} within 1 meV, max |dE| = {de.max():.2e} eV")
    print(f"steps                    : median {np.median(n):g} (ASE {np.median(ase_n):g}), total {sum(n)} (ASE {sum(ase_n)})")
    print(f"converged                : {sum(r.converged for r in results)}/{len(results)} (ASE {sum(ase_conv)})")
    for i in np.flatnonzero(de >= 1e-3):
        s = systems[i]
        print(f"  differs: system {i} ({s.get_chemical_formula()}): E {results[i].energy:.4f} vs ASE {ase_e[i]:.4f} eV, "
              f"steps {n[i]} ({results[i].reason}) vs ASE {ase_n[i]} ({'converged' if ase_conv[i] else 'max_steps'})")


if __name__ == "__main__":
    main()

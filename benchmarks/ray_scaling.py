"""Benchmark: Ray scale-out of batched relaxations, EMT (CPU-bound), 1 and 2 actors vs one process.

Prints, in one run: EMT force calls per second of the single-process relaxer (relax_batch) and
of relax_on_ray with 1 and 2 CPU actors on a private local Ray instance, the speed-up over the
single process, and whether the results are bit-identical. Ray's own start-up (ray.init) is
timed separately; actor start-up (importing torch, building the calculator) is inside the
timed relaxation, as a user sees it.

Usage: python benchmarks/ray_scaling.py [--systems 96] [--steps 300] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from eqv2_calc.relax import relax_batch
from eqv2_calc.relax.testing import slab_systems


def _same(a, b) -> bool:
    return all(x.energy == y.energy and x.nsteps == y.nsteps and np.array_equal(x.atoms.positions, y.atoms.positions)
               for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", type=int, default=96)
    ap.add_argument("--fmax", type=float, default=0.02)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the three measurements, interleaved")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ase.calculators.emt import EMT

    from eqv2_calc.distributed import RayOptions, relax_on_ray

    systems = slab_systems(args.systems, sizes=((3, 3, 3), (3, 3, 4)), rattle=0.1)
    settings = dict(fmax=args.fmax, steps=args.steps, max_atoms=8 * max(len(s) for s in systems))
    print(f"{len(systems)} slab+adsorbate systems, {sum(len(s) for s in systems)} atoms, EMT, fmax={args.fmax}, "
          f"steps<={args.steps}, {os.cpu_count()} CPU cores, torch threads per actor: 1")
    torch_threads = __import__("torch").get_num_threads()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    print(f"ray.init (local, 2 CPUs): {time.perf_counter() - t0:.1f} s")
    rows: dict[str, list[float]] = {"one process": [], "ray, 1 actor": [], "ray, 2 actors": []}
    startup: dict[str, list[float]] = {k: [] for k in rows}
    identical = True
    calls = 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ref = relax_batch(systems, EMT(), progress=False, **settings)
        rows["one process"].append(time.perf_counter() - t0)
        calls = sum(r.force_calls for r in ref)
        for n in (1, 2):
            t0 = time.perf_counter()
            res, st = relax_on_ray(systems, EMT(), RayOptions(actors=n, prefetch=16), progress=False, **settings)
            name = f"ray, {n} actor" + ("s" if n > 1 else "")
            rows[name].append(time.perf_counter() - t0)
            startup[name].append(st.startup_time)
            identical &= _same(ref, res)
    ray.shutdown()
    print(f"force calls per run: {calls} (sum of nsteps + 1); one-process torch threads: {torch_threads}")
    base = np.median(rows["one process"])
    print(f"{'':16s} {'wall s (median)':>16s} {'calls/s':>10s} {'vs one process':>15s} {'actor start s':>14s} "
          f"{'calls/s after start':>20s}   all runs (s)")
    for name, t in rows.items():
        m = float(np.median(t))
        s0 = float(np.median(startup[name])) if startup[name] else 0.0
        print(f"{name:16s} {m:16.2f} {calls / m:10.1f} {base / m:14.2f}x {s0:14.2f} {calls / (m - s0):20.1f}   "
              f"{', '.join(f'{x:.2f}' for x in t)}")
    print(f"results bit-identical to the one-process run: {identical}")


if __name__ == "__main__":
    main()

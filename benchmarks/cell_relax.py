"""Benchmark: batched EMT cell relaxation (``relax_batch(..., cell_filter="frechet")``) and the
share of it spent in the matrix exponential of the cell coordinates.

Prints, in one run:
  * wall time of a batched cell relaxation of ``--crystals`` strained and rattled EMT crystals
    (``--max-atoms`` per potential call: small batches by default), its potential calls and
    steps, and how much of the time the cell maths took: the matrix exponentials (``F = exp(X /
    c)`` and the 6×6 block exponential of the Fréchet-derivative adjoint), the cell-force
    function and the coordinate update, timed by wrapping them;
  * per-call times of the batched 3×3 and 6×6 matrix exponential of ``torch.linalg.matrix_exp``
    and of :func:`eqv2_calc.relax.matfun.expm` (when present) for a few batch sizes, and the
    largest relative difference of the latter from ``scipy.linalg.expm``.

``--contend`` runs a neighbour for the duration: a second process multiplying 300×300 matrices
on 2 torch threads (what another test run or training job on the same 2 cores does). Batched
``torch.linalg`` kernels open an OpenMP parallel region per call, which then waits for a
descheduled thread.

Usage: python benchmarks/cell_relax.py [--crystals 24] [--max-atoms 16] [--repeat 3] [--contend]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Callable, Iterator

import numpy as np
import scipy.linalg
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from eqv2_calc.relax import RelaxStats, relax_batch

TIMERS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def crystals(n: int, seed: int = 0) -> list[Atoms]:
    """``n`` EMT crystals (fcc/hcp/L1_2, 1-16 atoms) under random ±3 % strains, rattled 0.03 Å."""
    l12 = bulk("Cu", "fcc", a=3.70, cubic=True)
    l12.symbols[0] = "Au"
    base = [bulk("Cu", "fcc", a=3.6), bulk("Al", "fcc", a=4.05, cubic=True), bulk("Ni", "fcc", a=3.52) * (2, 2, 1),
            bulk("Pd", "fcc", a=3.89) * (2, 2, 2), bulk("Ag", "fcc", a=4.09, orthorhombic=True),
            bulk("Cu", "hcp", a=2.55, c=4.16), bulk("Pt", "hcp", a=2.77, c=4.53) * (2, 2, 1), l12]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = base[i % len(base)].copy()
        eps = rng.uniform(-0.03, 0.03, size=(3, 3))
        a.set_cell(a.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        a.rattle(0.03, seed=i)
        out.append(a)
    return out


def _timed(name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMERS[name] += time.perf_counter() - t0
            CALLS[name] += 1
    return wrapper


@contextlib.contextmanager
def timing(targets: list[tuple[object, str, str]]) -> Iterator[None]:
    """Wrap ``getattr(owner, attr)`` with a timer named ``name`` for each target (restored after)."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    for owner, attr, name in targets:
        setattr(owner, attr, _timed(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def cell_maths_targets() -> list[tuple[object, str, str]]:
    cell = importlib.import_module("eqv2_calc.relax.cell")
    targets = [(torch.linalg, name, f"torch.linalg.{name}") for name in ("matrix_exp", "det", "inv")]
    for attr in ("expm", "logm"):  # eqv2_calc.relax.matfun's, as the cell module calls them
        if hasattr(cell, attr):
            targets.append((cell, attr, f"matfun.{attr}"))
    targets += [(cell, "frechet_cell_forces", "frechet_cell_forces (incl. exp)"),
                (cell, "cell_set_coordinates", "cell_set_coordinates (incl. exp)")]
    return targets


def relaxation(args: argparse.Namespace) -> None:
    systems = crystals(args.crystals)
    print(f"{len(systems)} crystals, {sum(len(a) for a in systems)} atoms, max_atoms={args.max_atoms}, "
          f"fmax={args.fmax}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    walls, cpus, maths = [], [], defaultdict(list)
    for rep in range(args.repeat):
        TIMERS.clear()
        CALLS.clear()
        stats = RelaxStats()
        with timing(cell_maths_targets()):
            t0, c0 = time.perf_counter(), time.process_time()
            results = relax_batch(systems, EMT(), fmax=args.fmax, steps=300, max_atoms=args.max_atoms,
                                  cell_filter="frechet", progress=False, stats=stats)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        for k, v in TIMERS.items():
            maths[k].append(v)
        if rep == 0:
            steps = [r.nsteps for r in results]
            print(f"converged {sum(r.converged for r in results)}/{len(results)}, steps median "
                  f"{statistics.median(steps)} total {sum(steps)}, {stats.potential_calls} potential calls")
            print("calls: " + ", ".join(f"{k} {v}" for k, v in CALLS.items()))
    print(f"relax_batch wall time        : median {statistics.median(walls):.3f} s of {args.repeat} runs "
          f"({', '.join(f'{w:.3f}' for w in walls)}); CPU time median {statistics.median(cpus):.3f} s")
    for k, v in maths.items():
        print(f"  {k:36s}: median {statistics.median(v) * 1e3:8.1f} ms")


def _per_call(fn: Callable, a: torch.Tensor, repeat: int) -> float:
    for _ in range(20):
        fn(a)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(a)
    return (time.perf_counter() - t0) / repeat


def micro(args: argparse.Namespace) -> None:
    try:
        from eqv2_calc.relax.matfun import expm
    except ImportError:
        expm = None
    rng = np.random.default_rng(1)
    print("batched matrix exponential per call (µs) [max relative difference from scipy.linalg.expm]")
    for n in (3, 6):
        for s in (1, 4, 16, 64):
            # the cell coordinates X / c: log strains of a few per cent (6×6: the Fréchet block)
            a = torch.as_tensor(rng.normal(scale=0.05, size=(s, n, n)))
            ref = np.stack([scipy.linalg.expm(m) for m in a.numpy()])
            line = f"  {n}x{n} S={s:3d}: torch {_per_call(torch.linalg.matrix_exp, a, args.micro_repeat) * 1e6:7.1f}"
            err = np.abs(torch.linalg.matrix_exp(a).numpy() - ref).max() / np.abs(ref).max()
            line += f" [{err:.1e}]"
            if expm is not None:
                err = np.abs(expm(a).numpy() - ref).max() / np.abs(ref).max()
                line += f"   ours {_per_call(expm, a, args.micro_repeat) * 1e6:7.1f} [{err:.1e}]"
            print(line)


@contextlib.contextmanager
def neighbour(on: bool) -> Iterator[None]:
    """A competing process on the same cores while the block runs (stopped after), if ``on``."""
    if not on:
        yield
        return
    loop = "import torch\ntorch.set_num_threads(2)\na = torch.randn(300, 300)\nwhile True:\n    a @ a\n"
    proc = subprocess.Popen([sys.executable, "-c", loop])
    try:
        time.sleep(2.0)  # let it start
        yield
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crystals", type=int, default=24)
    ap.add_argument("--max-atoms", type=int, default=16, help="atoms per potential call (default 16)")
    ap.add_argument("--fmax", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=3, help="relaxation runs (the median is reported)")
    ap.add_argument("--micro-repeat", type=int, default=2000)
    ap.add_argument("--no-micro", action="store_true", help="skip the per-call timings")
    ap.add_argument("--contend", action="store_true", help="run a 2-thread torch neighbour meanwhile")
    args = ap.parse_args()
    with neighbour(args.contend):
        if args.contend:
            print("with a 2-thread torch neighbour process on the same cores")
        relaxation(args)
        if not args.no_micro:
            micro(args)


if __name__ == "__main__":
    main()

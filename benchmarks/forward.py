"""Speed and memory of one energy+forces call: eqv2-calc vs. the fairchem 1.10 reference.

For the 31M EquiformerV2 architecture (random weights in the official file layout) on
(a) the 38-atom Cu(111)+CO slab of the parity fixtures and (b) an OC20-sized
Pt(111) 4×4×4 + CO slab (66 atoms), prints seconds per call (min of --repeat after a
warm-up), process CPU time, peak RSS growth, minor page faults per call, GFLOP per call
(torch.utils.flop_counter), achieved GFLOP/s and the GFLOP/s of a 2048³ float32 matmul
measured in the same run. Each measurement runs in its own process; the reference runs in
the reference venv when it exists (../shared/reference/setup_refvenv.sh, default
/tmp/eqv2-refvenv).

Rows: "eqv2" is EquiformerV2Calculator as users get it (default settings: glibc's malloc
left alone); "eqv2+tune" opts in to eqv2_calc.runtime.tune_allocator() (what the eqv2 and
adsorbml command lines do); "baseline" (with --baseline DIR) is the calculator's default of
another checkout, e.g. `git worktree add /tmp/eqv2-old <rev>`, imported via PYTHONPATH.
With --rounds N every row is measured N times, interleaved; s/call is the best round and
"rounds" the range of the rounds' minima (the noise of a shared machine).

usage: python benchmarks/forward.py [--checkpoint PATH] [--refvenv DIR] [--baseline DIR]
                                    [--repeat N] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def structures(tmp: Path) -> dict[str, Path]:
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.io import read, write

    names = json.loads((ROOT / "tests/data/structure_names.json").read_text())
    cu = read(ROOT / "tests/data/structures.extxyz", index=names.index("Cu111_CO"))
    pt = fcc111("Pt", size=(4, 4, 4), vacuum=10.0)
    add_adsorbate(pt, molecule("CO"), 1.9, "ontop")
    pt.pbc = True
    # a perfect lattice has exactly tied neighbour distances, which fairchem's unstable sort
    # breaks arbitrarily; rattle like the parity fixtures so that both see the same graph
    pt.rattle(0.02, seed=0)
    out = {"(a) Cu(111)+CO": tmp / "cu.extxyz", "(b) Pt(111) 4x4x4+CO": tmp / "pt.extxyz"}
    write(out["(a) Cu(111)+CO"], cu)
    write(out["(b) Pt(111) 4x4x4+CO"], pt)
    return out


def run_worker(
    python: str, impl: str, ckpt: Path, structure: Path, repeat: int, threads: int,
    tune: str = "default", pythonpath: str | None = None,
) -> dict | None:
    cmd = [python, str(HERE / "_forward_worker.py"), "--impl", impl, "--checkpoint", str(ckpt),
           "--structure", str(structure), "--repeat", str(repeat), "--threads", str(threads),
           "--tune-allocator", tune]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  {impl} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def get_checkpoint(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    from eqv2_calc.checkpoint.random_init import make_random_checkpoint

    path = tmp / "eqv2_31M_seed0.pt"
    make_random_checkpoint("31M", seed=0, path=path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a 31M checkpoint (default: generated from seed 0)")
    ap.add_argument("--refvenv", default=os.environ.get("EQV2_REFVENV", "/tmp/eqv2-refvenv"))
    ap.add_argument("--baseline", help="a checkout of another revision to compare with (its default settings)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="measure every row this many times, interleaved")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in all workers (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref_python = Path(args.refvenv) / "bin" / "python"
    variants = {
        "eqv2": dict(python=sys.executable, impl="eqv2"),
        "eqv2+tune": dict(python=sys.executable, impl="eqv2", tune="on"),
    }
    if args.baseline:
        variants["baseline"] = dict(python=sys.executable, impl="eqv2", pythonpath=str(Path(args.baseline).resolve()))
    if ref_python.exists():
        variants["fairchem"] = dict(python=str(ref_python), impl="fairchem")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ckpt = get_checkpoint(args.checkpoint, tmp)
        peak = matmul_gflops()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"float32 matmul 2048^3: {peak:.0f} GFLOP/s")
        if args.baseline:
            print(f"baseline: {args.baseline}")
        print()
        header = (f"{'structure':24s} {'impl':9s} {'s/call':>8s} {'rounds':>13s} {'CPU s':>6s} {'GFLOP':>7s} "
                  f"{'GFLOP/s':>8s} {'%peak':>6s} {'peak RSS MiB':>13s} {'RSS growth':>11s} {'faults/call':>12s}")
        print(header)
        print("-" * len(header))
        for label, path in structures(tmp).items():
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            names = list(variants)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                    res = run_worker(ckpt=ckpt, structure=path, repeat=args.repeat, threads=args.threads,
                                     **variants[name])
                    if res is not None:
                        runs[name].append(res)
            rows = {}
            for name, results in runs.items():
                if not results:
                    continue
                best = min(results, key=lambda r: r["seconds_min"])
                best["rounds"] = [r["seconds_min"] for r in results]
                best["rss_growth_mib"] = max(r["rss_peak_mib"] - r["rss_loaded_mib"] for r in results)
                rows[name] = best
                rate = best["gflop"] / best["seconds_min"]
                spread = f"{min(best['rounds']):.3f}-{max(best['rounds']):.3f}" if len(results) > 1 else ""
                faults = f"{best.get('faults_min', float('nan')):.0f}" if "faults_min" in best else "?"
                print(f"{label:24s} {name:9s} {best['seconds_min']:8.3f} {spread:>13s} {best['cpu_seconds_min']:6.2f} "
                      f"{best['gflop']:7.1f} {rate:8.1f} {100 * rate / peak:5.0f}% {best['rss_peak_mib']:13.0f} "
                      f"{best['rss_growth_mib']:11.0f} {faults:>12s}")
            for name in ("eqv2", "eqv2+tune"):
                for other in ("baseline", "fairchem"):
                    if rows.get(name) and rows.get(other):
                        a, b = rows[name], rows[other]
                        print(f"{'':24s} {'ratio':9s} {name} vs {other}: speed-up {b['seconds_min'] / a['seconds_min']:.2f}x "
                              f"(CPU time {b['cpu_seconds_min'] / a['cpu_seconds_min']:.2f}x), RSS growth "
                              f"{a['rss_growth_mib']:.0f} vs {b['rss_growth_mib']:.0f} MiB, "
                              f"|dE| = {abs(a['energy'] - b['energy']):.2e} eV")
        print(f"\nmatmul re-measured after the runs: {matmul_gflops():.0f} GFLOP/s (noise check)")


if __name__ == "__main__":
    main()

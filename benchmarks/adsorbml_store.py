"""AdsorbML run-store benchmark: write throughput up to a study-sized store, and resume start-up.

Writes ``--rows`` (default 100,000) realistic ``ml`` rows into a fresh
:class:`adsorbml.store.RunStore` the way ``adsorbml run`` does: one :meth:`RunStore.write`
(existence check + insert) and one ``log_event("finish")`` per finished relaxation, for 1000
systems x 100 placements, with the store's default group commit (at most 50 rows / 0.5 s
uncommitted). A row is a 38-atom Pt(111) 3x3x4 slab + *CO (tags, ``FixAtoms`` on the bottom
half, a single-point calculator with energy and forces), with the key-value pairs and data
the workflow writes for an ML relaxation. Prints rows/s per block of ``--block`` rows
(sustained rate: the last block should be as fast as the first), then

* the same with ``batch_rows=1`` (every write committed before it returns) on
  ``--strict-rows`` rows,
* re-writing already stored rows (the existence check alone, as a resumed run does),
* reads a resumed run does: ``get``, ``rows(stage, system)``, ``count``,
* **resume start-up** in a fresh process: ``RunStore(dir)`` + ``done("ml")`` (the done-set),
  and the one-off indexing of a store written by the previous version (no index table),
* optionally the previous implementation on ``--old-rows`` rows, for comparison::

    python benchmarks/adsorbml_store.py                     # 100k rows, a few minutes
    python benchmarks/adsorbml_store.py --rows 20000 --block 5000
    git show 38c72a9:adsorbml/store.py > /tmp/old_store.py  # the version before the index
    python benchmarks/adsorbml_store.py --old-store /tmp/old_store.py --old-rows 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLACEMENTS = 100  # config ids per system


def make_pool(n: int = 64, seed: int = 0) -> list:
    """``n`` distinct relaxed-looking adslabs (reused round-robin: building Atoms is not the
    store's cost)."""
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    base = fcc111("Pt", (3, 3, 4), vacuum=8.0)
    add_adsorbate(base, molecule("CO"), 1.9, "ontop")
    base.set_tags([0] * 18 + [1] * 18 + [2] * 2)
    pool = []
    for _ in range(n):
        a = base.copy()
        a.set_constraint(FixAtoms(indices=range(18)))
        a.positions += rng.normal(0, 0.02, a.positions.shape)
        a.calc = SinglePointCalculator(a, energy=float(rng.normal(-250, 1)), forces=rng.normal(0, 0.01, (len(a), 3)))
        pool.append(a)
    return pool


def ml_row(i: int, pool: list) -> tuple:
    """(stage, system_id, config_id, atoms, kvp, data) as ``adsorbml.stages`` writes them (``adsorbml.records.relaxation_values``)."""
    a = pool[i % len(pool)]
    kvp = {"run_id": 1, "converged": True, "nsteps": 37 + i % 50, "force_calls": 38 + i % 50,
           "final_fmax": 0.031, "relax_reason": "converged", "failed": False,
           "ml_energy": a.calc.results["energy"], "anomaly": "ok" if i % 7 else "adsorbate_desorbed"}
    return ("ml", f"Pt111_CO_{i // PLACEMENTS:05d}", f"rand{i % PLACEMENTS}", a, kvp,
            {"initial_energy": a.calc.results["energy"] + 1.5})


def fill(store, n: int, block: int, pool: list, label: str) -> list[float]:
    """Write rows 0..n-1, one ``write`` + ``log_event`` each; print and return rows/s per block."""
    rates = []
    t_all = t0 = time.perf_counter()
    events = hasattr(store, "log_event")
    for i in range(n):
        row = ml_row(i, pool)
        _, written = store.write(*row)
        if events:
            store.log_event(event="finish", stage="ml", run_id=1, system_id=row[1], config_id=row[2], written=written)
        if (i + 1) % block == 0 or i + 1 == n:
            t = time.perf_counter()
            nb = (i % block) + 1
            rates.append(nb / (t - t0))
            print(f"  {label} rows {i + 1 - nb + 1:>7}-{i + 1:<7} {rates[-1]:8.0f} rows/s", flush=True)
            t0 = t
    total = time.perf_counter() - t_all
    print(f"  {label} {n} rows in {total:.1f} s: {n / total:.0f} rows/s overall, "
          f"last/first block {rates[-1] / rates[0]:.2f}", flush=True)
    return rates


RESUME_PROBE = r"""
import sys, time
t0 = time.perf_counter()
from adsorbml.store import RunStore
t1 = time.perf_counter()
st = RunStore(sys.argv[1], create=False)
t2 = time.perf_counter()
done = st.done("ml")
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {len(done)}")
"""


def resume_probe(directory: Path) -> tuple[float, float, float, int]:
    """(import s, open s, done-set s, len(done)) in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", RESUME_PROBE, str(directory)], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), int(out[3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--block", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=None, help="directory for the stores (default: a temp dir)")
    p.add_argument("--strict-rows", type=int, default=20_000, help="rows written with batch_rows=1 (0: skip)")
    p.add_argument("--old-store", type=Path, default=None, help="source of a previous adsorbml/store.py to compare")
    p.add_argument("--old-rows", type=int, default=2000)
    args = p.parse_args(argv)

    from adsorbml.store import RunStore

    tmp = tempfile.TemporaryDirectory(prefix="adsorbml_store_") if args.out is None else None
    out = Path(tmp.name) if tmp is not None else args.out
    pool = make_pool()
    print(f"store benchmark: {args.rows} rows of {len(pool[0])} atoms, one write + one event per row, in {out}")

    new_dir = out / "new"
    st = RunStore(new_dir)
    st.begin_run({"benchmark": True})
    rates = fill(st, args.rows, args.block, pool, "new")
    size = (new_dir / "adsorbml.db").stat().st_size + sum(
        f.stat().st_size for f in new_dir.glob("adsorbml.db-*"))
    print(f"  store size {size / 1e6:.0f} MB ({size / args.rows / 1e3:.1f} kB/row)")

    if args.strict_rows > 0:
        strict = RunStore(out / "strict", batch_rows=1)
        strict_rates = fill(strict, args.strict_rows, args.block, pool, "batch_rows=1")
        strict.close()

    rng = np.random.default_rng(1)
    idx = rng.integers(0, args.rows, 2000)
    t0 = time.perf_counter()
    assert not any(st.write(*ml_row(int(i), pool))[1] for i in idx)
    dt = time.perf_counter() - t0
    print(f"  existing-row write (existence check only): {dt / len(idx) * 1e6:.0f} us/row")
    t0 = time.perf_counter()
    for i in idx[:500]:
        assert st.get(*ml_row(int(i), pool)[:3]) is not None
    print(f"  get(stage, system, config): {(time.perf_counter() - t0) / 500 * 1e3:.2f} ms")
    t0 = time.perf_counter()
    n = sum(len(list(st.rows("ml", ml_row(int(i) * PLACEMENTS, pool)[1]))) for i in range(20))
    print(f"  rows('ml', system) ({n // 20} rows): {(time.perf_counter() - t0) / 20 * 1e3:.1f} ms")
    t0 = time.perf_counter()
    st.count("ml", system_id=ml_row(0, pool)[1])
    print(f"  count('ml', system_id=...): {(time.perf_counter() - t0) * 1e3:.2f} ms")
    st.close()

    imp, opn, dn, ndone = resume_probe(new_dir)
    print(f"resume start-up (fresh process, {args.rows}-row store): open {opn:.2f} s + done-set {dn:.2f} s "
          f"({ndone} keys) = {opn + dn:.2f} s   [imports {imp:.2f} s]")

    import sqlite3
    con = sqlite3.connect(new_dir / "adsorbml.db")
    con.execute("DROP TABLE adsorbml_index")
    con.commit()
    con.close()
    imp, opn, dn, ndone = resume_probe(new_dir)
    print(f"first open of a store written by the previous version (index built once): open {opn:.2f} s "
          f"+ done-set {dn:.2f} s ({ndone} keys)")

    if args.old_store is not None and args.old_rows > 0:
        spec = importlib.util.spec_from_file_location("old_adsorbml_store", args.old_store)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        old_st = old.RunStore(out / "old")
        old_st.begin_run({"benchmark": True})
        fill(old_st, args.old_rows, max(1, args.old_rows // 4), pool, "old")
    print(f"summary: {min(rates):.0f}-{max(rates):.0f} rows/s per {args.block}-row block "
          f"(last/first {rates[-1] / rates[0]:.2f})"
          + (f"; batch_rows=1: {min(strict_rates):.0f}-{max(strict_rates):.0f} rows/s" if args.strict_rows > 0 else ""))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

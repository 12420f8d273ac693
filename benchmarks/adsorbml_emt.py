"""Offline AdsorbML benchmark with EMT as the "DFT" (no downloads, CPU).

For each system (metal × facet × adsorbate, all within EMT's elements: Al Cu Ag Au Ni Pd Pt
with H C N O):

* ground truth = EMT relaxations of **every** placement (heuristic + random), i.e. the
  OC20-Dense "DFT relaxations"; their cost is counted in EMT force calls;
* the AdsorbML route = relax every placement with the ML model (default: the shipped model
  ``checkpoints/eqv2-emt-small.pt``), drop anomalies, rank by ML energy, EMT single points on
  the top k (cost: 1 force call each);
* success@k / speedup (k = 1..5) via :mod:`adsorbml.metrics`, printed as AdsorbML's Table 3,
  on adsorption energies (references ``computed`` with EMT: the default with EMT as the DFT;
  the ML side follows the model's energy convention), and the lowest E_ads per system.

Each system runs through ``adsorbml.workflow.run_workflow`` in its own resumable store
(``<out>/<system_id>/adsorbml.db``); rerunning the script skips finished work. Slabs come
from ``ase.build.bulk`` (ASE lattice constants) via pymatgen with the OC20 settings.

    python benchmarks/adsorbml_emt.py                       # 12 systems, shipped model
    python benchmarks/adsorbml_emt.py --systems 10 --placements 4
    python benchmarks/adsorbml_emt.py --ml-calculator emt   # plumbing check: ML == DFT

With ``--ml-calculator emt`` the ML model *is* the oracle, so success is ~100 % by
construction; only the plumbing and the cost accounting are exercised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# (metal, Miller index, adsorbate); order = priority when --systems is smaller
SYSTEMS: tuple[tuple[str, str, str], ...] = (
    ("Pt", "111", "*CO"),
    ("Cu", "111", "*O"),
    ("Ag", "111", "*OH"),
    ("Au", "111", "*H"),
    ("Ni", "111", "*C"),
    ("Pd", "111", "*N"),
    ("Al", "111", "*O"),
    ("Pt", "100", "*OH"),
    ("Cu", "100", "*CO"),
    ("Ni", "100", "*H"),
    ("Pd", "100", "*O"),
    ("Au", "100", "*N"),
    ("Ag", "100", "*C"),
    ("Pt", "111", "*NH"),
    ("Cu", "111", "*CH"),
    ("Pd", "111", "*NO"),
)


def benchmark_parser(doc: str, n_systems: int, systems: int, placements: int, ml: str, out: str, dft: str):
    """The command line shared by the AdsorbML benchmarks (``n_systems`` available)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", type=int, default=systems, help=f"number of systems, ≤ {n_systems} (default {systems})")
    p.add_argument("--placements", type=int, default=placements, help=f"random placements per system (default {placements})")
    p.add_argument("--no-heuristic", action="store_true", help="random placements only")
    p.add_argument("--seed", type=int, default=0, help="placement seed")
    p.add_argument("--k", type=int, default=5, help=f"largest k ({dft} single points per system)")
    p.add_argument("--ml-calculator", default=ml, help=f"{ml} (default) | shipped-emt | shipped-7net | emt | checkpoint path")
    p.add_argument("--out", default=out, help="output directory (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--ground-truth-from", metavar="DIR",
                   help="the output folder of another ML model's benchmark (<out>/<model>) of the same systems and "
                        "placements: its ground truth is copied, not recomputed (adsorbml.reuse)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser(__doc__, len(SYSTEMS), 12, 6, "shipped", "adsorbml-bench", "EMT")
    args = p.parse_args(argv)
    if not 1 <= args.systems <= len(SYSTEMS):
        p.error(f"--systems must be in 1..{len(SYSTEMS)}")
    return run_benchmark(args, SYSTEMS[: args.systems], dft="emt", dft_label="EMT")


def run_benchmark(args: argparse.Namespace, systems, dft: str, dft_label: str) -> int:
    """The benchmark over ``systems`` [(metal, hkl, adsorbate)] with DFT calculator spec ``dft``
    (args: placements, no_heuristic, seed, k, ml_calculator, out, quiet, ground_truth_from)."""
    from adsorbml.formats import write_compute, write_results, write_targets
    from adsorbml.metrics import format_table, metrics_table
    from adsorbml.reuse import copy_ground_truth
    from adsorbml.store import RunStore
    from adsorbml.summary import format_answers
    from adsorbml.workflow import RunConfig, SlabSpec, make_ml_calculator, run_workflow

    ml_calc = make_ml_calculator(args.ml_calculator)
    label = args.ml_calculator
    out = Path(args.out) / Path(label).stem.replace(":", "_")
    print(f"ML model: {label}   'DFT': {dft_label}   systems: {len(systems)}   random placements/system: {args.placements}"
          f"{'' if args.no_heuristic else ' + heuristic sites'}   output: {out}", flush=True)

    targets: dict = {}
    results: dict = {}
    compute: dict = {}
    unscored: list[str] = []
    ml_seconds = 0.0
    ml_relaxations = 0
    ml_force_calls = 0
    answers = []
    t0 = time.perf_counter()
    for i, (metal, hkl, ads) in enumerate(systems):
        cfg = RunConfig(
            slabs=[SlabSpec.parse(f"{metal}:{hkl}")], adsorbates=[ads], num_random=args.placements,
            heuristic=not args.no_heuristic, seed=args.seed, k=args.k, ml_calculator=label,
            dft_calculator=dft, ground_truth=True,
        )
        sdir = out / f"{metal}{hkl}_{ads.lstrip('*')}"
        print(f"[{i + 1}/{len(systems)}] {ads} on {metal}({hkl})", flush=True)
        if args.ground_truth_from:
            copy_ground_truth(Path(args.ground_truth_from) / sdir.name, sdir, cfg)
        s = run_workflow(cfg, sdir, ml_calculator=ml_calc, progress=not args.quiet, log=lambda m: None)
        (sid,) = s.systems
        answers += s.answers
        res = json.loads((sdir / "results.json").read_text())
        results[sid] = res.get(sid, {})
        tfile = sdir / "targets.json"
        if tfile.exists():
            targets.update(json.loads(tfile.read_text()))
            compute.update(json.loads((sdir / "compute.json").read_text()))
        else:
            unscored.append(sid)
        store = RunStore(sdir, create=False)
        for run in store.metadata.get("runs", []):
            ml_seconds += run.get("ml_seconds", 0.0)
            ml_relaxations += run.get("ml_relaxations", 0)
        ml_force_calls += sum(r.force_calls for r in store.rows("ml"))
    wall = time.perf_counter() - t0

    targets = {s: [tuple(x) for x in v] for s, v in targets.items()}
    write_targets(out / "targets.json", targets)
    write_results(out / "results.json", results)
    write_compute(out / "compute.json", compute)
    rows = metrics_table(targets, {s: results.get(s, {}) for s in targets}, {s: compute[s] for s in targets},
                         k_max=args.k, ml_seconds_per_relaxation=ml_seconds / ml_relaxations if ml_relaxations else None)
    table = format_table(rows)
    gt_calls = sum(v["ionic"] for c in compute.values() for cid, v in c.items() if cid != "surface")
    n_conf = sum(len(c) - ("surface" in c) for c in compute.values())
    lines = [
        f"AdsorbML-style benchmark, {dft_label} as DFT; ML model = {label}; {len(targets)} scored systems, "
        f"{n_conf} placements (ground truth: {gt_calls} {dft_label} force calls; ML: {ml_force_calls} model force calls, "
        f"{ml_seconds:.0f} s over {ml_relaxations} relaxations run in this and earlier invocations)",
        "",
        "Energies: adsorption energies (eV).",
        "",
        table,
        "",
        f"Lowest adsorption energy per system (ML-relaxed placements, {dft_label} single points):",
        "",
        format_answers(answers),
    ]
    if args.ground_truth_from:
        lines += ["", f"ground truth copied from {args.ground_truth_from} (the same systems, placements and settings)"]
    if unscored:
        lines += ["", f"not scored (every ground-truth relaxation anomalous): {', '.join(unscored)}"]
    lines += ["", f"wall time of this invocation: {wall:.0f} s"]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nfiles: {out}/targets.json results.json compute.json summary.md; "
          f"rescore: adsorbml metrics --targets {out}/targets.json --results {out}/results.json --compute {out}/compute.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

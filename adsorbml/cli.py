"""``adsorbml`` command line (console script entry point: ``adsorbml.cli:main``).

Commands::

    adsorbml run --out DIR [--config run.json] [--slab FILE]... [--surface BULK:HKL]...
                 [--adsorbate NAME]... [--placements N] [--seed S] [--k K] ...
    adsorbml export DIR [--out EXPORT_DIR] [--k K]
    adsorbml import DIR EXPORT_DIR [--allow-missing]
    adsorbml metrics --targets T --results R [--compute C]
    adsorbml demo [--out DIR]

``run`` resumes when pointed at a directory holding an unfinished run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from eqv2_calc.distributed.options import add_ray_arguments
from eqv2_calc.errors import Eqv2Error
from eqv2_calc.runtime import CLI_ALLOCATOR_NOTE


def _metrics(args: argparse.Namespace) -> int:
    from adsorbml.formats import read_compute, read_results, read_targets
    from adsorbml.metrics import format_table, metrics_table

    targets = read_targets(args.targets)
    results = read_results(args.results)
    compute = read_compute(args.compute) if args.compute else None
    rows = metrics_table(
        targets, results, compute, k_max=args.k, threshold=args.threshold,
        ml_seconds_per_relaxation=args.ml_seconds,
    )
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
    else:
        print(format_table(rows))
    return 0


_RUN_FLAGS = {
    # argparse dest → RunConfig field
    "placements": "num_random", "seed": "seed", "fmax": "fmax", "steps": "steps", "k": "k",
    "ml_calculator": "ml_calculator", "dft_calculator": "dft_calculator", "gt_fmax": "gt_fmax",
    "gt_steps": "gt_steps", "max_atoms": "max_atoms", "references": "references",
    "ml_energy_convention": "ml_energy_convention",
}


def _run_config(args: argparse.Namespace):
    from adsorbml.workflow import RunConfig, SlabSpec, load_config

    d = load_config(args.config) if args.config else {}
    slabs = list(d.get("slabs", []))
    slabs += [{"file": f} for f in args.slab or []]
    slabs += [SlabSpec.parse(s).to_dict() for s in args.surface or []]
    d["slabs"] = slabs
    if args.adsorbate:
        d["adsorbates"] = list(d.get("adsorbates", [])) + list(args.adsorbate)
    for dest, key in _RUN_FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            d[key] = v
    if args.no_heuristic:
        d["heuristic"] = False
    if args.ground_truth:
        d["ground_truth"] = True
    return RunConfig.from_dict(d)


def _print_files(files: dict, out_dir: Path) -> None:
    for name, path in files.items():
        if not name.startswith("plot:"):
            print(f"  {name}: {path}")
    n_plots = sum(n.startswith("plot:") for n in files)
    if n_plots:
        print(f"  plots: {n_plots} PNG files in {Path(out_dir) / 'plots'}")


def _print_answers(answers, table: str | None) -> None:
    from adsorbml.summary import format_answers

    if table:
        print("\nmetrics (adsorption energies):\n" + table)
    if answers:
        print("\nlowest adsorption energy per system:\n" + format_answers(answers))


def _print_summary(s, table: str | None) -> None:
    print(f"\n{len(s.systems)} systems, {s.n_placements} placements; this run: {s.ml_relaxed_now} ML relaxations "
          f"({s.ml_skipped} already done), {s.dft_now} DFT single points, {s.gt_relaxed_now} ground-truth relaxations")
    _print_files(s.files, s.out_dir)
    _print_answers(s.answers, table)
    if s.dft_errors:
        print(f"\n{len(s.dft_errors)} DFT single point(s) failed:", file=sys.stderr)
        for name, msg in s.dft_errors.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        if s.dft_stopped:
            print("  DFT work stopped at the first error (--continue-on-dft-error to go on)", file=sys.stderr)


def _dft_exit(s, continue_on_error: bool) -> int:
    return 0 if (not s.dft_errors or continue_on_error) else 1


def _trusted_ml_calculator(args: argparse.Namespace, spec: str):
    """With --trust-checkpoint, the ML calculator built with trust_checkpoint=True (else None:
    run_workflow builds it from the config)."""
    if not args.trust_checkpoint:
        return None
    from adsorbml.workflow import make_ml_calculator

    return make_ml_calculator(spec, trust_checkpoint=True)


def _run(args: argparse.Namespace) -> int:
    from adsorbml.workflow import run_workflow

    cfg = _run_config(args)
    from eqv2_calc.distributed.options import options_from_args

    ray = options_from_args(args)
    s = run_workflow(cfg, args.out, ml_calculator=_trusted_ml_calculator(args, cfg.ml_calculator),
                     plots=not args.no_plots, progress=not args.quiet,
                     continue_on_dft_error=args.continue_on_dft_error, ray=ray)
    _print_summary(s, s.table)
    return _dft_exit(s, args.continue_on_dft_error)


def _import(args: argparse.Namespace) -> int:
    from adsorbml.dft_import import import_single_points

    rep = import_single_points(args.run_dir, args.export_dir, plots=not args.no_plots)
    print(f"{rep.export_dir}: {len(rep.imported)} single points imported, {len(rep.kept)} already in the store, "
          f"{len(rep.problems)} not usable")
    for label, entries in (("imported", rep.imported), ("kept", rep.kept)):
        for name, e in entries.items():
            print(f"  {label} {name}: E = {e['energy']:.4f} eV, {e['scf_steps']} SCF steps, "
                  f"{e['ionic_steps']} ionic step(s) ({Path(e['source']).name})")
    for name, why in rep.problems.items():
        print(f"  NOT IMPORTED {name}: {why}", file=sys.stderr)
    _print_files(rep.files, rep.run_dir)
    _print_answers(rep.answers, rep.table)
    if rep.problems and not args.allow_missing:
        print(f"adsorbml import: {len(rep.problems)} calculation director{'y' if len(rep.problems) == 1 else 'ies'} "
              "not usable (listed above); --allow-missing to accept a partial import", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from adsorbml.export import export_run

    paths = export_run(args.run_dir, args.out, args.k, vasp=not args.no_vasp)
    print(f"exported {len(paths)} VASP single-point directories (clean slabs + top k; top_k.extxyz per system); "
          f"read them back with: adsorbml import {args.run_dir} <export dir>")
    return 0


DEMO_SURFACES = ("Pt:111", "Cu:100")
DEMO_ADSORBATES = ("*CO", "*O", "*OH")


def _demo_models(args: argparse.Namespace) -> tuple[str, str]:
    """(ML spec, label) of the demo: --ml-calculator, else the shipped model of the mode, or a
    clear error if this installation lacks it (never a silent stand-in)."""
    from adsorbml.errors import InputError
    from eqv2_calc.checkpoint import registry
    from eqv2_calc.errors import CheckpointError

    if args.ml_calculator:
        return args.ml_calculator, Path(args.ml_calculator).stem.replace(":", "_")
    variant = "emt" if args.toy else "7net"
    try:
        shipped = registry.shipped_checkpoint(variant)
    except CheckpointError as e:
        raise InputError(
            f"the demo runs the shipped EquiformerV2 model, which is missing: {e}\n"
            "  (--ml-calculator emt runs the demo with EMT standing in for the ML model: a plumbing "
            "check only, ML and 'DFT' then agree by construction)"
        ) from None
    print(f"ML model: the shipped EquiformerV2 checkpoint ({shipped})")
    # the label carries the file's hash: an updated shipped model writes a new directory
    # instead of being refused by the store made with the old one
    return ("shipped" if args.toy else "shipped-7net"), f"{Path(shipped).stem}-{registry.file_sha256(shipped)[:8]}"


def _demo(args: argparse.Namespace) -> int:
    from adsorbml.workflow import RunConfig, SlabSpec, run_workflow

    if not args.toy:
        from eqv2_calc.train.teacher import make_teacher

        make_teacher()  # the teacher is installed, or a message with the install command
    ml, label = _demo_models(args)
    base = Path(args.out or "adsorbml-demo")
    out = base / label if (args.out is None or args.per_model) else base
    common = dict(slabs=[SlabSpec.parse(s) for s in DEMO_SURFACES], adsorbates=list(DEMO_ADSORBATES),
                  num_random=args.placements, heuristic=True, seed=0, k=args.k, ml_calculator=ml)
    if args.toy:
        cfg = RunConfig(**common, dft_calculator="emt", ground_truth=True)
        what = "'DFT' = EMT single points, ground truth = EMT relaxations of every placement"
    else:
        cfg = RunConfig(**common, dft_calculator="sevennet", references="dft", ground_truth=False)
        what = ("'DFT' = single points of the SevenNet teacher (7net-l3i5, a universal potential, not DFT) on the "
                "top k; gas references H2, H2O, CO, N2 relaxed with the teacher (OC20 referencing)")
    ml_calc = _trusted_ml_calculator(args, ml)
    print(f"systems: {', '.join(DEMO_ADSORBATES)} on {', '.join(DEMO_SURFACES)} (pymatgen slabs, OC20 settings); "
          f"{what}\noutput: {out}")
    s = run_workflow(cfg, out, ml_calculator=ml_calc, progress=not args.quiet)
    _print_summary(s, s.table)
    if s.dft_errors:
        return 1
    if args.toy:
        print(f"\nscore it again with: adsorbml metrics --targets {out}/targets.json --results {out}/results.json "
              f"--compute {out}/compute.json")
    return 0


_TRUST_HELP = ("load an --ml-calculator checkpoint even if its pickle holds objects beyond tensors, containers, "
               "numbers and strings (full unpickling can run code from the file: only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adsorbml", description="AdsorbML workflow: placements → ML relaxations → "
                                "anomaly filter → top-k DFT single points → success/speedup",
                                epilog=CLI_ALLOCATOR_NOTE)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume the workflow (state in <out>/adsorbml.db)")
    r.add_argument("--out", required=True, help="output directory (resumed if it holds a run with the same settings)")
    r.add_argument("--config", help="JSON (or YAML with PyYAML) file with RunConfig keys; flags override it")
    r.add_argument("--slab", action="append", help="clean slab file (any ase.io format); repeatable")
    r.add_argument("--surface", action="append", help="BULK:HKL, e.g. Pt:111 or bulk.cif:1,0,0; repeatable")
    r.add_argument("--adsorbate", action="append", help="adsorbate name, e.g. *CO; repeatable")
    r.add_argument("--placements", type=int, help="random placements per system (default 100)")
    r.add_argument("--no-heuristic", action="store_true", help="skip the heuristic ontop/bridge/hollow sites")
    r.add_argument("--seed", type=int, help="placement seed (default 0)")
    r.add_argument("--fmax", type=float, help="ML relaxation fmax, eV/Å (default 0.02)")
    r.add_argument("--steps", type=int, help="ML relaxation steps (default 300)")
    r.add_argument("--k", type=int, help="DFT single points on the top k (default 5)")
    r.add_argument("--ml-calculator", help="shipped (default) | emt | checkpoint path | model name | module:Class")
    r.add_argument("--dft-calculator", help="emt (default) | none | module:Class")
    r.add_argument("--trust-checkpoint", action="store_true", help=_TRUST_HELP)
    r.add_argument("--ground-truth", action="store_true",
                   help="also relax every placement with the DFT calculator (targets/compute files, metrics)")
    r.add_argument("--gt-fmax", type=float, help="ground-truth relaxation fmax (default 0.02 eV/Å)")
    r.add_argument("--gt-steps", type=int, help="ground-truth relaxation steps (default 300)")
    r.add_argument("--max-atoms", type=int, help="atoms per batched relaxation call (does not change results)")
    r.add_argument("--references", choices=("oc20", "computed", "dft"),
                   help="gas references of E_ads: oc20 (RPBE/VASP constants; default with VASP, i.e. "
                        "--dft-calculator none), computed (H2, H2O, CO, N2 relaxed with each side's calculator) "
                        "or dft (relaxed with the DFT calculator, for both sides; default with an in-process "
                        "DFT such as emt)")
    r.add_argument("--ml-energy-convention", choices=("referenced", "total"),
                   help="energy convention of the ML model (default: its metadata, else total)")
    r.add_argument("--continue-on-dft-error", action="store_true",
                   help="keep going after a DFT single point raises (exit 0); default: stop and exit 1")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG per system")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ray_arguments(r)
    r.set_defaults(func=_run)

    e = sub.add_parser("export", help="top-k VASP inputs + extxyz from a run directory")
    e.add_argument("run_dir")
    e.add_argument("--out", help="export directory (default <run_dir>/export)")
    e.add_argument("--k", type=int, help="default: the run's k")
    e.add_argument("--no-vasp", action="store_true", help="only the extxyz files")
    e.set_defaults(func=_export)

    im = sub.add_parser("import", help="read finished VASP single points of an export into the run, "
                                       "recompute results/summary/metrics")
    im.add_argument("run_dir")
    im.add_argument("export_dir", help="the tree written by adsorbml export (<system_id>/<config_id>/vasprun.xml ...)")
    im.add_argument("--allow-missing", action="store_true",
                    help="exit 0 even if some directories are unfinished, failed or missing (they are still listed)")
    im.add_argument("--no-plots", action="store_true", help="skip the PNG per system")
    im.set_defaults(func=_import)

    d = sub.add_parser("demo", help="E_ads of *CO, *O, *OH on Pt(111) and Cu(100): the shipped distilled model, "
                                    "SevenNet single points on the top k (--toy: EMT model and EMT as DFT)")
    d.add_argument("--out", help="output directory (default adsorbml-demo/<model>-<first 8 hex digits of its sha256>)")
    d.add_argument("--per-model", action="store_true", help="put the run in <out>/<model>")
    d.add_argument("--placements", type=int, default=4, help="random placements per system (default 4)")
    d.add_argument("--k", type=int, default=5, help="DFT single points per system (default 5)")
    d.add_argument("--ml-calculator", help="override the ML model (default: the shipped model; e.g. emt)")
    d.add_argument("--toy", action="store_true",
                   help="the plumbing demo without the teacher: the EMT-trained shipped model, EMT as 'DFT' and "
                        "EMT ground-truth relaxations of every placement (success/speedup metrics)")
    d.add_argument("--trust-checkpoint", action="store_true", help=_TRUST_HELP)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    m = sub.add_parser("metrics", help="success@k, ML-only success and speedup from OC20-Dense files")
    m.add_argument("--targets", required=True, help="{system_id: [(config_id, E_DFT), ...]} (.json/.json.gz/.pkl)")
    m.add_argument("--results", required=True, help="{system_id: {config_id: {ml_energy, ml+dft_energy, ...}}}")
    m.add_argument("--compute", help="{system_id: {config_id: {scf, ionic}}} for the speedup")
    m.add_argument("--k", type=int, default=5, help="largest k (default 5)")
    m.add_argument("--threshold", type=float, default=0.1, help="success threshold in eV (default 0.1)")
    m.add_argument("--ml-seconds", type=float, default=None, help="ML seconds per relaxation, for the table")
    m.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    m.set_defaults(func=_metrics)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from eqv2_calc.runtime import tune_allocator

    args = build_parser().parse_args(argv)
    tune_allocator()
    try:
        return args.func(args)
    except (Eqv2Error, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"adsorbml {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``adsorbml`` command line (console script entry point: ``adsorbml.cli:main``).

Implemented: ``adsorbml metrics``. Pending (issue 5): ``run``, ``export``, ``demo``, which
need the resumable ase.db store.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from adsorbml.errors import AdsorbMLError


def _metrics(args: argparse.Namespace) -> int:
    from adsorbml.metrics import format_table, metrics_table, read_compute, read_results, read_targets

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adsorbml", description="AdsorbML workflow (metrics; more stages pending)")
    sub = p.add_subparsers(dest="command", required=True)
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AdsorbMLError, FileNotFoundError) as e:
        print(f"adsorbml {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

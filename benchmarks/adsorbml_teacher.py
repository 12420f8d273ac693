"""AdsorbML benchmark with the SevenNet teacher as the "DFT" (offline, CPU; needs ``[teacher]``).

The same benchmark as ``adsorbml_emt.py`` (ground truth = teacher relaxations of every
placement, cost in teacher force calls; AdsorbML route = ML relaxations, anomaly filter, teacher
single points on the top k; success@k, ML-only success and speedup on adsorption energies with
teacher-relaxed gas references), on the **held-out test systems** of the distillation data
(:func:`eqv2_calc.train.distill_data.systems`, split by :func:`~eqv2_calc.train.emt_data.split_systems`):
(metal, facet, adsorbate) combinations the distilled model never saw.

    python benchmarks/adsorbml_teacher.py                              # 10 systems, shipped-7net
    python benchmarks/adsorbml_teacher.py --systems 12 --placements 4 --ml-calculator shipped-emt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adsorbml_emt import benchmark_parser, run_benchmark  # noqa: E402

from eqv2_calc.train.distill_data import generation_options, systems  # noqa: E402
from eqv2_calc.train.emt_data import split_systems  # noqa: E402


def held_out_systems(seed: int = 0) -> list[tuple[str, str, str]]:
    """(metal, facet, adsorbate) of the distillation data's test split, in its seeded order."""
    opts = generation_options(seed=seed)
    return split_systems(systems(opts["seed"], opts["ads_per_surface"]), opts["seed"])["test"]


def main(argv: list[str] | None = None) -> int:
    held = held_out_systems()
    p = benchmark_parser(__doc__, len(held), 10, 4, "shipped-7net", "adsorbml-bench-teacher", "teacher")
    args = p.parse_args(argv)
    if not 1 <= args.systems <= len(held):
        p.error(f"--systems must be in 1..{len(held)}")
    return run_benchmark(args, held[: args.systems], dft="sevennet", dft_label="SevenNet (7net-l3i5)")


if __name__ == "__main__":
    sys.exit(main())

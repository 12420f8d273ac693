"""AdsorbML from Python: *O and *OH on Cu(111), EMT as the DFT stand-in, resumable.

    python examples/adsorbml_run.py [out_dir] [--ml emt|shipped|<checkpoint>]

Run it twice (or interrupt it with Ctrl-C / kill -9 and run again): finished relaxations are
read back from <out_dir>/adsorbml.db instead of being redone. Same as

    adsorbml run --out <out_dir> --surface Cu:111 --adsorbate '*O' --adsorbate '*OH' \
        --placements 6 --k 3 --ml-calculator emt --ground-truth
"""

from __future__ import annotations

import argparse

from adsorbml.workflow import RunConfig, SlabSpec, run_workflow

p = argparse.ArgumentParser()
p.add_argument("out", nargs="?", default="adsorbml-example")
p.add_argument("--ml", default=None, help="ML model (default: shipped model if present, else EMT)")
args = p.parse_args()
ml = args.ml or "shipped"  # a missing shipped model is an error that says so, never a silent EMT run

cfg = RunConfig(
    slabs=[SlabSpec(bulk="Cu", miller=(1, 1, 1))],  # pymatgen slab, OC20 settings
    adsorbates=["*O", "*OH"],
    num_random=6,          # + heuristic ontop/bridge/hollow sites
    k=3,                   # EMT single points on the 3 lowest-energy valid placements
    ml_calculator=ml,
    dft_calculator="emt",
    ground_truth=True,     # also EMT-relax every placement → targets.json / compute.json
)
summary = run_workflow(cfg, args.out)
print(f"ML model: {ml}; {summary.ml_relaxed_now} relaxed now, {summary.ml_skipped} read back from the store")
print(summary.table)
for name, path in summary.files.items():
    print(f"{name}: {path}")

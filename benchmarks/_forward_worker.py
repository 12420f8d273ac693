"""Times one energy+forces call of a checkpoint in *this* interpreter; prints one JSON line.

Run by benchmarks/forward.py, with the project's venv (--impl eqv2) or the fairchem 1.10
reference venv (--impl fairchem). Measures: min seconds over --repeat calls after a warm-up,
peak RSS growth during the calls (MiB, over the RSS after loading and one warm-up call is
*not* subtracted: growth is measured from the post-load RSS), minor page faults per call (min
over the calls: fresh pages the C allocator had to map), and FLOPs of one call counted by
torch.utils.flop_counter. The eqv2_calc imported is whichever comes first on the path, so
PYTHONPATH=<checkout> measures another revision.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["eqv2", "fairchem"], required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--structure", required=True, help="extxyz file with one structure")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tune-allocator", choices=["default", "on", "off"], default="default",
                    help="eqv2: EquiformerV2Calculator(tune_allocator=True/False), or the calculator's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ase.io import read

    atoms = read(args.structure)
    if args.impl == "eqv2":
        import eqv2_calc
        from eqv2_calc import EquiformerV2Calculator

        source = str(Path(eqv2_calc.__file__).resolve().parents[1])
        tune = {"on": {"tune_allocator": True}, "off": {"tune_allocator": False}}.get(args.tune_allocator, {})
        calc = EquiformerV2Calculator(args.checkpoint, device="cpu", **tune)

        def call():
            calc.reset()
            atoms.calc = calc
            return atoms.get_potential_energy(), calc.results["forces"]
    else:
        import logging

        logging.disable(logging.WARNING)
        from fairchem.core.common.relaxation.ase_utils import OCPCalculator

        calc = OCPCalculator(checkpoint_path=args.checkpoint, cpu=True, seed=0)
        source = "fairchem"
        calc.trainer.model.eval()

        def call():
            calc.reset()
            atoms.calc = calc
            return atoms.get_potential_energy(), calc.results["forces"]

    rss_loaded = rss_peak_mib()
    energy, _ = call()  # warm-up
    times, cpu_times, faults = [], [], []
    for _ in range(args.repeat):
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t, c = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    rss_peak = rss_peak_mib()
    from torch.utils.flop_counter import FlopCounterMode

    if args.impl == "fairchem":
        # FlopCounterMode's module hooks fail on fairchem's autograd-enabled forward; the
        # documented switch `direct_forces` turns that off without changing the computation.
        calc.trainer.model.direct_forces = 1
    with FlopCounterMode(display=False) as counter:
        call()
    print(json.dumps({
        "impl": args.impl, "natoms": len(atoms), "energy": float(energy), "seconds_min": min(times),
        "seconds_all": times, "cpu_seconds_min": min(cpu_times), "rss_loaded_mib": rss_loaded, "rss_peak_mib": rss_peak,
        "faults_min": min(faults), "source": source,
        "gflop": counter.get_total_flops() / 1e9, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""``eqv2 info`` and ``eqv2 predict``: inspect a checkpoint, or evaluate structures from a file."""

from __future__ import annotations

import argparse
import json

from eqv2_calc.batching import DEFAULT_MAX_ATOMS

TRUST_HELP = ("load the checkpoint even if its pickle holds objects beyond tensors, containers, numbers and "
              "strings (full unpickling can run code from the file: only for files you trust)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="print a checkpoint's metadata (architecture, energy convention, cutoff, ...)")
    info.add_argument("checkpoint", help="checkpoint file or official name")
    info.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    info.set_defaults(func=run_info)

    pred = sub.add_parser("predict", help="energies and forces of every structure in a file")
    pred.add_argument("input", help="any file ase.io can read (all frames are used)")
    pred.add_argument("--checkpoint", default=None, help="checkpoint file or official name (default: shipped model)")
    pred.add_argument("--out", required=True, help="output file (extxyz with energy and forces per frame)")
    pred.add_argument("--device", default="auto")
    pred.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    pred.add_argument("--max-atoms", type=int, default=DEFAULT_MAX_ATOMS,
                      help=f"atoms per model call (default {DEFAULT_MAX_ATOMS})")
    pred.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    pred.set_defaults(func=run_predict)


def run_info(args: argparse.Namespace) -> int:
    from eqv2_calc.checkpoint import load_model

    _, meta = load_model(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    print(json.dumps({**meta.to_dict(), "config": meta.config}, indent=2))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ase.io import read, write

    from eqv2_calc.calculator import EquiformerV2Calculator
    from eqv2_calc.io import atomic_write, frame_with_results

    frames = read(args.input, ":")
    calc = EquiformerV2Calculator(args.checkpoint, device=args.device, dtype=args.dtype,
                                  trust_checkpoint=args.trust_checkpoint)
    results = calc.predict_batch(frames, max_atoms=args.max_atoms, progress=True)
    frames = [frame_with_results(atoms, res["energy"], res.get("forces"), stress=res.get("stress"))
              for atoms, res in zip(frames, results)]
    atomic_write(args.out, lambda tmp: write(tmp, frames, format="extxyz"))
    print(f"wrote {len(frames)} structures to {args.out}")
    return 0

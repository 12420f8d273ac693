"""``eqv2 train`` (train / fine-tune EquiformerV2 on energies and forces) and ``eqv2 emt-data``
(generate the EMT reference data set).

Examples::

    eqv2 emt-data runs/emt-data
    eqv2 train --preset emt-small --train runs/emt-data/train.extxyz --val runs/emt-data/val.extxyz --out runs/emt-small
    eqv2 train --config my_run.json            # JSON with TrainConfig fields; flags override it
    eqv2 train --init-checkpoint checkpoints/eqv2-emt-small.pt --train my_dft.extxyz --out runs/ft --epochs 20

A killed run resumes from ``OUT/resume.pt`` when the same command is run again
(``--no-resume`` starts over). The final EMA model is ``OUT/final.pt`` (fairchem layout,
loadable with ``EquiformerV2Calculator(checkpoint_path=...)``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eqv2_calc.errors import InputError

_FLAG_FIELDS = {  # CLI flag dest -> TrainConfig field
    "train": "train", "val": "val", "out": "out_dir", "epochs": "epochs", "max_steps": "max_steps",
    "batch_size": "batch_size", "lr": "lr", "seed": "seed", "init_checkpoint": "init_checkpoint",
    "threads": "threads", "energy_coef": "energy_coef", "force_coef": "force_coef",
    "ema_decay": "ema_decay", "warmup_steps": "warmup_steps", "clip_grad_norm": "clip_grad_norm",
    "checkpoint_every": "checkpoint_every", "trust_checkpoint": "trust_checkpoint",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` and ``emt-data`` sub-commands; returns the ``train`` parser."""
    from eqv2_calc.train import emt_data

    d = subparsers.add_parser("emt-data", help="generate EMT slab+adsorbate training data",
                              description=emt_data.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    emt_data.add_arguments(d)
    d.set_defaults(func=emt_data.run)

    p = subparsers.add_parser("train", help="train or fine-tune an EquiformerV2 on energies and forces",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file with TrainConfig fields (flags override)")
    p.add_argument("--preset", choices=["emt-small"], help="start from the shipped model's settings")
    p.add_argument("--train", nargs="+", help="training data: extxyz / ASE db files (energy eV, forces eV/Å)")
    p.add_argument("--val", nargs="+", help="validation data files")
    p.add_argument("--out", help="output directory (checkpoints, logs)")
    p.add_argument("--init-checkpoint", help="fine-tune from this checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true", default=None,
                   help="load --init-checkpoint even if its pickle holds objects beyond tensors, containers, "
                        "numbers and strings (full unpickling can run code from the file: only for files you trust)")
    for flag, typ in (("epochs", int), ("max-steps", int), ("batch-size", int), ("lr", float), ("seed", int),
                      ("threads", int), ("energy-coef", float), ("force-coef", float), ("ema-decay", float),
                      ("warmup-steps", int), ("clip-grad-norm", float), ("checkpoint-every", int)):
        p.add_argument(f"--{flag}", type=typ)
    p.add_argument("--no-resume", action="store_true", help="ignore OUT/resume.pt and start over")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)
    return p


def config_from_args(args: argparse.Namespace):
    """TrainConfig from --preset, --config and flags (later ones win)."""
    from eqv2_calc.train.loop import TrainConfig

    data: dict = {}
    if args.preset == "emt-small":
        from eqv2_calc.train.ship import EMT_SMALL

        data.update(EMT_SMALL)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        data.update(json.loads(path.read_text()))
    for dest, fieldname in _FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            data[fieldname] = value
    if not data.get("train"):
        raise InputError("no training data: give --train FILE... or 'train' in --config")
    if not data.get("model") and not data.get("init_checkpoint"):
        raise InputError("no model architecture: give --preset, a 'model' dict in --config, or --init-checkpoint")
    return TrainConfig.from_dict(data)


def run_train(args: argparse.Namespace) -> int:
    from eqv2_calc.train.loop import train

    cfg = config_from_args(args)
    result = train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps({"final": str(result.final), "steps": result.step, "seconds": round(result.seconds, 1),
                      "train": result.train_metrics, "val": result.val_metrics}, indent=1))
    return 0

"""Regenerate the teacher data and retrain the distilled shipped model ``checkpoints/eqv2-7net-small.pt``.

One command, seeded end to end, resumable at every stage::

    python -m eqv2_calc.train.distill --threads 2                 # the shipped file: data → runs/distill-data, model → runs/distill-small
    python -m eqv2_calc.train.distill --limit 105 --threads 2     # a smaller run on the first 105 labelling jobs

Steps: (1) :func:`eqv2_calc.train.distill_data.generate_distill_dataset` (needs the
``[teacher]`` extra; finished jobs are kept, so a killed run continues; ``--limit N`` labels
only the first N jobs in their fixed, interleaved order; the jobs labelled so far are committed
in ``data/`` and restored first, unless ``--relabel``), (2) :func:`eqv2_calc.train.loop.train`
with :data:`DISTILL_SMALL`, fine-tuning the EMT-trained shipped model (same architecture;
element references and energy/force scales refitted to the teacher; resumes from
``runs/distill-small/resume.pt``), (3) copies its ``final.pt`` (EMA weights) to ``--dest``.
Evaluate with ``python benchmarks/distill_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from eqv2_calc.checkpoint.registry import SHIPPED_MODELS
from eqv2_calc.train.distill_data import LABELS_ARCHIVE, generate_distill_dataset, generation_options, restore_labels
from eqv2_calc.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = ROOT / "checkpoints" / SHIPPED_MODELS["7net"]
INIT = ROOT / "checkpoints" / SHIPPED_MODELS["emt"]

DISTILL_SMALL: dict = dict(
    seed=0, epochs=12, batch_size=8, lr=1e-3, min_lr_ratio=0.02, warmup_steps=50, warmup_factor=0.1,
    weight_decay=1e-3, clip_grad_norm=10.0, ema_decay=0.998, energy_coef=4.0, force_coef=10.0,
    refit_normalizers=True, checkpoint_every=100, eval_every=500, log_every=10,
)
"""Training options of the distilled model (TrainConfig fields, without paths)."""


def distill_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of the distilled model for data in ``data_dir``."""
    return TrainConfig.from_dict({
        **DISTILL_SMALL, "train": [str(data_dir / "train.extxyz")], "val": [str(data_dir / "val.extxyz")],
        "out_dir": str(out_dir), "init_checkpoint": str(INIT), **overrides,
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqv2_calc.train.distill", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "distill-data"))
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "distill-small"))
    p.add_argument("--dest", default=str(DEFAULT_DEST), help="where to copy the final checkpoint")
    p.add_argument("--limit", type=int, help="label only the first N jobs (see distill_data)")
    p.add_argument("--workers", type=int, default=2, help="teacher processes for the data")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = default)")
    p.add_argument("--epochs", type=int, default=DISTILL_SMALL["epochs"])
    p.add_argument("--relabel", action="store_true", help=f"do not restore the committed labels ({LABELS_ARCHIVE.name})")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    if LABELS_ARCHIVE.is_file() and not args.relabel:
        print(f"restored {restore_labels(data_dir)} labelled files from {LABELS_ARCHIVE.name} (--relabel: label everything anew)")
    manifest = generate_distill_dataset(data_dir, workers=args.workers, limit=args.limit, **generation_options())
    cfg = distill_config(data_dir, Path(args.out_dir), threads=args.threads, epochs=args.epochs)
    result = train(cfg)
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.final, dest)
    print(json.dumps({"checkpoint": str(dest), "data": manifest["frames"], "steps": result.step,
                      "seconds": round(result.seconds, 1), "val": result.val_metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

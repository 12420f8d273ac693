"""Regenerate the EMT data and retrain the shipped model ``checkpoints/eqv2-emt-small.pt``.

One command, seeded end to end::

    python -m eqv2_calc.train.ship                      # data → runs/emt-data, training → runs/emt-small
    python -m eqv2_calc.train.ship --threads 2          # what the shipped model was trained with (~1 h)

Steps: (1) :func:`eqv2_calc.train.emt_data.generate_emt_dataset` (skipped if the data
directory already holds a manifest with the same generation options; ``--regenerate`` forces it),
(2) :func:`eqv2_calc.train.loop.train` with :data:`EMT_SMALL` (resumes a killed run from
``runs/emt-small/resume.pt``), then a second stage :data:`EMT_SMALL_FINETUNE` from its final
EMA weights in ``runs/emt-small-ft``, (3) copies the second stage's ``final.pt`` (EMA weights
as ``state_dict``) to ``--dest``. Evaluate with ``python benchmarks/emt_model_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from eqv2_calc.train.emt_data import generate_emt_dataset, generation_options
from eqv2_calc.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = ROOT / "checkpoints" / "eqv2-emt-small.pt"

EMT_SMALL_MODEL: dict = dict(
    num_layers=2, sphere_channels=32, attn_hidden_channels=32, num_heads=4, attn_alpha_channels=8,
    attn_value_channels=8, ffn_hidden_channels=64, lmax=2, mmax=1, grid_resolution=8, edge_channels=32,
    max_num_elements=90, max_radius=5.0, max_neighbors=20, enforce_max_neighbors_strictly=True,
)
"""Architecture of the shipped model (EquiformerV2Config fields; avg_num_nodes/avg_degree
come from the training data)."""

EMT_SMALL: dict = dict(
    model=EMT_SMALL_MODEL, seed=0, epochs=9, batch_size=8, lr=1.5e-3, min_lr_ratio=0.01,
    warmup_steps=100, warmup_factor=0.1, weight_decay=1e-3, clip_grad_norm=10.0, ema_decay=0.999,
    energy_coef=1.0, force_coef=5.0, checkpoint_every=100, eval_every=1000, log_every=10,
)
"""Training options of the shipped model, stage 1 (TrainConfig fields, without paths)."""

EMT_SMALL_FINETUNE: dict = dict(
    seed=1, epochs=3, batch_size=8, lr=4e-4, min_lr_ratio=0.01, warmup_steps=50, warmup_factor=0.1,
    weight_decay=1e-3, clip_grad_norm=10.0, ema_decay=0.999, energy_coef=1.0, force_coef=10.0,
    checkpoint_every=100, eval_every=1000, log_every=10,
)
"""Stage 2: continue from stage 1's EMA weights (same architecture and normalisation) with a
lower learning rate and more weight on forces."""


def ship_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of the shipped model for data in ``data_dir``."""
    return TrainConfig.from_dict({
        **EMT_SMALL, "train": [str(data_dir / "train.extxyz")], "val": [str(data_dir / "val.extxyz")],
        "out_dir": str(out_dir), **overrides,
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqv2_calc.train.ship", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "emt-data"))
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "emt-small"))
    p.add_argument("--dest", default=str(DEFAULT_DEST), help="where to copy the final checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regenerate", action="store_true", help="regenerate the data even if present")
    p.add_argument("--workers", type=int, default=2, help="processes for the EMT data")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = default)")
    args = p.parse_args(argv)
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    manifest = data_dir / "manifest.json"
    wanted = generation_options(seed=args.seed)
    have = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if args.regenerate or any(have.get(k) != v for k, v in wanted.items()):
        generate_emt_dataset(data_dir, **wanted, workers=args.workers)
    cfg = ship_config(data_dir, out_dir, seed=args.seed, threads=args.threads)
    stage1 = train(cfg)
    cfg2 = TrainConfig.from_dict({
        **EMT_SMALL_FINETUNE, "train": cfg.train, "val": cfg.val, "out_dir": str(out_dir) + "-ft",
        "init_checkpoint": str(stage1.final), "threads": args.threads,
    })
    result = train(cfg2)
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.final, dest)
    print(json.dumps({"checkpoint": str(dest), "steps": result.step, "seconds": round(result.seconds, 1),
                      "val": result.val_metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

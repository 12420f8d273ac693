"""Training and fine-tuning of EquiformerV2 on energies (eV) and forces (eV/Å).

* :mod:`~eqv2_calc.train.dataset`: labelled frames from extxyz / ASE db, precomputed graphs, batches;
* :mod:`~eqv2_calc.train.loss`: energy-per-atom MAE + free-atom force L2-MAE, metrics;
* :mod:`~eqv2_calc.train.loop`: AdamW, warm-up + cosine, clipping, EMA, checkpoints, resume;
* :mod:`~eqv2_calc.train.emt_data`: EMT slab+adsorbate reference data (split by system);
* :mod:`~eqv2_calc.train.ship`: one command that regenerates the data and the shipped model;
* :mod:`~eqv2_calc.train.teacher`: the SevenNet teacher (``[teacher]`` extra, offline weights);
* :mod:`~eqv2_calc.train.distill_data`: teacher-labelled frames from AdsorbML's own slabs and placements;
* :mod:`~eqv2_calc.train.distill`: one command that regenerates that data and the distilled model.

The EquiformerV2 forward is differentiable and deterministic (no dropout or drop-path).
"""

from eqv2_calc.train.dataset import Frame, GraphDataset, TrainBatch, fit_element_references, read_frames
from eqv2_calc.train.loop import EMA, TrainConfig, TrainResult, evaluate, train
from eqv2_calc.train.loss import MetricSums, energy_force_loss

__all__ = [
    "Frame", "GraphDataset", "TrainBatch", "read_frames", "fit_element_references",
    "TrainConfig", "TrainResult", "train", "evaluate", "EMA", "energy_force_loss", "MetricSums",
]

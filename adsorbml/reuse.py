"""Reuse another run's ground truth: compare ML models on the same "DFT" relaxations.

The ground truth of a system (the DFT relaxation of every placement, OC20-Dense style) does not
depend on the ML model. :func:`copy_ground_truth` copies the slabs, placements and ground-truth
rows (stages :data:`COPIED_STAGES`) of a finished run into a new run directory; a run there
then relaxes only with its own ML model and makes its own DFT single points, and is scored
against exactly the same targets. The source must agree on every setting that determines the
ground truth (:data:`GROUND_TRUTH_FIELDS`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from adsorbml.config import RunConfig
from adsorbml.errors import InputError
from adsorbml.store import DB_NAME, RunStore

GROUND_TRUTH_FIELDS: tuple[str, ...] = (
    "slabs", "adsorbates", "num_random", "heuristic", "seed", "dft_calculator", "ground_truth", "gt_fmax",
    "gt_steps", "checks",
)
"""The :attr:`RunConfig.RESULT_FIELDS` that the slabs, placements and ground truth depend on."""

COPIED_STAGES: tuple[str, ...] = ("slab", "placement", "slab_gt", "gt")
"""The store stages copied: clean slabs, placements, ground-truth relaxed slabs and placements."""


def copy_ground_truth(source: str | os.PathLike, dest: str | os.PathLike, cfg: RunConfig) -> int:
    """Copy the :data:`COPIED_STAGES` rows of the run in ``source`` into a new run directory
    ``dest`` that is about to run ``cfg``; returns the number of rows copied. ``dest`` already
    holding a run is left as it is (0: resuming keeps its own rows). Raises :class:`InputError`
    if ``source`` has no run, its settings differ from ``cfg`` in a :data:`GROUND_TRUTH_FIELDS`
    field, or it has no ground truth."""
    source, dest = Path(source), Path(dest)
    if (dest / DB_NAME).is_file():
        existing = RunStore(dest, create=False)
        has_run = bool(existing.metadata)
        existing.close()
        if has_run:
            return 0
    if not (source / DB_NAME).is_file():
        raise InputError(f"no run to take the ground truth from: {source / DB_NAME} does not exist")
    src = RunStore(source, create=False)
    try:
        rows = _ground_truth_rows(src, source, cfg)
    finally:
        src.close()
    out = RunStore(dest)
    try:
        return out.write_many(rows)
    finally:
        out.close()


def _ground_truth_rows(src: RunStore, source: Path, cfg: RunConfig) -> list[tuple]:
    """The :data:`COPIED_STAGES` rows of ``src`` as :meth:`RunStore.write_many` takes them, after
    checking that they are the ground truth of ``cfg``."""
    stored = src.metadata.get("fingerprint") or {}
    wanted = json.loads(json.dumps(cfg.fingerprint()))
    differ = [f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} here" for k in GROUND_TRUTH_FIELDS
              if stored.get(k) != wanted.get(k)]
    if differ:
        raise InputError(f"{source} has another ground truth than this run ({'; '.join(differ)}); "
                         "copy only from a run of the same systems, placements and DFT settings")
    if not src.count("gt"):
        raise InputError(f"{source} holds no ground-truth relaxations (run it with ground_truth first)")
    return [(stage, r.system_id, r.config_id, r.toatoms(),
             {k: v for k, v in r.key_value_pairs.items() if k not in ("stage", "system_id", "config_id")},
             r.data) for stage in COPIED_STAGES for r in src.rows(stage)]


__all__ = ["COPIED_STAGES", "GROUND_TRUTH_FIELDS", "copy_ground_truth"]

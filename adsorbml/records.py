"""Store rows ↔ domain objects for the stages of :mod:`adsorbml.stages`.

One function per direction and row kind, so the key names of a stage's rows are written in
exactly one place. Rows are ase.db rows of :class:`adsorbml.store.RunStore`; energies in eV.

Stages and their rows (``system_id`` / ``config_id``)::

    slab      slab_id / "slab"        the prepared clean slab, data["info"]
    placement system_id / config_id   initial adslab; site_kind, slab_id, adsorbate; data: site, rotation
    slab_ml   slab_id / "slab"        ML-relaxed clean slab, ml_energy
    ml        system_id / config_id   ML-relaxed adslab, ml_energy, anomaly, relaxation counters
    dft_sp    system_id / config_id   DFT single point, dft_energy, dft_ok, dft_error, scf/ionic steps
              slab_id / "slab"        ... of the ML-relaxed clean slab (without ground truth)
    slab_gt   slab_id / "slab"        DFT-relaxed clean slab, gt_energy
    gt        system_id / config_id   DFT-relaxed adslab, gt_energy, anomaly
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from ase import Atoms

from adsorbml.inputs import SlabRecord
from adsorbml.placements import Placement
from adsorbml.ranking import MLResult

__all__ = [
    "Row",
    "dft_errors",
    "dft_failed",
    "ml_result",
    "placement_from_row",
    "placement_row",
    "relaxation_values",
    "row_energy",
    "single_point_values",
    "slab_from_row",
    "slab_row",
]

Row = tuple[str, str, str, Atoms, Mapping[str, Any], Mapping[str, Any]]
"""(stage, system_id, config_id, atoms, key-value pairs, data): one row for ``RunStore.write_many``."""


def slab_row(rec: SlabRecord, run_id: int) -> Row:
    return ("slab", rec.slab_id, "slab", rec.atoms, {"run_id": run_id}, {"info": json.loads(json.dumps(rec.info))})


def slab_from_row(row: Any) -> SlabRecord:
    info = dict(row.data.get("info", {}))
    millers = info.get("millers")
    return SlabRecord(row.system_id, row.toatoms(), tuple(millers) if millers else None, info.get("shift"), info)


def placement_row(system_id: str, slab_id: str, adsorbate: str, p: Placement, run_id: int) -> Row:
    return ("placement", system_id, p.config_id, p.atoms,
            {"run_id": run_id, "site_kind": p.site_kind, "slab_id": slab_id, "adsorbate": adsorbate}, p.metadata())


def placement_from_row(row: Any) -> Placement:
    d = row.data
    return Placement(row.config_id, row.toatoms(), np.asarray(d["site"], float), str(d["site_kind"]),
                     int(d["binding_index"]), np.asarray(d["rotation"], float))


def relaxation_values(r: Any, run_id: int) -> dict[str, Any]:
    """Key-value pairs of a finished relaxation (:class:`eqv2_calc.relax.RelaxResult`)."""
    return {"run_id": run_id, "converged": bool(r.converged), "nsteps": int(r.nsteps),
            "force_calls": int(r.nsteps) + 1, "final_fmax": float(r.fmax) if math.isfinite(r.fmax) else None,
            "relax_reason": r.reason, "failed": bool(r.failed)}


def single_point_values(d: Any, run_id: int, attempts: int = 1) -> dict[str, Any]:
    """Key-value pairs of a DFT single point (:class:`adsorbml.single_points.SinglePoint`)."""
    return {"run_id": run_id, "dft_energy": d.energy, "dft_ok": d.energy is not None, "scf_steps": d.scf_steps,
            "ionic_steps": d.ionic_steps, "dft_error": d.error, "dft_attempts": attempts}


def ml_result(row: Any) -> MLResult:
    """An ``ml`` store row as an :class:`MLResult` (raw ML energy)."""
    e = row.get("ml_energy", math.nan)
    return MLResult(row.config_id, row.toatoms(), float(e) if e is not None else math.nan, row.anomaly,
                    bool(row.converged), {"nsteps": row.nsteps})


def row_energy(row: Any, key: str) -> float | None:
    """``row[key]`` (eV), else the energy ase.db stored with the structure; None if neither/non-finite."""
    if row is None:
        return None
    e = row.get(key)
    if e is None:
        e = row.get("energy")
    if e is None or not math.isfinite(float(e)):
        return None
    return float(e)


def dft_failed(row: Any) -> bool:
    """Whether a ``dft_sp`` row records a failed single point."""
    return not row.get("dft_ok", row.get("dft_energy") is not None)


def dft_errors(store: Any) -> dict[str, str]:
    """Every failed DFT single point in the store: ``"<system_id>/<config_id>"`` → message."""
    return {f"{r.system_id}/{r.config_id}": r.get("dft_error") or "failed (no message recorded)"
            for r in store.rows("dft_sp") if dft_failed(r)}

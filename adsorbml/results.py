"""A system's results in adsorption energies, read from a run's store.

:func:`system_results` turns the rows of one system (placements, ML relaxations, DFT single
points, ground truth, clean slabs) into a :class:`SystemResults`: per placement E_ads(ML) and
E_ads(ML+DFT), the OC20-Dense results/targets/compute entries and the system's answer
(:mod:`adsorbml.summary`). Within a system E_ads and the stored raw energies differ by one
constant per side (:class:`adsorbml.energies.SystemOffsets`). Energies in eV.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from adsorbml.energies import (
    DFT_SLAB_GROUND_TRUTH,
    DFT_SLAB_SINGLE_POINT,
    EnergyScheme,
    SystemOffsets,
    system_offsets,
)
from adsorbml.errors import InputError
from adsorbml.ranking import MLResult, rank_valid
from adsorbml.records import ml_result, row_energy
from adsorbml.store import RunStore
from adsorbml.summary import PlacementEnergies, SystemAnswer, system_answer

__all__ = ["SystemResults", "energy_scheme", "system_results"]


@dataclass
class SystemResults:
    """One system's results (eV; None where not available).

    Attributes
    ----------
    ml:
        Every ML-relaxed placement in placement order, with its **raw** ML energy.
    placements:
        The same placements in adsorption energies, with site and anomaly verdict.
    ranked:
        The valid ML results by ML energy (raw energies; AdsorbML's ranking).
    dft:
        config_id → raw DFT single-point energy (None: failed, see ``placements[i].dft_error``).
    results:
        The system's OC20-Dense results entry (valid placements, adsorption energies).
    targets, compute:
        Ground-truth entries (valid DFT relaxations in E_ads; their cost), when ground truth ran.
    ground_truth_complete:
        Whether every placement has a ground-truth relaxation.
    """

    system_id: str
    slab_id: str | None
    adsorbate: str
    offsets: SystemOffsets
    ml: list[MLResult]
    placements: list[PlacementEnergies]
    ranked: list[MLResult]
    dft: dict[str, float | None]
    results: dict[str, dict[str, Any]]
    answer: SystemAnswer
    targets: list[tuple[str, float]] = field(default_factory=list)
    compute: dict[str, dict] = field(default_factory=dict)
    ground_truth: dict[str, float | None] = field(default_factory=dict)
    ground_truth_complete: bool = False

    def ml_ads(self) -> list[MLResult]:
        """:attr:`ml` with ``ml_energy`` replaced by E_ads(ML) (NaN where unknown), for plots."""
        return [dataclasses.replace(r, ml_energy=_nan(self.offsets.ml_ads(r.ml_energy))) for r in self.ml]

    def dft_ads(self) -> dict[str, float | None]:
        """config_id → E_ads(ML+DFT)."""
        return {c: self.offsets.dft_ads(e) for c, e in self.dft.items()}


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def energy_scheme(store: RunStore) -> EnergyScheme:
    """The energy scheme recorded with the run (references, conventions, gas references)."""
    d = (store.config or {}).get("energy_scheme")
    if not d:
        raise InputError(f"{store.path} records no energy scheme (written by an older version); rerun it in a new directory")
    return EnergyScheme.from_dict(d)


def system_results(store: RunStore, system_id: str, scheme: EnergyScheme, ground_truth: bool) -> SystemResults:
    """The results of ``system_id`` from ``store`` (see the module docstring)."""
    prows = list(store.rows("placement", system_id))
    order = {r.config_id: i for i, r in enumerate(prows)}
    slab_id = prows[0].slab_id if prows else None
    adsorbate = prows[0].get("adsorbate", "") if prows else ""
    ml = sorted((ml_result(r) for r in store.rows("ml", system_id)), key=lambda r: order.get(r.config_id, len(order)))
    dft_rows = {r.config_id: r for r in store.rows("dft_sp", system_id)}
    ml_slab = row_energy(store.get("slab_ml", slab_id, "slab"), "ml_energy") if slab_id else None
    if ground_truth:
        srow = store.get("slab_gt", slab_id, "slab") if slab_id else None
        dft_slab, dft_ref = row_energy(srow, "gt_energy"), DFT_SLAB_GROUND_TRUTH
    else:
        srow = store.get("dft_sp", slab_id, "slab") if slab_id else None
        dft_slab = row_energy(srow, "dft_energy") if srow is not None and srow.get("dft_ok", True) else None
        dft_ref = DFT_SLAB_SINGLE_POINT
    off = system_offsets(scheme, prows[0].toatoms() if prows else adsorbate.lstrip("*"), ml_slab, dft_slab, dft_ref)

    site = {r.config_id: (r.get("site_kind"), tuple(r.data.get("site", ())) or None) for r in prows}
    dft = {c: r.get("dft_energy") for c, r in dft_rows.items()}
    placements = []
    for r in ml:
        d = dft_rows.get(r.config_id)
        kind, xyz = site.get(r.config_id, (None, None))
        placements.append(PlacementEnergies(r.config_id, kind, xyz, r.anomaly, off.ml_ads(r.ml_energy),
                                            None if d is None else off.dft_ads(d.get("dft_energy")),
                                            None if d is None else d.get("dft_error")))
    ranked = rank_valid(ml)
    results = {}
    for r in ranked:
        d = dft_rows.get(r.config_id)
        results[r.config_id] = {
            "ml_energy": off.ml_ads(r.ml_energy),
            "ml+dft_energy": None if d is None else off.dft_ads(d.get("dft_energy")),
            "scf_steps": None if d is None else d.get("scf_steps"),
            "ionic_steps": None if d is None else d.get("ionic_steps"),
        }

    targets: list[tuple[str, float]] = []
    compute: dict[str, dict] = {}
    gt_ads: dict[str, float | None] = {}
    gt_min = None
    complete = False
    if ground_truth:
        gt_rows = list(store.rows("gt", system_id))
        complete = len(gt_rows) >= len(prows)
        gt_ads = {r.config_id: (off.dft_ads(r.get("gt_energy")) if r.anomaly == "ok" else None) for r in gt_rows}
        targets = [(c, e) for c, e in gt_ads.items() if e is not None]
        gt_min = min((e for _, e in targets), default=None)
        compute = {r.config_id: {"scf": None, "ionic": int(r.force_calls)} for r in gt_rows}
        if srow is not None:
            compute["surface"] = {"scf": None, "ionic": int(srow.force_calls)}
    answer = system_answer(system_id, str(slab_id), str(adsorbate), placements, ground_truth=gt_min,
                           dft_slab_reference=off.dft_slab_reference)
    return SystemResults(system_id, slab_id, str(adsorbate), off, ml, placements, ranked, dft, results, answer,
                         targets, compute, gt_ads, complete)

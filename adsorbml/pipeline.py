"""One AdsorbML system end to end, in memory: placements → batched ML relaxation → anomaly
filter → ranking → (optional) single points on the top k with any ASE calculator.

For many systems, persistence and resume after a crash, use :func:`adsorbml.workflow.run_workflow`
(``adsorbml run``), which runs the same stages through the ase.db store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ase import Atoms

from adsorbml.adsorbates import Adsorbate, as_adsorbate
from adsorbml.anomalies import DEFAULT_CHECKS, detect_anomalies
from adsorbml.export import MLResult, rank_valid
from adsorbml.inputs import SlabRecord
from adsorbml.placements import Placement, generate_placements
from adsorbml.single_points import SinglePoint, run_single_points

__all__ = ["SystemResult", "run_system", "ADSORBML_FMAX", "ADSORBML_STEPS"]

ADSORBML_FMAX = 0.02  # eV/Å
ADSORBML_STEPS = 300


@dataclass
class SystemResult:
    """Everything computed for one adsorbate+slab system.

    ``ml`` has one :class:`MLResult` per placement (input order); ``ranked`` the valid ones
    by ML energy; ``dft`` maps config_id → :class:`~adsorbml.single_points.SinglePoint` for the top k (if run).
    ``ml_seconds`` is the wall time of the ML relaxations (placements only).
    """

    system_id: str
    placements: list[Placement]
    relaxed_slab: Atoms
    ml: list[MLResult]
    ranked: list[MLResult]
    dft: dict[str, SinglePoint] = field(default_factory=dict)
    ml_seconds: float = 0.0
    ml_force_calls: int = 0

    def results_entry(self) -> dict[str, dict[str, Any]]:
        """This system's part of an OC20-Dense results file (valid placements only)."""
        out = {}
        for r in self.ranked:
            d = self.dft.get(r.config_id)
            out[r.config_id] = {
                "ml_energy": float(r.ml_energy),
                "ml+dft_energy": None if d is None else d.energy,
                "scf_steps": None if d is None else d.scf_steps,
                "ionic_steps": None if d is None else d.ionic_steps,
            }
        return out


def run_system(
    slab: SlabRecord,
    adsorbate: "str | Adsorbate",
    ml_calculator: Any,
    *,
    system_id: str | None = None,
    dft_calculator: Any | None = None,
    k: int = 5,
    num_random: int = 100,
    heuristic: bool = True,
    seed: int = 0,
    fmax: float = ADSORBML_FMAX,
    steps: int = ADSORBML_STEPS,
    checks: Sequence[str] = DEFAULT_CHECKS,
    progress: bool = True,
    **relax_options: Any,
) -> SystemResult:
    """Run one system.

    Parameters
    ----------
    slab:
        Prepared clean slab (:mod:`adsorbml.inputs`).
    adsorbate:
        Name or :class:`~adsorbml.adsorbates.Adsorbate`.
    ml_calculator:
        Any ASE calculator or an ``EquiformerV2Calculator`` (batched); passed to
        :func:`eqv2_calc.relax.relax_batch`.
    dft_calculator:
        If given, single points on the top ``k`` valid placements (EMT as a stand-in).
    fmax, steps:
        AdsorbML defaults 0.02 eV/Å and 300 steps.
    relax_options:
        Passed to ``relax_batch`` (e.g. ``maxstep``, ``max_atoms``).
    """
    from eqv2_calc.relax import RelaxStats, relax_batch

    ads = as_adsorbate(adsorbate)
    sid = system_id or f"{slab.slab_id}_{ads.name}"
    placements = generate_placements(slab, ads, num_random=num_random, heuristic=heuristic, seed=seed)

    # reference: the clean slab relaxed at the same level of theory
    slab_res = relax_batch([slab.atoms], ml_calculator, fmax=fmax, steps=steps, progress=False, **relax_options)[0]
    stats = RelaxStats()
    t0 = time.perf_counter()
    relaxed = relax_batch(
        [p.atoms for p in placements], ml_calculator, fmax=fmax, steps=steps,
        names=[p.config_id for p in placements], progress=progress, stats=stats, **relax_options,
    )
    ml_seconds = time.perf_counter() - t0
    ml: list[MLResult] = []
    for p, r in zip(placements, relaxed):
        if r.failed:
            anomaly = f"relaxation_{r.reason}"
        else:
            anomaly = detect_anomalies(p.atoms, r.atoms, slab_res.atoms, checks).reason
        ml.append(MLResult(p.config_id, r.atoms, float(r.energy), anomaly, bool(r.converged), {"nsteps": r.nsteps}))
    ranked = rank_valid(ml)
    result = SystemResult(
        sid, placements, slab_res.atoms, ml, ranked, ml_seconds=ml_seconds,
        ml_force_calls=sum(r.nsteps + 1 for r in relaxed),
    )
    if dft_calculator is not None and ranked:
        top = ranked[:k]
        for r, d in zip(top, run_single_points([r.atoms for r in top], dft_calculator, progress=False)):
            result.dft[r.config_id] = d
    return result

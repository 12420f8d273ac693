"""ML-relaxed placements and their ranking: :class:`MLResult` and :func:`rank_valid`.

AdsorbML ranks the anomaly-free relaxed placements of a system by ML energy and sends the
lowest k to DFT. Within one system raw and adsorption energies differ by one constant, so
either ranks the same. Energies in eV.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from ase import Atoms

from adsorbml.errors import InputError

__all__ = ["MLResult", "rank_valid"]


@dataclass
class MLResult:
    """One ML-relaxed placement.

    Attributes
    ----------
    config_id:
        Placement id (``"heur0"``, ``"rand12"``).
    atoms:
        Relaxed adslab (Å; tags 0/1/2).
    ml_energy:
        ML energy of ``atoms`` (eV); the quantity ranked on.
    anomaly:
        ``"ok"`` or the anomalous checks, comma-separated (see :mod:`adsorbml.anomalies`).
    converged:
        Whether the relaxation reached fmax.
    info:
        Extra values, e.g. ``{"nsteps": n}``.
    """

    config_id: str
    atoms: Atoms
    ml_energy: float
    anomaly: str = "ok"
    converged: bool = True
    info: dict = field(default_factory=dict)


def rank_valid(results: Iterable[MLResult], k: int | None = None) -> list[MLResult]:
    """Non-anomalous results with a finite ML energy, ascending in energy (ties by config_id).

    Non-converged relaxations are kept (AdsorbML uses the last frame). Returns at most ``k``.
    """
    valid = [r for r in results if r.anomaly == "ok" and math.isfinite(float(r.ml_energy))]
    valid.sort(key=lambda r: (float(r.ml_energy), r.config_id))
    if k is not None:
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        valid = valid[:k]
    return valid

"""DFT single points in-process with any ASE calculator (EMT, tblite, GPAW, ...).

A calculator that raises is not swallowed: the :class:`SinglePoint` carries the error message
(``"<ExceptionType>: <message>"``), which the workflow writes to the store row
(``dft_error``), to ``events.jsonl`` and to the command's summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ase import Atoms

from eqv2_calc.io import frame_with_results

__all__ = ["SinglePoint", "run_single_points", "single_point"]


@dataclass
class SinglePoint:
    """One single point. ``energy`` (eV) is None if it failed; then ``error`` says why.

    ``scf_steps`` is None for a generic ASE calculator (unknown); ``ionic_steps`` = 1 (one force
    call); ``atoms`` holds energy and forces (SinglePointCalculator) when it succeeded.
    """

    energy: float | None
    scf_steps: int | None = None
    ionic_steps: int | None = 1
    converged: bool | None = None
    atoms: Atoms | None = None
    error: str | None = None


def single_point(atoms: Atoms, calculator: Any) -> SinglePoint:
    """Energy and forces of a copy of ``atoms`` with ``calculator``; errors are returned, not raised."""
    a = atoms.copy()
    a.calc = calculator
    try:
        e = float(a.get_potential_energy())
        f = a.get_forces(apply_constraint=False)
    except Exception as exc:  # noqa: BLE001 — any calculator failure is recorded with its message
        return SinglePoint(None, None, 1, False, None, f"{type(exc).__name__}: {exc}")
    if not math.isfinite(e):
        return SinglePoint(None, None, 1, False, None, f"non-finite energy ({e})")
    return SinglePoint(e, None, 1, None, frame_with_results(a, e, f))


def run_single_points(structures: Sequence[Atoms], calculator: Any, progress: bool = True) -> list[SinglePoint]:
    """:func:`single_point` for each structure (in order)."""
    from tqdm.auto import tqdm

    return [single_point(a, calculator) for a in tqdm(structures, desc="DFT single points", disable=not progress)]

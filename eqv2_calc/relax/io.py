"""Relaxation outputs on disk, all readable with ``ase.io``.

* trajectories: one ASE ``.traj`` per structure (initial frame, every ``save_every``-th
  frame, final frame; each frame carries a SinglePointCalculator with energy and raw forces
  and keeps the input's constraints);
* IS2RS: relaxed structures as multi-frame extxyz (:func:`write_is2rs`);
* IS2RE: relaxed energies as CSV or JSON (:func:`write_is2re`).

Every file is written with :func:`eqv2_calc.io.atomic_write` (a temporary name in the same
directory, then renamed), so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from ase import Atoms

from eqv2_calc.errors import InputError
from eqv2_calc.io import atomic_write, frame_with_results

if TYPE_CHECKING:
    from eqv2_calc.relax.results import RelaxResult

IS2RE_FIELDS: tuple[str, ...] = (
    "index", "name", "energy", "initial_energy", "fmax", "nsteps", "converged", "failed", "reason",
)
"""Columns of the IS2RE table (energies in eV, fmax in eV/Å)."""


def make_frame(
    template: Atoms, positions: np.ndarray, energy: float, forces: np.ndarray, *,
    cell: np.ndarray | None = None, stress: np.ndarray | None = None,
) -> Atoms:
    """Copy ``template`` (constraints, tags, cell, info kept) with new ``positions`` (Å) and a
    SinglePointCalculator holding ``energy`` (eV) and raw ``forces`` (eV/Å); see
    :func:`eqv2_calc.io.frame_with_results`. A cell relaxation also gives the new ``cell``
    [3, 3] (Å) and the ``stress`` [3, 3] (eV/Å³, stored in ASE's Voigt order)."""
    if stress is not None:
        from ase.stress import full_3x3_to_voigt_6_stress

        stress = full_3x3_to_voigt_6_stress(np.asarray(stress, dtype=np.float64))
    return frame_with_results(template, energy, forces, positions=positions, cell=cell, stress=stress)


def write_trajectory(path: str | os.PathLike, frames: Sequence[Atoms]) -> None:
    """Write ``frames`` to an ASE trajectory (``.traj``) atomically."""
    from ase.io.trajectory import Trajectory

    def _write(tmp: str) -> None:
        with Trajectory(tmp, "w") as traj:
            for frame in frames:
                traj.write(frame)

    atomic_write(path, _write, suffix=".traj")


def result_atoms_for_output(result: "RelaxResult") -> Atoms:
    """The relaxed structure with scalar result fields in ``atoms.info`` (for extxyz; info
    values extxyz cannot store, such as dicts, are dropped)."""
    results = result.atoms.calc.results
    return frame_with_results(
        result.atoms, results["energy"], results["forces"], stress=results.get("stress"), scalar_info_only=True,
        info=dict(
            relax_index=result.index,
            relax_name=result.name,
            relax_fmax=float(result.fmax),
            relax_nsteps=int(result.nsteps),
            relax_converged=bool(result.converged),
            relax_failed=bool(result.failed),
            relax_reason=result.reason,
            relax_initial_energy=float(result.initial_energy),
        ),
    )


def write_is2rs(path: str | os.PathLike, results: Iterable["RelaxResult"]) -> None:
    """Write the relaxed structures (IS2RS) as multi-frame extxyz, in the given order.

    Each frame keeps the constraints (``move_mask`` column), stores energy (eV) and raw
    forces (eV/Å), and has ``relax_*`` keys in its info (index, name, fmax, nsteps,
    converged, failed, reason, initial_energy).
    """
    import ase.io

    frames = [result_atoms_for_output(r) for r in results]
    atomic_write(path, lambda tmp: ase.io.write(tmp, frames, format="extxyz"), suffix=".extxyz")


def _row(result: "RelaxResult") -> dict[str, Any]:
    return {
        "index": result.index,
        "name": result.name,
        "energy": float(result.energy),
        "initial_energy": float(result.initial_energy),
        "fmax": float(result.fmax),
        "nsteps": int(result.nsteps),
        "converged": bool(result.converged),
        "failed": bool(result.failed),
        "reason": result.reason,
    }


def write_is2re(path: str | os.PathLike, results: Iterable["RelaxResult"]) -> None:
    """Write relaxed energies (IS2RE) as ``.csv`` or ``.json`` (chosen by the suffix).

    Columns/keys: :data:`IS2RE_FIELDS`. JSON writes NaN energies of failed systems as null.
    """
    rows = [_row(r) for r in results]
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        def _write(tmp: str) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(IS2RE_FIELDS))
                w.writeheader()
                for row in rows:
                    w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    elif suffix == ".json":
        def _write(tmp: str) -> None:
            clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in row.items()} for row in rows]
            with open(tmp, "w") as fh:
                json.dump(clean, fh, indent=1)
    else:
        raise InputError(f"IS2RE output {str(path)!r}: use a .csv or .json file name")
    atomic_write(path, _write)


def read_is2re(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a table written by :func:`write_is2re` (types restored)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        with open(path) as fh:
            rows = json.load(fh)
        for row in rows:
            for k in ("energy", "initial_energy", "fmax"):
                if row[k] is None:
                    row[k] = math.nan
        return rows
    if suffix != ".csv":
        raise InputError(f"IS2RE file {str(path)!r}: expected .csv or .json")
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.append({
                "index": int(row["index"]), "name": row["name"],
                "energy": float(row["energy"]), "initial_energy": float(row["initial_energy"]),
                "fmax": float(row["fmax"]), "nsteps": int(row["nsteps"]),
                "converged": row["converged"] == "True", "failed": row["failed"] == "True",
                "reason": row["reason"],
            })
    return out

"""Ranking of ML-relaxed placements and top-k export for DFT.

Finished VASP single points are read back by :mod:`adsorbml.vasp_import` (``adsorbml import``);
in-process single points are :mod:`adsorbml.single_points`.

Layout written by :func:`export_top_k` (one directory per system)::

    <out>/<system_id>/top_k.extxyz            the k structures, best first (info: system_id,
                                              config_id, rank, ml_energy)
    <out>/<system_id>/<config_id>/POSCAR      atoms in the adslab's order (sort=False), Cartesian,
                                              selective dynamics from FixAtoms
    <out>/<system_id>/<config_id>/INCAR       OC20 flags + single-point settings (NSW 0, NELM 300)
    <out>/<system_id>/<config_id>/KPOINTS     OC20 surface rule (Monkhorst-Pack)
    <out>/paths.txt                           one calculation directory per line

POTCARs are licensed and not written: concatenate them in the order of the POSCAR's species
line (which may repeat an element, because the atom order is kept so results map back
one-to-one).

OC20 VASP settings (fairchem-data-oc ``VASP_FLAGS``; RPBE): IBRION 2, ISIF 0, ISPIN 1,
ISYM 0, LREAL Auto, EDIFFG −0.03, SYMPREC 1e-10, ENCUT 350, LAECHG False, LWAVE False,
NCORE 4, GGA RP (PBE PAW potentials). AdsorbML single points add NSW 0 and NELM 300.
K-points: (max(1, round(40/‖a‖∞)), max(1, round(40/‖b‖∞)), 1), with the infinity norm of the
cell rows as in ``calculate_surface_k_points``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.io import write

from adsorbml.errors import InputError
from adsorbml.single_points import run_single_points  # noqa: F401  (re-exported; it lived here)
from eqv2_calc.io import atomic_write, atomic_write_text, copy_with_results

__all__ = [
    "MLResult",
    "rank_valid",
    "OC20_VASP_FLAGS",
    "SINGLE_POINT_FLAGS",
    "surface_kpoints",
    "incar_text",
    "kpoints_text",
    "write_vasp_inputs",
    "export_top_k",
    "run_single_points",
]

OC20_VASP_FLAGS: dict[str, Any] = {
    "IBRION": 2,
    "NSW": 2000,
    "ISIF": 0,
    "ISPIN": 1,
    "ISYM": 0,
    "LREAL": "Auto",
    "EDIFFG": -0.03,
    "SYMPREC": 1e-10,
    "ENCUT": 350,
    "LAECHG": False,
    "LWAVE": False,
    "NCORE": 4,
    "GGA": "RP",
}
SINGLE_POINT_FLAGS: dict[str, Any] = {"NSW": 0, "NELM": 300}
KPOINT_MULTIPLIER = 40.0  # Å


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


def _right_handed(atoms: Atoms) -> Atoms:
    """Swap a and b if the cell is left-handed (VASP requires a positive triple product)."""
    a = atoms.copy()
    if np.linalg.det(np.asarray(a.cell)) < 0:
        cell = np.asarray(a.cell).copy()
        a.set_cell(cell[[1, 0, 2]], scale_atoms=False)
    return a


def surface_kpoints(atoms: Atoms, multiplier: float = KPOINT_MULTIPLIER) -> tuple[int, int, int]:
    """OC20 k-point mesh for a slab: (max(1, round(40/‖a‖∞)), max(1, round(40/‖b‖∞)), 1)."""
    cell = np.asarray(atoms.cell)
    na = np.linalg.norm(cell[0], ord=np.inf)
    nb = np.linalg.norm(cell[1], ord=np.inf)
    if na <= 0 or nb <= 0:
        raise InputError("slab cell vectors a and b must be non-zero")
    return (max(1, int(round(multiplier / na))), max(1, int(round(multiplier / nb))), 1)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return ".TRUE." if v else ".FALSE."
    return str(v)


def incar_text(single_point: bool = True, **overrides: Any) -> str:
    """INCAR contents with the OC20 flags (+ single-point settings); overrides win."""
    flags = dict(OC20_VASP_FLAGS)
    if single_point:
        flags.update(SINGLE_POINT_FLAGS)
    flags.update({k.upper(): v for k, v in overrides.items()})
    return "".join(f"{k} = {_fmt(v)}\n" for k, v in flags.items())


def kpoints_text(kpts: Sequence[int]) -> str:
    """A Monkhorst-Pack KPOINTS file for mesh ``kpts``."""
    return f"Automatic mesh (OC20 surface rule)\n0\nMonkhorst-Pack\n{kpts[0]} {kpts[1]} {kpts[2]}\n0 0 0\n"


def write_vasp_inputs(atoms: Atoms, directory: str | os.PathLike, single_point: bool = True, **incar: Any) -> Path:
    """Write POSCAR, INCAR and KPOINTS for ``atoms`` into ``directory``; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    a = _right_handed(atoms)
    a.calc = None
    atomic_write(d / "POSCAR", lambda tmp: write(tmp, a, format="vasp", direct=False, sort=False))
    atomic_write_text(d / "INCAR", incar_text(single_point, **incar))
    atomic_write_text(d / "KPOINTS", kpoints_text(surface_kpoints(a)))
    return d


def export_top_k(
    ranked: Mapping[str, Sequence[MLResult]],
    out_dir: str | os.PathLike,
    k: int = 5,
    vasp: bool = True,
    **incar: Any,
) -> list[Path]:
    """Write the top ``k`` (already ranked) structures per system; returns the VASP directories.

    ``ranked`` maps system_id → results in ascending ML energy (see :func:`rank_valid`);
    it is re-sorted here anyway, so the order of the input never matters.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for sid, results in ranked.items():
        top = rank_valid(results, k)
        sdir = out / str(sid)
        sdir.mkdir(parents=True, exist_ok=True)
        frames = [
            copy_with_results(r.atoms, scalar_info_only=True, info={
                "system_id": str(sid), "config_id": r.config_id, "rank": i, "ml_energy": float(r.ml_energy)})
            for i, r in enumerate(top)
        ]
        if frames:
            atomic_write(sdir / "top_k.extxyz", lambda tmp: write(tmp, frames, format="extxyz"))
        if vasp:
            for r in top:
                paths.append(write_vasp_inputs(r.atoms, sdir / r.config_id, single_point=True, **incar))
    atomic_write_text(out / "paths.txt", "".join(f"{p}\n" for p in paths))
    return paths

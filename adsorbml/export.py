"""Top-k export for DFT: VASP inputs (pymatgen.io.vasp) and extxyz of the ranked placements
(ranking: :mod:`adsorbml.ranking`).

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

POSCAR, INCAR and KPOINTS are written with :mod:`pymatgen.io.vasp` (``Poscar``, ``Incar``,
``Kpoints``), not formatted by hand.

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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write

from adsorbml.errors import InputError
from adsorbml.ranking import MLResult, rank_valid
from adsorbml.records import ml_result
from adsorbml.store import RunStore
from eqv2_calc.io import atomic_write, atomic_write_text, copy_with_results

__all__ = [
    "OC20_VASP_FLAGS",
    "SINGLE_POINT_FLAGS",
    "export_run",
    "export_top_k",
    "incar_text",
    "kpoints_text",
    "poscar_text",
    "surface_kpoints",
    "write_vasp_inputs",
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


def _incar(single_point: bool = True, **overrides: Any):
    from pymatgen.io.vasp import Incar

    flags = dict(OC20_VASP_FLAGS)
    if single_point:
        flags.update(SINGLE_POINT_FLAGS)
    flags.update({k.upper(): v for k, v in overrides.items()})
    return Incar(flags)


def incar_text(single_point: bool = True, **overrides: Any) -> str:
    """INCAR contents (:class:`pymatgen.io.vasp.Incar`) with the OC20 flags (+ single-point
    settings); overrides win."""
    return _incar(single_point, **overrides).get_str()


def _kpoints(kpts: Sequence[int]):
    from pymatgen.io.vasp import Kpoints

    k = Kpoints.monkhorst_automatic(tuple(int(x) for x in kpts))
    k.comment = "Automatic mesh (OC20 surface rule)"
    return k


def kpoints_text(kpts: Sequence[int]) -> str:
    """A Monkhorst-Pack KPOINTS file (:class:`pymatgen.io.vasp.Kpoints`) for mesh ``kpts``."""
    return str(_kpoints(kpts))


def poscar_text(atoms: Atoms) -> str:
    """POSCAR (:class:`pymatgen.io.vasp.Poscar`): Cartesian, the atom order of ``atoms`` kept
    (the species line may repeat an element), selective dynamics from FixAtoms."""
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp import Poscar

    a = atoms.copy()
    a.calc = None
    structure = AseAtomsAdaptor.get_structure(a)
    if "tags" in structure.site_properties:
        structure.remove_site_property("tags")
    return Poscar(structure, comment=a.get_chemical_formula(), sort_structure=False).get_str(direct=False)


def write_vasp_inputs(atoms: Atoms, directory: str | os.PathLike, single_point: bool = True, **incar: Any) -> Path:
    """Write POSCAR, INCAR and KPOINTS (pymatgen.io.vasp) for ``atoms`` into ``directory``; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    a = _right_handed(atoms)
    atomic_write_text(d / "POSCAR", poscar_text(a))
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


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, k: int | None = None, vasp: bool = True,
) -> list[Path]:
    """Top-k VASP inputs + extxyz of a finished (or partial) run, from its store.

    Writes to ``out`` (default ``<run_dir>/export``); ``k`` defaults to the run's k.
    With ``vasp``, each ML-relaxed clean slab is exported too, as ``<out>/<slab_id>/slab``
    (its single point is the DFT clean-slab energy of E_ads(ML+DFT); ``adsorbml import`` maps it
    back). Returns the VASP calculation directories, clean slabs first (also in ``paths.txt``;
    see :func:`adsorbml.export.export_top_k`).
    """
    store = RunStore(run_dir, create=False)
    cfg = store.config or {}
    k = int(k if k is not None else cfg.get("k", 5))
    ranked: dict[str, list[MLResult]] = {}
    for row in store.rows("ml"):
        ranked.setdefault(row.system_id, []).append(ml_result(row))
    if not ranked:
        raise InputError(f"{store.path} has no finished ML relaxations yet")
    dest = Path(out) if out is not None else store.directory / "export"
    paths = export_top_k(ranked, dest, k=k, vasp=vasp)
    if vasp:
        slabs = [write_vasp_inputs(r.toatoms(), dest / r.system_id / "slab", single_point=True)
                 for r in store.rows("slab_ml")]
        paths = slabs + paths
        atomic_write_text(dest / "paths.txt", "".join(f"{p}\n" for p in paths))
    return paths

"""Small file and structure helpers shared by every writer in the package.

* :func:`atomic_write` (and :func:`atomic_write_text`): the one way files are written — to a
  temporary file in the target's directory, flushed to disk, then renamed over the target, so
  a reader (or a rerun after ``kill -9``) sees the old file or the new one, never half of one.
  Used by ``eqv2 relax`` (structures, trajectories, IS2RE/IS2RS, run/summary JSON), ``eqv2
  predict``, checkpoint saving and training (``checkpoint.pt``, ``resume.pt``), ``eqv2
  emt-data`` and the AdsorbML outputs.
* :func:`frame_with_results` / :func:`copy_with_results`: an independent copy of an
  ``ase.Atoms`` (cell, pbc, tags, constraints, info, ... kept) carrying fixed results in a
  ``SinglePointCalculator`` (energy eV, raw forces eV/Å, optional stress), the form in which
  every structure with results is written or returned.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = [
    "atomic_write", "atomic_write_text", "frame_with_results", "copy_with_results", "scalar_info",
    "RESULT_KEYS",
]

RESULT_KEYS: tuple[str, ...] = ("energy", "free_energy", "forces", "stress")
"""Calculator results :func:`copy_with_results` carries over (when present)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], Any], *, suffix: str | None = None, fsync: bool = True
) -> Path:
    """Create or replace ``path`` atomically: call ``write(tmp)`` with a temporary file name in
    the same directory, then rename it to ``path``; returns ``path``.

    ``write`` writes the complete contents to the file name it is given (e.g.
    ``lambda tmp: ase.io.write(tmp, frames, format="extxyz")``; open it yourself, e.g.
    ``open(tmp, "wb")``, when the bytes must not depend on the file name, as with
    ``torch.save``). The temporary name is ``.<name>.<random><suffix>.tmp`` with ``suffix``
    defaulting to the target's suffix (for writers that look at it). Missing parent
    directories are created. With ``fsync`` the data are flushed to disk before the rename,
    so a crash never leaves a renamed but empty file. The file gets the usual permissions
    (``0o666`` minus the umask, not ``mkstemp``'s ``0o600``). If ``write`` raises (or the
    process is interrupted), the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(path.suffix if suffix is None else suffix) + ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` with :func:`atomic_write`; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding), fsync=fsync)


def scalar_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of an ``atoms.info`` that every ASE format stores (str, bool, int, float and
    numpy scalars); dicts, lists and arrays are left out (extxyz cannot write dicts)."""
    return {k: v for k, v in info.items() if isinstance(v, (str, bool, int, float, np.bool_, np.number))}


def frame_with_results(
    atoms: Atoms,
    energy: float,
    forces: Any = None,
    *,
    stress: Any = None,
    positions: Any = None,
    cell: Any = None,
    info: Mapping[str, Any] | None = None,
    scalar_info_only: bool = False,
    free_energy: float | None = None,
) -> Atoms:
    """A copy of ``atoms`` holding the given results in a ``SinglePointCalculator``.

    The copy keeps everything ``Atoms.copy`` keeps (cell, pbc, tags, constraints, momenta,
    info, arrays); any calculator of ``atoms`` is dropped and ``atoms`` itself is never
    changed. ``cell`` (Å, lattice vectors as rows) replaces the cell without moving the atoms,
    then ``positions`` (Å) replaces the positions without applying constraints.
    ``energy`` (eV) is stored as a float; ``forces`` (eV/Å, raw: fixed atoms keep their
    forces, ASE's ``get_forces()`` zeroes them), ``stress`` (eV/Å³, Voigt 6 or 3x3) and
    ``free_energy`` (eV) only when given, as float64 copies. With ``scalar_info_only`` the
    info keeps only :func:`scalar_info` entries; ``info`` entries are then added.
    """
    frame = atoms.copy()
    frame.calc = None
    if cell is not None:
        frame.set_cell(np.array(cell, dtype=np.float64), scale_atoms=False)
    if positions is not None:
        frame.set_positions(np.array(positions, dtype=np.float64), apply_constraint=False)
    if scalar_info_only:
        frame.info = scalar_info(frame.info)
    results: dict[str, Any] = {"energy": float(energy)}
    if free_energy is not None:
        results["free_energy"] = float(free_energy)
    if forces is not None:
        results["forces"] = np.array(forces, dtype=np.float64)
    if stress is not None:
        results["stress"] = np.array(stress, dtype=np.float64)
    frame.calc = SinglePointCalculator(frame, **results)
    if info:
        frame.info.update(info)
    return frame


def copy_with_results(
    atoms: Atoms, *, info: Mapping[str, Any] | None = None, scalar_info_only: bool = False
) -> Atoms:
    """A copy of ``atoms`` whose ``SinglePointCalculator`` holds the results its current
    calculator already has (:data:`RESULT_KEYS` present in ``atoms.calc.results``; nothing is
    computed). Without a calculator, or without an energy, the copy has no calculator. See
    :func:`frame_with_results` for ``info`` and ``scalar_info_only``."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    if "energy" not in results:
        frame = atoms.copy()
        frame.calc = None
        if scalar_info_only:
            frame.info = scalar_info(frame.info)
        frame.info.update(info or {})
        return frame
    return frame_with_results(
        atoms, results["energy"], results.get("forces"), stress=results.get("stress"),
        free_energy=results.get("free_energy"), info=info, scalar_info_only=scalar_info_only,
    )

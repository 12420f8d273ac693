"""Checks of the input of a batched relaxation, before anything is evaluated: the structure
list, the names (they become trajectory file names) and, for a cell relaxation, periodicity
and constraints. Every problem is an :class:`~eqv2_calc.errors.InputError` naming the
structure."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from ase import Atoms

from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import check_atoms
from eqv2_calc.relax.cell import CellFilter

SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
"""Names usable as trajectory file stems."""


def check_structures(atoms_list: Sequence[Atoms], cell_filter: CellFilter | None) -> None:
    """A non-empty list of valid ``ase.Atoms`` (:func:`~eqv2_calc.graph.batch.check_atoms`),
    each periodic in 3-D if ``cell_filter`` is set."""
    if isinstance(atoms_list, Atoms):
        raise InputError("relax_batch expects a list of ase.Atoms, got a single Atoms; wrap it in [ ]")
    if len(atoms_list) == 0:
        raise InputError("no structures to relax: the input list is empty")
    for i, a in enumerate(atoms_list):
        if not isinstance(a, Atoms):
            raise InputError(f"structure {i} is a {type(a).__name__}, expected ase.Atoms")
        check_atoms(a, i)
        if cell_filter is not None and not bool(np.all(a.get_pbc())):
            raise InputError(
                f"structure {i} is not periodic in all 3 directions (pbc={a.get_pbc().tolist()}): "
                f"a cell relaxation (cell_filter={cell_filter.kind!r}) needs a 3-D periodic "
                "crystal; relax such structures without cell_filter"
            )


def structure_names(names: Sequence[str] | None, count: int, *, file_names: bool) -> list[str]:
    """``names`` as unique strings, one per structure (default: zero-padded indices, at least
    6 digits); with ``file_names`` they must match :data:`SAFE_NAME`."""
    if names is None:
        width = max(6, len(str(count - 1)))
        return [f"{i:0{width}d}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise InputError(f"got {len(names)} names for {count} structures")
    if len(set(names)) != len(names):
        raise InputError("names must be unique")
    if file_names:
        bad = [n for n in names if not SAFE_NAME.match(n)]
        if bad:
            raise InputError(f"names {bad[:5]} cannot be file names; use [A-Za-z0-9._+-] only")
    return names


def check_cell_constraints(free: Sequence[np.ndarray]) -> None:
    """With a cell filter only whole atoms can be fixed: ``free`` holds the [n, 3] free masks
    of the structures (:func:`~eqv2_calc.relax.constraints.free_mask`)."""
    for i, mask in enumerate(free):
        partial = np.flatnonzero(mask.any(axis=1) & ~mask.all(axis=1))
        if len(partial):
            raise InputError(
                f"structure {i}: atoms {partial[:10].tolist()} have single fixed Cartesian components "
                "(FixCartesian / move_mask); with a cell filter only whole atoms can be fixed (FixAtoms)"
            )

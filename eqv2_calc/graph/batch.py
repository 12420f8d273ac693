"""Packed batches of atomic structures (no padding).

Shapes: N = total atoms in the batch, S = number of systems.

=============  ===========  =====================================================
field          shape        meaning
=============  ===========  =====================================================
numbers        [N] int64    atomic numbers
positions      [N, 3] f64   Cartesian positions, Å
cell           [S, 3, 3]    lattice vectors as rows, Å (float64); rows of
                            non-periodic directions may be anything
pbc            [S, 3] bool  periodicity per lattice direction
system_idx     [N] int64    system of each atom (sorted, 0..S-1)
natoms         [S] int64    atoms per system
=============  ===========  =====================================================

Geometry is kept in float64; models cast edge vectors to their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.geometry.cell import complete_cell

from eqv2_calc.errors import InputError

MIN_DISTANCE = 0.1
"""Two atoms closer than this (Å) are rejected as unphysical input."""


@dataclass
class AtomsBatch:
    """Several atomic structures packed into flat tensors (see module docstring)."""

    numbers: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    system_idx: torch.Tensor
    natoms: torch.Tensor

    @property
    def num_systems(self) -> int:
        return int(self.natoms.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def to(self, device: torch.device | str) -> "AtomsBatch":
        """Return a copy on ``device``."""
        return AtomsBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def check_atoms(atoms: Atoms, index: int | None = None) -> None:
    """Raise :class:`InputError` if ``atoms`` cannot be evaluated.

    Rejects: no atoms, non-finite positions or cell, a periodic direction with a
    zero (or degenerate) cell vector.
    """
    where = "" if index is None else f" (structure {index})"
    if len(atoms) == 0:
        raise InputError(f"empty Atoms{where}: there is nothing to evaluate")
    pos = atoms.get_positions()
    if not np.isfinite(pos).all():
        bad = np.flatnonzero(~np.isfinite(pos).all(axis=1))
        raise InputError(f"non-finite positions for atoms {bad[:10].tolist()}{where}")
    cell = np.asarray(atoms.get_cell())
    if not np.isfinite(cell).all():
        raise InputError(f"non-finite cell{where}: {cell.tolist()}")
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    lengths = np.linalg.norm(cell, axis=1)
    for k in range(3):
        if pbc[k] and lengths[k] < 1e-8:
            raise InputError(
                f"pbc is True along lattice direction {k}{where} but cell vector {k} is zero; "
                "set a cell (atoms.set_cell) or set atoms.pbc[k] = False"
            )
    if pbc.any():
        periodic = cell[pbc]
        if np.linalg.matrix_rank(periodic, tol=1e-6) < periodic.shape[0]:
            raise InputError(f"the periodic cell vectors are linearly dependent{where}: {cell.tolist()}")


def atoms_to_batch(
    atoms_list: Sequence[Atoms], device: torch.device | str = "cpu"
) -> AtomsBatch:
    """Pack ASE structures into an :class:`AtomsBatch` on ``device`` (validated, float64 geometry)."""
    if len(atoms_list) == 0:
        raise InputError("no structures given")
    for i, a in enumerate(atoms_list):
        if not isinstance(a, Atoms):
            raise InputError(f"structure {i} is a {type(a).__name__}, expected ase.Atoms")
        check_atoms(a, i if len(atoms_list) > 1 else None)
    numbers = np.concatenate([a.numbers for a in atoms_list])
    positions = np.concatenate([a.get_positions() for a in atoms_list])
    cells = np.stack(
        # zero rows (non-periodic directions without a cell) are filled so the cell is invertible
        [np.asarray(complete_cell(np.asarray(a.get_cell()))) for a in atoms_list]
    )
    pbc = np.stack([np.asarray(a.get_pbc(), dtype=bool) for a in atoms_list])
    natoms = np.array([len(a) for a in atoms_list])
    dev = torch.device(device)
    return AtomsBatch(
        numbers=torch.as_tensor(numbers, dtype=torch.long, device=dev),
        positions=torch.as_tensor(positions, dtype=torch.float64, device=dev),
        cell=torch.as_tensor(cells, dtype=torch.float64, device=dev),
        pbc=torch.as_tensor(pbc, device=dev),
        system_idx=torch.repeat_interleave(
            torch.arange(len(atoms_list), device=dev), torch.as_tensor(natoms, device=dev)
        ),
        natoms=torch.as_tensor(natoms, dtype=torch.long, device=dev),
    )

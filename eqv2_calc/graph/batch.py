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
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.geometry.cell import complete_cell

from eqv2_calc.errors import InputError

if TYPE_CHECKING:
    from typing_extensions import Self

MIN_DISTANCE = 0.1
"""Two atoms closer than this (Å) are rejected as unphysical input."""


@dataclass
class AtomsBatch:
    """Several atomic structures packed into flat tensors (see module docstring).

    The one packed-batch type of the package: the calculator evaluates it, the relaxer's
    :class:`~eqv2_calc.relax.lbfgs.LBFGSState` and the trainer's
    :class:`~eqv2_calc.train.dataset.TrainBatch` extend it with their own per-atom and
    per-system fields. A subclass lists its extra tensor fields in ``PER_ATOM_FIELDS`` /
    ``PER_SYSTEM_FIELDS`` (first dimension N / S); :meth:`select`, :meth:`concat`,
    :meth:`split` and :meth:`to` then carry them along. Fields that are not per-atom or
    per-system (shared buffers, counters) are handled by :meth:`_shared` / :meth:`_merge_shared`.
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    system_idx: torch.Tensor
    natoms: torch.Tensor

    PER_ATOM_FIELDS: ClassVar[tuple[str, ...]] = ("numbers", "positions")
    PER_SYSTEM_FIELDS: ClassVar[tuple[str, ...]] = ("cell", "pbc", "natoms")

    @property
    def num_systems(self) -> int:
        return int(self.natoms.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def atom_bounds(self) -> np.ndarray:
        """[S + 1] host array: atoms of system s are rows ``bounds[s]:bounds[s + 1]``."""
        return np.concatenate([[0], np.cumsum(self.natoms.cpu().numpy())]).astype(np.int64)

    # -- hooks for subclasses with fields that are neither per atom nor per system
    def _shared(self) -> dict[str, Any]:
        """Non-tensor fields passed unchanged to the result of :meth:`select`."""
        return {}

    @classmethod
    def _merge_shared(cls, parts: Sequence["AtomsBatch"]) -> dict[str, Any]:
        """Non-tensor fields of the result of :meth:`concat` (default: none)."""
        return {}

    def select(self, systems: Sequence[int] | np.ndarray | torch.Tensor) -> Self:
        """A new batch of the same type holding ``systems`` (indices 0..S-1, in that order)."""
        sys_np = np.asarray(torch.as_tensor(systems).cpu(), dtype=np.int64).reshape(-1)
        bounds = self.atom_bounds()
        nat = bounds[sys_np + 1] - bounds[sys_np]
        rows = (np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in sys_np])
                if len(sys_np) else np.zeros(0, dtype=np.int64))
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        sys_t = torch.as_tensor(sys_np, dtype=torch.long, device=self.device)
        out: dict[str, Any] = {f: getattr(self, f)[rows_t] for f in self.PER_ATOM_FIELDS}
        out.update({f: getattr(self, f)[sys_t] for f in self.PER_SYSTEM_FIELDS})
        out["system_idx"] = torch.as_tensor(np.repeat(np.arange(len(sys_np)), nat), dtype=torch.long,
                                            device=self.device)
        return type(self)(**out, **self._shared())

    @classmethod
    def concat(cls, parts: Sequence["AtomsBatch"]) -> Self:
        """Concatenate batches of this type; systems keep their order."""
        parts = [p for p in parts if p.num_systems > 0]
        if not parts:
            raise InputError(f"{cls.__name__}.concat needs at least one non-empty batch")
        if len(parts) == 1:
            return parts[0]  # type: ignore[return-value]
        out: dict[str, Any] = {f: torch.cat([getattr(p, f) for p in parts])
                               for f in cls.PER_ATOM_FIELDS + cls.PER_SYSTEM_FIELDS}
        offsets = np.cumsum([0] + [p.num_systems for p in parts[:-1]])
        out["system_idx"] = torch.cat([p.system_idx + int(o) for p, o in zip(parts, offsets)])
        return cls(**out, **cls._merge_shared(parts))

    def split(self) -> list[Self]:
        """One single-system batch per system, in order."""
        return [self.select([s]) for s in range(self.num_systems)]

    def to(self, device: torch.device | str) -> Self:
        """The same batch on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        fields = self.PER_ATOM_FIELDS + self.PER_SYSTEM_FIELDS + ("system_idx",)
        return type(self)(**{f: getattr(self, f).to(device) for f in fields}, **self._shared())

    def as_atoms_batch(self) -> "AtomsBatch":
        """The plain geometry of this batch (shares tensors; no copy)."""
        return AtomsBatch(numbers=self.numbers, positions=self.positions, cell=self.cell,
                          pbc=self.pbc, system_idx=self.system_idx, natoms=self.natoms)

    def to_atoms(self) -> list[Atoms]:
        """Unpack into ASE ``Atoms`` (numbers, positions Å, cell, pbc); no calculators or constraints."""
        numbers = self.numbers.cpu().numpy()
        positions = self.positions.detach().cpu().numpy()
        cells = self.cell.cpu().numpy()
        pbc = self.pbc.cpu().numpy()
        bounds = self.atom_bounds()
        return [Atoms(numbers=numbers[a:b], positions=positions[a:b], cell=cells[s], pbc=pbc[s])
                for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


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

"""The force-provider interface shared by the calculator's batch API and the relaxer.

A *potential* maps a packed :class:`~eqv2_calc.graph.AtomsBatch` to per-system energies
and per-atom forces::

    energy, forces = potential(batch)   # energy [S] float64 eV, forces [N, 3] float64 eV/Å

Forces are raw (constraints such as ASE ``FixAtoms`` are not applied). Implementations:
:class:`ASEPotential` (any ASE calculator, structure by structure) and
:class:`eqv2_calc.model.EquiformerV2Potential` (batched, on the model's device).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from eqv2_calc.graph.batch import AtomsBatch


@runtime_checkable
class Potential(Protocol):
    """Anything that evaluates energies [S] (eV) and forces [N, 3] (eV/Å) of a batch."""

    device: torch.device

    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]: ...


def batch_to_atoms(batch: AtomsBatch) -> list[Atoms]:
    """Unpack a batch into ASE Atoms (positions Å, cell, pbc); no calculators or constraints."""
    numbers = batch.numbers.cpu().numpy()
    positions = batch.positions.detach().cpu().numpy()
    cells = batch.cell.cpu().numpy()
    pbc = batch.pbc.cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum(batch.natoms.cpu().numpy())])
    return [
        Atoms(numbers=numbers[a:b], positions=positions[a:b], cell=cells[s], pbc=pbc[s])
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


class ASEPotential:
    """Wrap an ASE calculator as a :class:`Potential` (evaluates systems one by one on the CPU).

    ``calc_factory`` may be given instead of ``calc`` when a fresh calculator per call is
    needed. Energies come from ``get_potential_energy()``; forces are the unconstrained
    ``calc.get_forces`` results.
    """

    def __init__(self, calc: BaseCalculator):
        self.calc = calc
        self.device = torch.device("cpu")

    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        energies, forces = [], []
        for atoms in batch_to_atoms(batch):
            atoms.calc = self.calc
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces(apply_constraint=False))
        dev = batch.device
        return (
            torch.tensor(energies, dtype=torch.float64, device=dev),
            torch.as_tensor(np.concatenate(forces), dtype=torch.float64, device=dev),
        )

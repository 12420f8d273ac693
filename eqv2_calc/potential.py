"""The force-provider interface shared by the calculator's batch API and the relaxer.

A *potential* maps a packed :class:`~eqv2_calc.graph.AtomsBatch` to per-system energies
and per-atom forces::

    energy, forces = potential(batch)   # energy [S] float64 eV, forces [N, 3] float64 eV/Å

Forces are raw (constraints such as ASE ``FixAtoms`` are not applied). Implementations:
:class:`ASEPotential` (any ASE calculator, structure by structure) and
:class:`eqv2_calc.model.EquiformerV2Potential` (batched, on the model's device).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from eqv2_calc.errors import InputError, UnsupportedElementError
from eqv2_calc.graph.batch import AtomsBatch
from eqv2_calc.graph.neighbors import Graph, radius_graph

if TYPE_CHECKING:
    from eqv2_calc.checkpoint.load import CheckpointMeta
    from eqv2_calc.model import EquiformerV2


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


class EquiformerV2Potential:
    """A loaded EquiformerV2 as a batched :class:`Potential` on the model's device.

    Builds the radius graph of each system (the checkpoint's cutoff, max_neighbors and strict
    mode), runs the model without autograd and returns float64 energies [S] (eV) and forces
    [N, 3] (eV/Å). Atoms with no neighbour within the cutoff get the model's isolated-atom
    energy and zero force.
    """

    def __init__(self, model: "EquiformerV2", meta: "CheckpointMeta | None" = None):
        self.model = model
        self.meta = meta
        self.device = model.device

    @property
    def cutoff(self) -> float:
        return self.model.cfg.max_radius

    def check_numbers(self, numbers: torch.Tensor) -> None:
        """Raise :class:`UnsupportedElementError` for atomic numbers the model has no embedding for."""
        zmax = self.model.cfg.max_num_elements
        bad = (numbers < 1) | (numbers >= zmax)
        if bool(bad.any()):
            z = sorted(set(numbers[bad].tolist()))
            raise UnsupportedElementError(
                f"atomic numbers {z} are outside this model's range 1..{zmax - 1} (max_num_elements={zmax})"
            )

    def graph(self, batch: AtomsBatch) -> Graph:
        """The model's neighbour graph of ``batch``."""
        cfg = self.model.cfg
        return radius_graph(
            batch, cfg.max_radius, cfg.max_neighbors, cfg.enforce_max_neighbors_strictly, cfg.use_pbc
        )

    def count_edges(self, batch: AtomsBatch) -> torch.Tensor:
        """Edges per system [S] (int64), for batching under an edge budget."""
        return self.graph(batch).num_edges

    @torch.inference_mode()
    def evaluate(self, batch: AtomsBatch, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies [S] and forces [N, 3] (float64, eV and eV/Å) for a batch and its graph."""
        self.check_numbers(batch.numbers)
        energy, forces = self.model(
            batch.numbers, graph.src, graph.dst, graph.vec,
            batch.system_idx, batch.num_systems,
        )
        if forces is None:
            forces = torch.zeros_like(batch.positions)
        return energy.double(), forces.double()

    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device)
        return self.evaluate(batch, self.graph(batch))


def load_potential(
    path_or_name: "str | os.PathLike",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    use_ema: bool = False,
) -> EquiformerV2Potential:
    """Load a checkpoint (file or official name) as a batched potential; see :func:`load_model`."""
    from eqv2_calc.checkpoint import load_model

    model, meta = load_model(path_or_name, device=resolve_device(device), dtype=resolve_dtype(dtype), use_ema=use_ema)
    return EquiformerV2Potential(model, meta)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None → CUDA if available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """"float32"/"float64" (or torch dtypes) → torch dtype."""
    table = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32, "fp64": torch.float64}
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        return dtype
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")

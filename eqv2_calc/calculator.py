"""ASE calculator for EquiformerV2 checkpoints.

``EquiformerV2Calculator`` follows the ASE conventions: class-level
``implemented_properties`` (energy, free_energy = energy, forces), raw forces (ASE applies
``FixAtoms``), results cached until positions, numbers, cell or pbc change. It evaluates one
structure per call; :meth:`EquiformerV2Calculator.predict_batch` packs many structures into
batches under an atom/edge budget.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from eqv2_calc.errors import CheckpointError, InputError
from eqv2_calc.graph.batch import AtomsBatch, atoms_to_batch
from eqv2_calc.graph.neighbors import Graph
from eqv2_calc.potential import EquiformerV2Potential, load_potential

DEFAULT_MAX_ATOMS = 2000
DEFAULT_MAX_EDGES = 100_000


def default_checkpoint() -> str:
    """The model shipped with the package (see :func:`eqv2_calc.checkpoint.registry.shipped_checkpoint`)."""
    from eqv2_calc.checkpoint.registry import shipped_checkpoint

    return str(shipped_checkpoint())


class EquiformerV2Calculator(Calculator):
    """ASE calculator running an EquiformerV2 checkpoint.

    Parameters
    ----------
    checkpoint_path: a fairchem EquiformerV2 checkpoint file.
    model_name: an official name (see ``eqv2_calc.OFFICIAL_CHECKPOINTS``), downloaded to the cache.
    device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
    dtype: "float32" (like fairchem) or "float64".
    use_ema: use the checkpoint's EMA weights instead of ``state_dict``.
    trust_checkpoint: also load a file whose pickle holds objects beyond the safe allow-list
        (full unpickling can run code from the file; only for files you trust). Without it
        such a file raises :class:`~eqv2_calc.errors.CheckpointError`.
    tune_allocator: call :func:`eqv2_calc.runtime.tune_allocator` (keep freed memory in the
        process heap; 10–20 % faster calls on CPU, process-wide). Pass False to opt out.

    Results: ``energy`` / ``free_energy`` in eV (meaning: ``calc.metadata["energy_convention"]``),
    ``forces`` [N, 3] in eV/Å, unconstrained.
    """

    implemented_properties = ("energy", "free_energy", "forces")

    def __init__(
        self,
        checkpoint_path: str | os.PathLike | None = None,
        model_name: str | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        use_ema: bool = False,
        potential: EquiformerV2Potential | None = None,
        tune_allocator: bool = True,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if tune_allocator:
            from eqv2_calc.runtime import tune_allocator as _tune

            _tune()
        if potential is None:
            if checkpoint_path is not None and model_name is not None:
                raise CheckpointError("give either checkpoint_path or model_name, not both")
            source = checkpoint_path if checkpoint_path is not None else model_name
            potential = load_potential(source or default_checkpoint(), device=device, dtype=dtype, use_ema=use_ema,
                                       trust_checkpoint=trust_checkpoint)
        self.potential = potential

    @property
    def metadata(self) -> dict[str, Any]:
        """Architecture, energy convention, cutoff (Å), max_neighbors, checkpoint sha256, ..."""
        meta = self.potential.meta.to_dict() if self.potential.meta is not None else {}
        meta["device"] = str(self.potential.device)
        meta["dtype"] = str(self.potential.model.dtype).replace("torch.", "")
        return meta

    def calculate(
        self, atoms: Atoms | None = None, properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        Calculator.calculate(self, atoms, properties, system_changes)
        energy, forces = self.potential(atoms_to_batch([self.atoms], self.potential.device))
        e = float(energy[0])
        self.results = {"energy": e, "free_energy": e, "forces": forces.cpu().numpy()}

    def predict_batch(
        self,
        atoms_list: Sequence[Atoms],
        max_atoms: int = DEFAULT_MAX_ATOMS,
        max_edges: int = DEFAULT_MAX_EDGES,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Energies and forces of many structures, evaluated in packed batches.

        Structures are grouped in input order so that each model call holds at most
        ``max_atoms`` atoms and ``max_edges`` edges (a single larger structure runs alone).
        Returns one dict per structure: ``energy`` (float, eV), ``forces`` ((n, 3) array, eV/Å).
        """
        return predict_batch(self.potential, atoms_list, max_atoms, max_edges, progress)


def _chunks(natoms: np.ndarray, nedges: np.ndarray, max_atoms: int, max_edges: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) system ranges within the budgets."""
    out, start, atoms, edges = [], 0, 0, 0
    for s, (n, e) in enumerate(zip(natoms, nedges)):
        if s > start and (atoms + n > max_atoms or edges + e > max_edges):
            out.append((start, s))
            start, atoms, edges = s, 0, 0
        atoms, edges = atoms + n, edges + e
    out.append((start, len(natoms)))
    return out


def _slice(batch: AtomsBatch, graph: Graph, start: int, stop: int) -> tuple[AtomsBatch, Graph]:
    """Systems [start, stop) of a batch and of its graph, re-indexed from zero."""
    atom_off = torch.cumsum(batch.natoms, 0) - batch.natoms
    edge_off = torch.cumsum(graph.num_edges, 0) - graph.num_edges
    a0 = int(atom_off[start])
    a1 = int(atom_off[stop - 1] + batch.natoms[stop - 1])
    e0 = int(edge_off[start])
    e1 = int(edge_off[stop - 1] + graph.num_edges[stop - 1])
    sub = AtomsBatch(
        numbers=batch.numbers[a0:a1], positions=batch.positions[a0:a1], cell=batch.cell[start:stop],
        pbc=batch.pbc[start:stop], system_idx=batch.system_idx[a0:a1] - start, natoms=batch.natoms[start:stop],
    )
    g = Graph(
        src=graph.src[e0:e1] - a0, dst=graph.dst[e0:e1] - a0, vec=graph.vec[e0:e1],
        shifts=graph.shifts[e0:e1], num_edges=graph.num_edges[start:stop],
    )
    return sub, g


def predict_batch(
    potential: EquiformerV2Potential,
    atoms_list: Sequence[Atoms],
    max_atoms: int = DEFAULT_MAX_ATOMS,
    max_edges: int = DEFAULT_MAX_EDGES,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """See :meth:`EquiformerV2Calculator.predict_batch`."""
    if max_atoms < 1 or max_edges < 1:
        raise InputError(f"max_atoms and max_edges must be positive, got {max_atoms}, {max_edges}")
    if len(atoms_list) == 0:
        return []
    from tqdm.auto import tqdm

    batch = atoms_to_batch(list(atoms_list), potential.device)
    potential.check_numbers(batch.numbers)
    graph = potential.graph(batch)
    ranges = _chunks(batch.natoms.cpu().numpy(), graph.num_edges.cpu().numpy(), max_atoms, max_edges)
    results: list[dict[str, Any]] = []
    with tqdm(total=len(atoms_list), disable=not progress, desc="eqv2 predict", unit="struct") as bar:
        for start, stop in ranges:
            sub, g = _slice(batch, graph, start, stop)
            energy, forces = potential.evaluate(sub, g)
            energy, forces = energy.cpu().numpy(), forces.cpu().numpy()
            bounds = np.concatenate([[0], np.cumsum(sub.natoms.cpu().numpy())])
            for k in range(stop - start):
                results.append({"energy": float(energy[k]), "forces": forces[bounds[k] : bounds[k + 1]]})
            bar.update(stop - start)
    return results

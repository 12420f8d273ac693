"""Training data: labelled frames, precomputed radius graphs and packed training batches.

A *frame* is one labelled structure: atomic numbers, geometry, energy (eV), forces (eV/Å)
and which atoms are fixed (ASE ``FixAtoms``/``FixCartesian``, read exactly as the relaxer
reads them: :func:`eqv2_calc.relax.constraints.fixed_atoms`). Frames come from extxyz files
or ASE databases (:func:`read_frames`). Positions never change during training, so the
radius graph of every frame is built once (:class:`GraphDataset`, with
:func:`eqv2_calc.graph.radius_graph` and the model's cutoff / max-neighbour rule).

Batches are the package's packed :class:`~eqv2_calc.graph.AtomsBatch`, extended with labels
and the graph (:class:`TrainBatch`); :func:`collate` concatenates single-frame batches.
Extra fields (N atoms, E edges, S frames): ``energy`` [S] eV, ``forces`` [N, 3] eV/Å,
``free`` [N] bool (atoms with no fixed component: the force loss runs over these), ``graph``
(:class:`~eqv2_calc.graph.Graph`, E edges, indices into the batch's atoms).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms

from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import AtomsBatch, atoms_to_batch
from eqv2_calc.graph.neighbors import Graph, radius_graph
from eqv2_calc.relax.constraints import fixed_atoms


@dataclass
class Frame:
    """One labelled structure. energy in eV, forces [n, 3] in eV/Å (raw, also on fixed atoms),
    fixed [n] bool (True = at least one Cartesian component held by ``FixAtoms`` /
    ``FixCartesian``; excluded from the force loss)."""

    atoms: Atoms
    energy: float
    forces: np.ndarray
    fixed: np.ndarray


def frame_from_atoms(atoms: Atoms, where: str = "") -> Frame:
    """A :class:`Frame` from an ``Atoms`` with a calculator holding energy and forces."""
    if atoms.calc is None:
        raise InputError(f"structure {where} has no energy/forces (no calculator results attached)")
    try:
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(apply_constraint=False), dtype=np.float64)
    except Exception as exc:  # PropertyNotImplementedError, missing results, ...
        raise InputError(f"structure {where} lacks energy or forces: {exc}") from exc
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        raise InputError(f"structure {where} has non-finite energy or forces")
    if forces.shape != (len(atoms), 3):
        raise InputError(f"structure {where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    clean.info.update(atoms.info)
    return Frame(atoms=clean, energy=energy, forces=forces, fixed=fixed_atoms(atoms, index=where or None))


def read_frames(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Frame]:
    """Read labelled frames from extxyz files (``.xyz``/``.extxyz``, any ASE-readable
    trajectory) and/or ASE databases (``.db``/``.json`` via ``ase.db``). Energies must be in
    eV and forces in eV/Å; ``FixAtoms``/``FixCartesian`` constraints mark the fixed atoms
    (any other constraint is an error, as in the relaxer)."""
    import ase.db
    import ase.io

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames: list[Frame] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(f"training data file {path} does not exist")
        if path.suffix in (".db", ".json"):
            with ase.db.connect(str(path)) as db:
                images = [row.toatoms(add_additional_information=False) for row in db.select()]
        else:
            images = ase.io.read(str(path), index=":")
        if not images:
            raise InputError(f"{path} holds no structures")
        frames += [frame_from_atoms(a, f"{i} of {path}") for i, a in enumerate(images)]
    return frames


@dataclass(kw_only=True)
class TrainBatch(AtomsBatch):
    """Packed labelled frames with their graph (see the module docstring for the fields)."""

    PER_ATOM_FIELDS = AtomsBatch.PER_ATOM_FIELDS + ("forces", "free")
    PER_SYSTEM_FIELDS = AtomsBatch.PER_SYSTEM_FIELDS + ("energy",)

    energy: torch.Tensor
    forces: torch.Tensor
    free: torch.Tensor
    graph: Graph

    def _shared(self) -> dict[str, Any]:
        return {"graph": self.graph}

    @classmethod
    def _merge_shared(cls, parts: Sequence[AtomsBatch]) -> dict[str, Any]:
        return {"graph": Graph.concat([p.graph for p in parts], [p.num_atoms for p in parts])}  # type: ignore[attr-defined]

    def select(self, systems: Sequence[int] | np.ndarray | torch.Tensor) -> "TrainBatch":
        out = super().select(systems)
        out.graph = self.graph.select(np.asarray(torch.as_tensor(systems).cpu()), self.natoms)
        return out

    def to(self, device: torch.device | str) -> "TrainBatch":
        out = super().to(device)
        if out is not self:
            out.graph = Graph(**{f.name: getattr(self.graph, f.name).to(device)
                                 for f in dataclasses.fields(Graph)})
        return out

    def model_inputs(self) -> tuple:
        """Arguments of :meth:`eqv2_calc.model.EquiformerV2.forward`."""
        g = self.graph
        return (self.numbers, g.src, g.dst, g.vec, self.system_idx, self.num_systems)


class GraphDataset:
    """Frames with radius graphs built once (cutoff Å, max-neighbour rule of the model).

    ``max_num_elements``: atomic numbers must be < this (the model's embedding size).
    """

    def __init__(
        self, frames: Sequence[Frame], cutoff: float, max_neighbors: int | None, strict: bool = True,
        use_pbc: bool = True, max_num_elements: int = 90, progress: bool = False,
    ):
        from tqdm.auto import tqdm

        if len(frames) == 0:
            raise InputError("the dataset is empty")
        self.frames = list(frames)
        self.items: list[TrainBatch] = []
        for i, fr in enumerate(tqdm(self.frames, desc="graphs", disable=not progress)):
            z = fr.atoms.numbers
            if z.min() < 1 or z.max() >= max_num_elements:
                raise InputError(f"frame {i}: atomic numbers must lie in 1..{max_num_elements - 1}")
            batch = atoms_to_batch([fr.atoms])
            self.items.append(TrainBatch(
                **{f: getattr(batch, f) for f in AtomsBatch.PER_ATOM_FIELDS + AtomsBatch.PER_SYSTEM_FIELDS},
                system_idx=batch.system_idx,
                energy=torch.tensor([fr.energy], dtype=torch.float64),
                forces=torch.as_tensor(fr.forces, dtype=torch.float64),
                free=torch.as_tensor(~fr.fixed),
                graph=radius_graph(batch, cutoff, max_neighbors, strict, use_pbc),
            ))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def mean_atoms(self) -> float:
        return float(np.mean([it.num_atoms for it in self.items]))

    @property
    def mean_degree(self) -> float:
        """Mean number of incoming edges per atom."""
        return sum(int(it.graph.src.numel()) for it in self.items) / sum(it.num_atoms for it in self.items)

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> Iterator[TrainBatch]:
        """Batches of ``batch_size`` frames (the last may be smaller). With ``shuffle`` the
        order is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``:
        deterministic, independent of the global RNG."""
        for idx in epoch_order(len(self), batch_size, shuffle, seed, epoch):
            yield collate([self.items[i] for i in idx], dtype, device)


def epoch_order(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[list[int]]:
    """Frame indices of each batch of one epoch (see :meth:`GraphDataset.batches`)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(items: Sequence[TrainBatch], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> TrainBatch:
    """Pack frames into one :class:`TrainBatch` on ``device``, labels in ``dtype`` (geometry
    stays float64; the model casts edge vectors to its own dtype)."""
    batch = TrainBatch.concat(items).to(device)
    return dataclasses.replace(batch, energy=batch.energy.to(dtype), forces=batch.forces.to(dtype))


def fit_element_references(frames: Sequence[Frame], max_num_elements: int = 90) -> np.ndarray:
    """Per-element energies (eV) [max_num_elements] by least squares: E ≈ Σ_i ref[Z_i].

    Solved with ``numpy.linalg.lstsq`` on the element-count matrix (minimum-norm solution;
    elements absent from the data get 0). Collinear compositions (e.g. only one element ratio)
    are fine: the minimum-norm split is as good as any for the fit.
    """
    counts = np.zeros((len(frames), max_num_elements))
    for k, fr in enumerate(frames):
        np.add.at(counts[k], fr.atoms.numbers, 1.0)
    energies = np.array([fr.energy for fr in frames])
    present = counts.any(axis=0)
    sol, *_ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
    refs = np.zeros(max_num_elements)
    refs[present] = sol
    return refs


__all__ = [
    "Frame", "TrainBatch", "GraphDataset", "read_frames", "frame_from_atoms",
    "collate", "epoch_order", "fit_element_references",
]

"""Training data: labelled frames, precomputed radius graphs and packed training batches.

A *frame* is one labelled structure: atomic numbers, geometry, energy (eV), forces (eV/Å)
and which atoms are fixed (ASE ``FixAtoms``). Frames come from extxyz files or ASE
databases (:func:`read_frames`). Positions never change during training, so the radius graph
of every frame is built once (:class:`GraphDataset`, with :func:`eqv2_calc.graph.radius_graph`
and the model's cutoff / max-neighbour rule) and batches are packed like the rest of the
package: atoms of all frames concatenated, edge indices offset (:func:`collate`).

Shapes of a :class:`TrainBatch` (N atoms, E edges, S frames): ``numbers`` [N] int64,
``edge_src``/``edge_dst`` [E] int64, ``edge_vec`` [E, 3] Å, ``system_idx`` [N], ``natoms`` [S],
``energy`` [S] eV, ``forces`` [N, 3] eV/Å, ``free`` [N] bool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms

from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import atoms_to_batch
from eqv2_calc.graph.neighbors import radius_graph


@dataclass
class Frame:
    """One labelled structure. energy in eV, forces [n, 3] in eV/Å (raw, also on fixed atoms),
    fixed [n] bool (True = held by FixAtoms; excluded from the force loss)."""

    atoms: Atoms
    energy: float
    forces: np.ndarray
    fixed: np.ndarray


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """[n] bool: atoms held fixed by ``FixAtoms`` constraints (other constraints are ignored)."""
    mask = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.get_indices()] = True
    return mask


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
    return Frame(atoms=clean, energy=energy, forces=forces, fixed=fixed_mask(atoms))


def read_frames(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Frame]:
    """Read labelled frames from extxyz files (``.xyz``/``.extxyz``, any ASE-readable
    trajectory) and/or ASE databases (``.db``/``.json`` via ``ase.db``). Energies must be in
    eV and forces in eV/Å; ``FixAtoms`` constraints mark the fixed atoms."""
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


@dataclass
class GraphFrame:
    """A frame with its radius graph (local atom indices), as tensors."""

    numbers: torch.Tensor  # [n] int64
    edge_src: torch.Tensor  # [e] int64
    edge_dst: torch.Tensor  # [e] int64
    edge_vec: torch.Tensor  # [e, 3] float64, Å
    energy: float  # eV
    forces: torch.Tensor  # [n, 3] float64, eV/Å
    free: torch.Tensor  # [n] bool


@dataclass
class TrainBatch:
    """Packed frames (see module docstring for shapes)."""

    numbers: torch.Tensor
    edge_src: torch.Tensor
    edge_dst: torch.Tensor
    edge_vec: torch.Tensor
    system_idx: torch.Tensor
    natoms: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    free: torch.Tensor

    @property
    def num_systems(self) -> int:
        return int(self.natoms.shape[0])

    def model_inputs(self) -> tuple:
        """Arguments of :meth:`eqv2_calc.model.EquiformerV2.forward`."""
        return (self.numbers, self.edge_src, self.edge_dst, self.edge_vec, self.system_idx, self.num_systems)


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
        self.items: list[GraphFrame] = []
        for i, fr in enumerate(tqdm(self.frames, desc="graphs", disable=not progress)):
            z = fr.atoms.numbers
            if z.min() < 1 or z.max() >= max_num_elements:
                raise InputError(f"frame {i}: atomic numbers must lie in 1..{max_num_elements - 1}")
            batch = atoms_to_batch([fr.atoms])
            g = radius_graph(batch, cutoff, max_neighbors, strict, use_pbc)
            self.items.append(GraphFrame(
                numbers=batch.numbers, edge_src=g.src, edge_dst=g.dst, edge_vec=g.vec,
                energy=fr.energy, forces=torch.as_tensor(fr.forces, dtype=torch.float64),
                free=torch.as_tensor(~fr.fixed),
            ))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def mean_atoms(self) -> float:
        return float(np.mean([len(it.numbers) for it in self.items]))

    @property
    def mean_degree(self) -> float:
        """Mean number of incoming edges per atom."""
        return sum(int(it.edge_src.numel()) for it in self.items) / sum(len(it.numbers) for it in self.items)

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


def collate(items: Sequence[GraphFrame], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> TrainBatch:
    """Pack frames into one :class:`TrainBatch` (edge indices offset by the atoms before)."""
    counts = [len(it.numbers) for it in items]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dev = torch.device(device)
    return TrainBatch(
        numbers=torch.cat([it.numbers for it in items]).to(dev),
        edge_src=torch.cat([it.edge_src + int(o) for it, o in zip(items, offsets)]).to(dev),
        edge_dst=torch.cat([it.edge_dst + int(o) for it, o in zip(items, offsets)]).to(dev),
        edge_vec=torch.cat([it.edge_vec for it in items]).to(dev, dtype),
        system_idx=torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts)).to(dev),
        natoms=torch.tensor(counts, dtype=torch.long, device=dev),
        energy=torch.tensor([it.energy for it in items], dtype=dtype, device=dev),
        forces=torch.cat([it.forces for it in items]).to(dev, dtype),
        free=torch.cat([it.free for it in items]).to(dev),
    )


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
    "Frame", "GraphFrame", "TrainBatch", "GraphDataset", "read_frames", "frame_from_atoms",
    "fixed_mask", "collate", "epoch_order", "fit_element_references",
]

"""Force-provider resolution, the capacity budget of in-flight batches, and OOM detection."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import AtomsBatch, atoms_to_batch
from eqv2_calc.potential import ASEPotential, Potential

DEFAULT_MAX_ATOMS = 4096
"""Default atom budget of one batch. It bounds the optimizer memory (the L-BFGS history
costs about 4.8 kB per atom with ``memory=100``) and, for GPU models, the activation
memory; an out-of-memory error shrinks it further at run time."""


class ASECalculatorPotential:
    """An ASE calculator as a force provider that keeps one ``Atoms`` (and, for ASE's own
    in-memory calculators such as EMT, one calculator copy) per structure while it relaxes.

    Each structure is then evaluated exactly as in a sequential ASE run: calculators with
    internal state (EMT's neighbour list with skin) update incrementally instead of
    rebuilding for every call. Third-party and file-based calculators are shared, never
    copied (a copy could duplicate a model or clash on files); ``copy_calculator`` overrides
    this choice.

    The runner calls :meth:`attach` when a structure joins, :meth:`evaluate` with the keys of
    the structures in batch order, and :meth:`release` when a structure leaves. Calling the
    object like a plain :class:`~eqv2_calc.potential.Potential` falls back to
    :class:`~eqv2_calc.potential.ASEPotential` behaviour.
    """

    def __init__(self, calc: BaseCalculator, copy_calculator: bool | None = None) -> None:
        self.calc = calc
        self.device = torch.device("cpu")
        self._fallback = ASEPotential(calc)
        self._slots: dict[Hashable, Atoms] = {}
        self.copies_calculator = _cheap_to_copy(calc) if copy_calculator is None else copy_calculator

    def attach(self, key: Hashable, atoms: Atoms) -> None:
        """Start tracking ``atoms`` (a private copy without constraints) under ``key``."""
        mine = atoms.copy()
        mine.set_constraint()
        mine.calc = copy.deepcopy(self.calc) if self.copies_calculator else self.calc
        self._slots[key] = mine

    def release(self, key: Hashable) -> None:
        self._slots.pop(key, None)

    def evaluate(self, batch: AtomsBatch, keys: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies [S] (eV) and raw forces [N, 3] (eV/Å) of the attached structures ``keys``
        (in batch order) at the batch positions."""
        pos = batch.positions.detach().cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(batch.natoms.cpu().numpy())])
        energies, forces = [], []
        for key, a, b in zip(keys, bounds[:-1], bounds[1:]):
            atoms = self._slots[key]
            atoms.set_positions(pos[a:b], apply_constraint=False)
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces(apply_constraint=False))
        return (
            torch.tensor(energies, dtype=torch.float64, device=batch.device),
            torch.as_tensor(np.concatenate(forces), dtype=torch.float64, device=batch.device),
        )

    def __call__(self, batch: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fallback(batch)


def _cheap_to_copy(calc: BaseCalculator) -> bool:
    """ASE's own in-memory calculators (EMT, LennardJones, Morse, ... and subclasses of them)
    are copied per structure; file-based and third-party calculators are shared."""
    from ase.calculators.calculator import FileIOCalculator

    try:
        from ase.calculators.genericfileio import GenericFileIOCalculator
    except ImportError:  # pragma: no cover - old ASE
        GenericFileIOCalculator = FileIOCalculator  # type: ignore[misc,assignment]
    if isinstance(calc, (FileIOCalculator, GenericFileIOCalculator)):
        return False
    base_modules = ("ase.calculators.calculator", "ase.calculators.abc", "ase.calculators.genericfileio")
    for cls in type(calc).__mro__:
        if cls.__module__.startswith("ase.calculators."):
            # the first ASE class in the hierarchy: a concrete ASE calculator, or just a base class?
            return cls.__module__ not in base_modules
    return False


def resolve_potential(obj: Any) -> Potential:
    """Turn what the user passed into a :class:`~eqv2_calc.potential.Potential`.

    Accepted, in this order: an object with a ``potential`` attribute that is a Potential
    (e.g. ``EquiformerV2Calculator``); any ASE calculator (wrapped in
    :class:`ASECalculatorPotential`, evaluated structure by structure); a
    Potential (callable ``batch -> (energy [S] eV, forces [N, 3] eV/Å)`` with ``device``).
    """
    inner = getattr(obj, "potential", None)
    if inner is not None and isinstance(inner, Potential) and not isinstance(inner, BaseCalculator):
        return inner
    if isinstance(obj, BaseCalculator):
        return ASECalculatorPotential(obj)
    if isinstance(obj, Potential):
        return obj
    raise InputError(
        f"cannot use a {type(obj).__name__} as force provider: pass an ASE calculator, an "
        "EquiformerV2Calculator, or a Potential (callable batch -> (energy [S], forces [N, 3]) "
        "with a `device` attribute)"
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (incl. the CUDA one), ``MemoryError`` and a
    ``RuntimeError`` whose message contains 'out of memory'."""
    oom_types: tuple[type, ...] = (MemoryError,)
    for name in ("OutOfMemoryError",):
        for mod in (torch, getattr(torch, "cuda", None)):
            t = getattr(mod, name, None) if mod is not None else None
            if isinstance(t, type):
                oom_types += (t,)
    if isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class Budget:
    """Capacity of one potential call: at most ``max_atoms`` atoms and (if the potential
    can count edges) at most ``max_edges`` edges. ``None`` means unlimited."""

    max_atoms: int | None = DEFAULT_MAX_ATOMS
    max_edges: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_atoms", "max_edges"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{name}={v!r} must be a positive integer or None")

    def fits(self, atoms: int, edges: int) -> bool:
        """Would a batch of ``atoms`` atoms and ``edges`` edges fit?"""
        if self.max_atoms is not None and atoms > self.max_atoms:
            return False
        if self.max_edges is not None and edges > self.max_edges:
            return False
        return True

    def shrink(self, atoms: int, edges: int, floor_atoms: int, floor_edges: int) -> None:
        """Halve the budget relative to a batch (``atoms``/``edges``) that ran out of memory,
        but never below the largest single system (``floor_*``)."""
        self.max_atoms = max(floor_atoms, atoms // 2)
        if edges > 0:
            self.max_edges = max(floor_edges, edges // 2)


def edge_counter(potential: Potential, device: torch.device) -> Callable[[Atoms], int] | None:
    """Return ``atoms -> number of edges`` if the potential has ``count_edges``, else None."""
    count = getattr(potential, "count_edges", None)
    if count is None or not callable(count):
        return None

    def edges_of(atoms: Atoms) -> int:
        batch: AtomsBatch = atoms_to_batch([atoms], device)
        return int(torch.as_tensor(count(batch)).sum())

    return edges_of

"""Result types of a batched relaxation: :class:`RelaxResult` (one per structure),
:class:`RelaxStats` (counters of one run) and the ``REASON_*`` strings of
:attr:`RelaxResult.reason`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

REASON_CONVERGED = "converged"
REASON_MAX_STEPS = "max_steps"
REASON_NON_FINITE = "non_finite"
REASON_EXPLODED = "force_explosion"
REASON_OOM = "out_of_memory"
REASON_INVALID = "invalid_geometry"
REASON_UNSUPPORTED_ELEMENT = "unsupported_element"


@dataclass
class RelaxResult:
    """Outcome of relaxing one structure.

    Attributes
    ----------
    index:
        Position of the structure in the input list.
    name:
        Identifier (file stem of its trajectory).
    atoms:
        Final structure: a copy of the input (constraints, tags, info kept) at the final
        positions (Å) and, for a cell relaxation, the final cell, with a SinglePointCalculator
        holding the energy (eV), the raw, unconstrained forces (eV/Å) and, for a cell
        relaxation, the stress (eV/Å³) evaluated there.
    energy:
        Final potential energy, eV (NaN if the potential returned NaN); without the ``pV``
        term of a cell relaxation under ``scalar_pressure``.
    fmax:
        Largest free-atom force norm at the final positions, eV/Å. For a cell relaxation
        ASE's ``FrechetCellFilter`` measure: the largest row norm over the generalized atom
        forces (``Fᵀ f_i``) and the cell forces (see :mod:`eqv2_calc.relax.cell`).
    nsteps:
        L-BFGS steps taken (ASE ``opt.nsteps``); the potential was called ``nsteps + 1``
        times for this structure.
    converged:
        ``fmax < fmax_threshold`` at the final positions.
    failed:
        The relaxation was stopped because of non-finite or exploding forces, a geometry
        the potential rejects (atoms closer than it allows), an element the potential
        has no parameters for, or an out-of-memory error that persisted with the
        structure alone in the batch.
    reason:
        ``"converged"``, ``"max_steps"``, ``"non_finite"``, ``"force_explosion"``,
        ``"invalid_geometry: <the potential's message>"``,
        ``"unsupported_element: <the potential's message>"`` or ``"out_of_memory"``.
    initial_energy:
        Energy at the input positions, eV.
    trajectory:
        Initial frame, every ``save_every``-th frame, and the final frame (which equals
        ``atoms``).
    stress:
        Cell relaxation only: the potential's stress at the final geometry, [3, 3] eV/Å³
        (ASE sign convention, ``atoms.get_stress(voigt=False)``); None otherwise.
    """

    index: int
    name: str
    atoms: Atoms
    energy: float
    fmax: float
    nsteps: int
    converged: bool
    failed: bool
    reason: str
    initial_energy: float
    trajectory: list[Atoms] = field(default_factory=list, repr=False)
    stress: np.ndarray | None = None

    @property
    def cell(self) -> np.ndarray:
        """Final cell, [3, 3] Å (lattice vectors as rows)."""
        return np.array(self.atoms.get_cell())

    @property
    def force_calls(self) -> int:
        """Potential evaluations spent on this structure (``nsteps + 1``, as in ASE)."""
        return self.nsteps + 1


@dataclass
class RelaxStats:
    """Counters of one :meth:`~eqv2_calc.relax.engine.BatchRelaxer.run`.

    ``utilization`` = useful system-evaluations / all system-evaluations (evaluations lost to
    out-of-memory retries are not useful). ``occupancy`` = mean atoms per potential call /
    initial atom budget.
    """

    n_systems: int = 0
    potential_calls: int = 0
    system_evaluations: int = 0
    useful_evaluations: int = 0
    atoms_evaluated: int = 0
    max_atoms: int | None = None
    oom_events: int = 0
    wall_time: float = 0.0
    converged: int = 0
    failed: int = 0

    @property
    def utilization(self) -> float:
        """Useful system-evaluations / all system-evaluations (1.0 before any evaluation)."""
        return self.useful_evaluations / self.system_evaluations if self.system_evaluations else 1.0

    @property
    def occupancy(self) -> float:
        """Mean atoms per potential call / initial atom budget (NaN without calls or budget)."""
        if not self.potential_calls or not self.max_atoms:
            return math.nan
        return self.atoms_evaluated / (self.potential_calls * self.max_atoms)

    @property
    def force_calls_per_second(self) -> float:
        """Useful system-evaluations per second of wall time (NaN before the run ends)."""
        return self.useful_evaluations / self.wall_time if self.wall_time > 0 else math.nan


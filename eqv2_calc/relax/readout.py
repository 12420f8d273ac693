"""Reading systems out of a relaxation state onto the host: per-system status flags after an
evaluation, and frames (``ase.Atoms`` with a SinglePointCalculator) of the evaluated
geometries. Used by the engine (:mod:`eqv2_calc.relax.engine`) when systems finish or a
trajectory frame is due; nothing here changes the state."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from eqv2_calc.relax.cell import CellLBFGSState, cell_system_fmax
from eqv2_calc.relax.io import make_frame
from eqv2_calc.relax.lbfgs import LBFGSState, segment_max, system_fmax


@dataclass
class SystemStatus:
    """Host copies of the per-system checks after an evaluation, each [S].

    ``non_finite``: NaN/inf energy, forces or (cell relaxation) stress; ``exploded``: finite
    but ``fmax > max_force``; ``converged``: neither, and ``fmax`` below the threshold
    (strict); ``fmax``: ASE's convergence measure (eV/Å; see
    :func:`~eqv2_calc.relax.lbfgs.system_fmax` and :func:`~eqv2_calc.relax.cell.cell_system_fmax`).
    """

    non_finite: np.ndarray
    exploded: np.ndarray
    converged: np.ndarray
    fmax: np.ndarray


def system_status(state: LBFGSState, fmax: float, max_force: float) -> SystemStatus:
    """Check every system of ``state`` (evaluated at its current geometry) with one host sync."""
    is_cell = isinstance(state, CellLBFGSState)
    measure = cell_system_fmax(state) if is_cell else system_fmax(state)
    bad_atom = (~torch.isfinite(state.forces)).any(dim=1).to(torch.float64)
    non_finite = (segment_max(bad_atom, state.system_idx, state.num_systems) > 0) | ~torch.isfinite(state.energy)
    non_finite = non_finite | ~torch.isfinite(measure)  # e.g. a degenerate cell: NaN from the cell maths
    if is_cell:
        non_finite = non_finite | ~torch.isfinite(state.stress).flatten(1).all(dim=1)
    exploded = ~non_finite & (measure > max_force)
    converged = ~non_finite & ~exploded & (measure < fmax)
    # one host sync per iteration: [4, S] flags/values
    host = torch.stack([non_finite.to(torch.float64), exploded.to(torch.float64),
                        converged.to(torch.float64), measure]).cpu().numpy()
    return SystemStatus(non_finite=host[0] > 0, exploded=host[1] > 0, converged=host[2] > 0, fmax=host[3])


class HostSnapshot:
    """Host copies of the evaluated geometry and results of every system of a state:
    ``positions``/``forces`` [N, 3], ``energy`` [S], ``bounds`` [S + 1] (atom ranges) and, for
    a cell relaxation, ``cells`` and ``stresses`` [S, 3, 3] (None otherwise)."""

    def __init__(self, state: LBFGSState) -> None:
        self.is_cell = isinstance(state, CellLBFGSState)
        self.cells = state.cell.detach().cpu().numpy() if self.is_cell else None
        self.stresses = state.stress.detach().cpu().numpy() if self.is_cell else None
        self.positions = state.positions.detach().cpu().numpy()
        self.forces = state.forces.detach().cpu().numpy()
        self.energy = state.energy.detach().cpu().numpy()
        self.bounds = np.concatenate([[0], np.cumsum(state.natoms.cpu().numpy())])

    def atom_range(self, j: int) -> tuple[int, int]:
        """First and one-past-last atom of system ``j``."""
        return int(self.bounds[j]), int(self.bounds[j + 1])

    def stress(self, j: int) -> np.ndarray | None:
        """A copy of the stress of system ``j`` [3, 3] eV/Å³ (None without a cell filter)."""
        return None if self.stresses is None else self.stresses[j].copy()

    def frame(self, j: int, template: Atoms) -> Atoms:
        """System ``j`` as a copy of ``template`` with its geometry and results."""
        a, b = self.atom_range(j)
        if self.is_cell:
            assert self.cells is not None and self.stresses is not None
            return make_frame(template, self.positions[a:b], self.energy[j], self.forces[a:b],
                              cell=self.cells[j], stress=self.stresses[j])
        return make_frame(template, self.positions[a:b], self.energy[j], self.forces[a:b])


@dataclass
class LastEvaluation:
    """The last evaluated frame of a system that cannot be evaluated again (see
    :func:`last_evaluation`): ``frame``, its ``fmax`` (eV/Å), the steps ``nsteps`` that led
    to it, whether it is already in the trajectory (``saved``) and the ``stress`` (cell
    relaxation; else None)."""

    frame: Atoms
    fmax: float
    nsteps: int
    saved: bool
    stress: np.ndarray | None


def last_evaluation(state: LBFGSState, template: Atoms, free: np.ndarray, nsteps: int,
                    save_every: int) -> LastEvaluation:
    """The last evaluated frame of a one-system ``state`` whose positions were stepped (``nsteps``
    steps taken) but not evaluated yet: its last evaluation (energy, raw forces) belongs to
    ``state.r0``. ``free`` is the structure's [n, 3] free mask. A system never evaluated
    (``nsteps == 0``) gives the input geometry with NaN results."""
    if nsteps > 0 and isinstance(state, CellLBFGSState):
        pos, cell = state.last_evaluated()
        stress = state.stress[0].detach().cpu().numpy()
        frame = make_frame(template, pos, float(state.energy[0]), state.forces.detach().cpu().numpy(),
                           cell=cell[0], stress=stress)
        # the generalized forces of that evaluation are the ones the step stored
        fmax = float(torch.linalg.vector_norm(
            torch.cat([state.f0, state.cell_forces0.reshape(-1, 3)]), dim=1).max())
        saved = bool(nsteps == 1 or (save_every and (nsteps - 1) % save_every == 0))
        return LastEvaluation(frame, fmax, nsteps - 1, saved, stress)
    if nsteps > 0:
        forces = state.forces.detach().cpu().numpy()
        frame = make_frame(template, state.r0.detach().cpu().numpy(), float(state.energy[0]), forces)
        fmax = float(np.linalg.norm(np.where(free, forces, 0.0), axis=1).max())
        saved = bool(nsteps == 1 or (save_every and (nsteps - 1) % save_every == 0))
        return LastEvaluation(frame, fmax, nsteps - 1, saved, None)
    n = len(template)
    frame = make_frame(template, template.get_positions(), math.nan, np.full((n, 3), math.nan))
    return LastEvaluation(frame, math.nan, 0, False, None)

"""In-flight batched relaxation: :func:`relax_batch` and :class:`BatchRelaxer`.

Each iteration of the runner

1. refills the batch from the queue (in order, while the capacity budget allows);
2. evaluates the potential once on all systems in the batch (new systems at their initial
   positions, the others at the positions of their last step);
3. checks every system, exactly as ``ase.optimize.Optimizer.irun`` does after an
   evaluation: converged if ``fmax < fmax`` (strict, free atoms only), else stopped if it
   already took ``steps`` steps; a system with non-finite energy/forces or with a free-atom
   force above ``max_force`` is stopped and flagged ``failed``;
4. removes finished systems at once (their result is final: written, reported) and takes one
   L-BFGS step for all the others.

So no potential evaluation is ever spent on a finished system: utilization (useful
system-evaluations / system-evaluations) is 1 unless out-of-memory errors forced retries.
Per system the sequence of evaluations is exactly ASE's: ``nsteps + 1`` force calls.

An out-of-memory error from the potential halves the atom (and edge) budget, moves the most
recently added systems back to the front of the queue *with their optimizer state*, and
retries; a single system that does not fit alone is flagged failed.

With ``cell_filter="frechet"`` (:mod:`eqv2_calc.relax.cell`) every system relaxes its
positions and its cell together in ASE ``FrechetCellFilter`` coordinates: the potential is
asked for the stress as well, the state is a :class:`~eqv2_calc.relax.cell.CellLBFGSState`,
and convergence is ASE's test on the generalized forces (atoms and cell rows); everything
else (refill, failures, outputs) is the same.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from eqv2_calc.batching import DEFAULT_MAX_ATOMS, Budget, is_out_of_memory
from eqv2_calc.errors import InputError, UnsupportedElementError
from eqv2_calc.graph.batch import AtomsBatch, atoms_to_batch, check_atoms
from eqv2_calc.potential import resolve_potential
from eqv2_calc.relax.cell import (
    CELL_FILTER_OPTIONS,
    CellFilter,
    CellLBFGSState,
    cell_init,
    cell_lbfgs_step,
    cell_set_results,
    cell_system_fmax,
)
from eqv2_calc.relax.constraints import free_mask
from eqv2_calc.relax.io import make_frame, write_trajectory
from eqv2_calc.relax.lbfgs import (
    HistoryBuffer,
    LBFGSParams,
    LBFGSState,
    lbfgs_init,
    lbfgs_set_results,
    lbfgs_step,
    segment_max,
    system_fmax,
)

DEFAULT_MAX_FORCE = 1.0e3
"""Free-atom force (eV/Å) above which a system counts as exploded and is flagged failed."""

OPTIMIZER_OPTIONS: tuple[str, ...] = ("maxstep", "memory", "damping", "alpha", "curvature_guard")
"""Keyword arguments of :func:`relax_batch` that configure L-BFGS (see :class:`LBFGSParams`)."""

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
    """Counters of one :meth:`BatchRelaxer.run`.

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
        return self.useful_evaluations / self.system_evaluations if self.system_evaluations else 1.0

    @property
    def occupancy(self) -> float:
        if not self.potential_calls or not self.max_atoms:
            return math.nan
        return self.atoms_evaluated / (self.potential_calls * self.max_atoms)

    @property
    def force_calls_per_second(self) -> float:
        return self.useful_evaluations / self.wall_time if self.wall_time > 0 else math.nan


@dataclass
class _Track:
    """Host-side bookkeeping of one structure while it waits or relaxes."""

    index: int
    natoms: int
    edges: int = 0
    nsteps: int = 0
    initial_energy: float = math.nan
    frames: list[Atoms] = field(default_factory=list)
    suspended: LBFGSState | None = None  # optimizer state while evicted after an OOM


_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


class BatchRelaxer:
    """Relax many structures with batched L-BFGS and in-flight refill.

    Parameters
    ----------
    potential:
        A :class:`~eqv2_calc.potential.Potential`, an ASE calculator, or an object with a
        ``potential`` attribute (e.g. ``EquiformerV2Calculator``); see
        :func:`~eqv2_calc.potential.resolve_potential`.
    fmax:
        Convergence threshold on the largest free-atom force norm, eV/Å (strict ``<``).
    steps:
        Maximum number of L-BFGS steps per structure (ASE ``run(steps=...)``).
    params:
        L-BFGS hyper-parameters (:class:`LBFGSParams`).
    max_atoms, max_edges:
        Capacity of one potential call (atoms; edges if the potential ``counts_edges``).
        ``max_atoms=None`` uses :data:`~eqv2_calc.batching.DEFAULT_MAX_ATOMS`. A structure
        larger than the budget runs alone.
    fix_tag0:
        Also fix atoms with tag 0 (OC20 subsurface atoms).
    max_force:
        Free-atom force norm (eV/Å) above which a structure is stopped as failed.
    save_every:
        Also keep every ``save_every``-th frame in the trajectory (0 = initial and final only).
    trajectory_dir:
        If set, write ``<trajectory_dir>/<name>.traj`` for every structure when it finishes.
    sort_by_size:
        Queue large structures first (fewer half-empty batches at the end); results are
        returned in input order either way.
    progress:
        Show a tqdm bar (structures done / total, force calls per second).
    on_result:
        Called with each :class:`RelaxResult` as soon as its structure finishes.
    cell_filter:
        None (default): positions only, cells fixed. ``"frechet"`` or a
        :class:`~eqv2_calc.relax.cell.CellFilter`: positions and cell of every structure relax
        together (ASE ``FrechetCellFilter`` semantics); needs a potential that
        ``provides_stress`` and structures periodic in all three directions.
    """

    def __init__(
        self,
        potential: Any,
        *,
        fmax: float = 0.05,
        steps: int = 300,
        params: LBFGSParams | None = None,
        max_atoms: int | None = None,
        max_edges: int | None = None,
        fix_tag0: bool = False,
        max_force: float = DEFAULT_MAX_FORCE,
        save_every: int = 0,
        trajectory_dir: str | os.PathLike | None = None,
        sort_by_size: bool = True,
        progress: bool = True,
        on_result: Callable[[RelaxResult], None] | None = None,
        cell_filter: CellFilter | str | None = None,
    ) -> None:
        if not (isinstance(fmax, (int, float)) and fmax >= 0):
            raise InputError(f"fmax={fmax!r} eV/Å must be a number >= 0")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise InputError(f"steps={steps!r} must be an integer >= 0")
        if not isinstance(save_every, int) or save_every < 0:
            raise InputError(f"save_every={save_every!r} must be an integer >= 0 (0 = off)")
        if not max_force > 0:
            raise InputError(f"max_force={max_force!r} eV/Å must be > 0")
        self.potential = resolve_potential(potential)
        self.device = torch.device(self.potential.device)
        self.fmax = float(fmax)
        self.steps = steps
        self.params = params or LBFGSParams()
        self.budget = Budget(DEFAULT_MAX_ATOMS if max_atoms is None else max_atoms, max_edges)
        self.fix_tag0 = fix_tag0
        self.max_force = float(max_force)
        self.save_every = save_every
        self.trajectory_dir = None if trajectory_dir is None else Path(trajectory_dir)
        self.sort_by_size = sort_by_size
        self.progress = progress
        self.on_result = on_result
        # edges are counted only when an edge budget is set (it costs a neighbour list each)
        self._count_edges = max_edges is not None
        if self._count_edges and not self.potential.counts_edges:
            raise InputError(
                f"max_edges={max_edges} needs a potential that can count edges (e.g. EquiformerV2); "
                f"{type(self.potential).__name__} cannot: use max_atoms"
            )
        if isinstance(cell_filter, str):
            cell_filter = CellFilter(kind=cell_filter)  # type: ignore[arg-type]
        elif cell_filter is not None and not isinstance(cell_filter, CellFilter):
            raise InputError(f"cell_filter must be None, 'frechet' or a CellFilter, got {type(cell_filter).__name__}")
        self.cell_filter: CellFilter | None = cell_filter
        if cell_filter is not None:
            self.potential.require_stress(f"cell relaxation (cell_filter={cell_filter.kind!r})")
        self.stats = RelaxStats()

    # ------------------------------------------------------------------ input
    def _validate(self, atoms_list: Sequence[Atoms], names: Sequence[str] | None) -> list[str]:
        if isinstance(atoms_list, Atoms):
            raise InputError("relax_batch expects a list of ase.Atoms, got a single Atoms; wrap it in [ ]")
        if len(atoms_list) == 0:
            raise InputError("no structures to relax: the input list is empty")
        for i, a in enumerate(atoms_list):
            if not isinstance(a, Atoms):
                raise InputError(f"structure {i} is a {type(a).__name__}, expected ase.Atoms")
            check_atoms(a, i)
            if self.cell_filter is not None and not bool(np.all(a.get_pbc())):
                raise InputError(
                    f"structure {i} is not periodic in all 3 directions (pbc={a.get_pbc().tolist()}): "
                    f"a cell relaxation (cell_filter={self.cell_filter.kind!r}) needs a 3-D periodic "
                    "crystal; relax such structures without cell_filter"
                )
        if names is None:
            width = max(6, len(str(len(atoms_list) - 1)))
            return [f"{i:0{width}d}" for i in range(len(atoms_list))]
        names = [str(n) for n in names]
        if len(names) != len(atoms_list):
            raise InputError(f"got {len(names)} names for {len(atoms_list)} structures")
        if len(set(names)) != len(names):
            raise InputError("names must be unique")
        if self.trajectory_dir is not None:
            bad = [n for n in names if not _SAFE_NAME.match(n)]
            if bad:
                raise InputError(f"names {bad[:5]} cannot be file names; use [A-Za-z0-9._+-] only")
        return names

    def _fresh_state(self, tracks: list[_Track]) -> LBFGSState:
        batch = atoms_to_batch([self._atoms[t.index] for t in tracks], self.device)
        free = torch.as_tensor(np.concatenate([self._free[t.index] for t in tracks]))
        if self.cell_filter is not None:
            return cell_init(
                batch.positions, batch.numbers, batch.natoms, batch.cell, batch.pbc, free,
                history=self._history, exp_cell_factor=self.cell_filter.exp_cell_factor,
            )
        return lbfgs_init(
            batch.positions, batch.numbers, batch.natoms, batch.cell, batch.pbc, free,
            history=self._history,
        )

    # ------------------------------------------------------------------ run
    def run(self, atoms_list: Sequence[Atoms], names: Sequence[str] | None = None) -> list[RelaxResult]:
        """Relax ``atoms_list``; return one :class:`RelaxResult` per structure, in input order."""
        names = self._validate(atoms_list, names)
        self._atoms = list(atoms_list)
        self._names = names
        self._free = [free_mask(a, fix_tag0=self.fix_tag0, index=i) for i, a in enumerate(self._atoms)]
        if self.cell_filter is not None:
            for i, free in enumerate(self._free):
                partial = np.flatnonzero(free.any(axis=1) & ~free.all(axis=1))
                if len(partial):
                    raise InputError(
                        f"structure {i}: atoms {partial[:10].tolist()} have single fixed Cartesian components "
                        "(FixCartesian / move_mask); with a cell filter only whole atoms can be fixed (FixAtoms)"
                    )
        self._history = HistoryBuffer(
            max(1, min(self.params.memory, self.steps)),
            min(sum(len(a) for a in self._atoms), self.budget.max_atoms or 1 << 62),
            self.device,
        )
        self.stats = RelaxStats(n_systems=len(self._atoms), max_atoms=self.budget.max_atoms)
        order = range(len(self._atoms))
        if self.sort_by_size:
            order = sorted(order, key=lambda i: -len(self._atoms[i]))
        self._queue: deque[_Track] = deque(_Track(index=i, natoms=len(self._atoms[i])) for i in order)
        self._active: list[_Track] = []
        self._state: LBFGSState | None = None
        self._results: list[RelaxResult | None] = [None] * len(self._atoms)
        self._invalid: dict[int, str] = {}

        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        with tqdm(total=len(self._atoms), desc="relax", unit="sys", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            while True:
                self._refill()
                if not self._active:
                    break
                if not self._evaluate():
                    continue  # out of memory: budget shrunk, retry
                n_done = self._check_and_retire()
                if self._active:
                    self._step()
                bar.update(n_done)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(calls_per_s=f"{self.stats.useful_evaluations / max(elapsed, 1e-9):.1f}",
                                batch=len(self._active), refresh=False)
        self.stats.wall_time = time.perf_counter() - t0
        results = self._results
        assert all(r is not None for r in results)  # every structure is retired exactly once
        return results  # type: ignore[return-value]

    def _edges(self, track: _Track) -> int:
        if self._count_edges and track.edges == 0 and track.suspended is None:
            batch = atoms_to_batch([self._atoms[track.index]], self.device)
            track.edges = int(self.potential.count_edges(batch).sum())
        return track.edges

    def _refill(self) -> None:
        atoms = sum(t.natoms for t in self._active)
        edges = sum(t.edges for t in self._active)
        new: list[_Track] = []
        while self._queue:
            t = self._queue[0]
            e = self._edges(t)
            if not self.budget.fits(atoms + t.natoms, edges + e) and (self._active or new):
                break  # in order: the head waits for room (no starvation of large structures)
            self._queue.popleft()
            new.append(t)
            atoms += t.natoms
            edges += e
        if not new:
            return
        parts = [] if self._state is None else [self._state]
        # keep the state order equal to the order of self._active + new
        i = 0
        while i < len(new):
            if new[i].suspended is not None:
                parts.append(new[i].suspended)
                new[i].suspended = None
                i += 1
            else:
                j = i
                while j < len(new) and new[j].suspended is None:
                    j += 1
                parts.append(self._fresh_state(new[i:j]))
                i = j
        self._state = type(parts[0]).concat(parts)
        self._active.extend(new)
        for t in new:
            if t.nsteps == 0:  # joins for the first time (not back from an out-of-memory eviction)
                self.potential.attach(t.index, self._atoms[t.index])

    def _evaluate(self) -> bool:
        state = self._state
        assert state is not None
        batch = state.as_atoms_batch()
        keys = [t.index for t in self._active]
        n_sys, n_atoms = state.num_systems, state.num_atoms
        stress = None
        try:
            if self.cell_filter is not None:
                energy, forces, stress = self.potential(batch, keys, stress=True)
            else:
                energy, forces = self.potential(batch, keys)
        except InputError:
            # a structure the potential rejects (e.g. atoms collapsed to < 0.1 Å, an element
            # it has no parameters for): find it by evaluating one system at a time, so that
            # only it fails
            energy, forces, stress = self._evaluate_one_by_one(batch, keys)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            self.stats.oom_events += 1
            self.stats.system_evaluations += n_sys
            self._handle_oom()
            return False
        if isinstance(state, CellLBFGSState):
            assert self.cell_filter is not None and stress is not None
            cell_set_results(state, torch.as_tensor(energy), torch.as_tensor(forces), torch.as_tensor(stress),
                             self.cell_filter)
        else:
            lbfgs_set_results(state, torch.as_tensor(energy), torch.as_tensor(forces))
        self.stats.potential_calls += 1
        self.stats.system_evaluations += n_sys
        self.stats.useful_evaluations += n_sys
        self.stats.atoms_evaluated += n_atoms
        return True

    def _evaluate_one_by_one(
        self, batch: AtomsBatch, keys: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Evaluate each system alone; those the potential rejects get NaN results and an
        entry in ``self._invalid`` (the failure reason with the potential's message). The
        stress is None unless this is a cell relaxation."""
        with_stress = self.cell_filter is not None
        energies, forces, stresses = [], [], []
        for key, sub in zip(keys, batch.split()):
            try:
                if with_stress:
                    e, f, st = self.potential(sub, [key], stress=True)
                else:
                    e, f = self.potential(sub, [key])
            except InputError as exc:
                kind = REASON_UNSUPPORTED_ELEMENT if isinstance(exc, UnsupportedElementError) else REASON_INVALID
                self._invalid[key] = f"{kind}: {exc}"
                e = torch.full((1,), math.nan, dtype=torch.float64, device=batch.device)
                f = torch.full((sub.num_atoms, 3), math.nan, dtype=torch.float64, device=batch.device)
                st = torch.full((1, 3, 3), math.nan, dtype=torch.float64, device=batch.device)
            energies.append(torch.as_tensor(e, dtype=torch.float64))
            forces.append(torch.as_tensor(f, dtype=torch.float64))
            if with_stress:
                stresses.append(torch.as_tensor(st, dtype=torch.float64))
        return torch.cat(energies), torch.cat(forces), (torch.cat(stresses) if with_stress else None)

    def _handle_oom(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        active, state = self._active, self._state
        assert state is not None
        if len(active) == 1:
            self._retire_oom(active[0], state)
            rows = state.history_rows() if isinstance(state, CellLBFGSState) else state.rows
            self._history.release(rows.cpu().numpy())
            self._active, self._state = [], None
            return
        atoms = sum(t.natoms for t in active)
        edges = sum(t.edges for t in active)
        self.budget.shrink(atoms, edges, max(t.natoms for t in active), max(t.edges for t in active))
        keep = len(active)
        while keep > 1 and not self.budget.fits(sum(t.natoms for t in active[:keep]),
                                                sum(t.edges for t in active[:keep])):
            keep -= 1
        if keep == len(active):  # the budget already allowed this batch: drop the newest anyway
            keep -= 1
        for j in range(len(active) - 1, keep - 1, -1):  # newest first -> queue front keeps order
            t = active[j]
            t.suspended = state.select([j])
            self._queue.appendleft(t)
        self._state = state.select(list(range(keep)))
        self._active = active[:keep]

    def _retire_oom(self, track: _Track, state: LBFGSState) -> None:
        """A structure ran out of memory alone: report its last evaluated frame as failed.

        ``state`` holds one system whose positions were stepped but not evaluated yet; its
        last evaluation (energy, raw forces) belongs to ``state.r0``.
        """
        template = self._atoms[track.index]
        stress = None
        if track.nsteps > 0 and isinstance(state, CellLBFGSState):
            pos, cell = state.last_evaluated()
            stress = state.stress[0].detach().cpu().numpy()
            frame = make_frame(template, pos, float(state.energy[0]), state.forces.detach().cpu().numpy(),
                               cell=cell[0], stress=stress)
            # the generalized forces of that evaluation are the ones the step stored
            fmax = float(torch.linalg.vector_norm(
                torch.cat([state.f0, state.cell_forces0.reshape(-1, 3)]), dim=1).max())
            nsteps, saved = track.nsteps - 1, bool(
                track.nsteps == 1 or (self.save_every and (track.nsteps - 1) % self.save_every == 0))
        elif track.nsteps > 0:
            forces = state.forces.detach().cpu().numpy()
            frame = make_frame(template, state.r0.detach().cpu().numpy(),
                               float(state.energy[0]), forces)
            fmax = float(np.linalg.norm(np.where(self._free[track.index], forces, 0.0), axis=1).max())
            nsteps, saved = track.nsteps - 1, bool(
                track.nsteps == 1 or (self.save_every and (track.nsteps - 1) % self.save_every == 0))
        else:  # never evaluated
            n = len(template)
            frame = make_frame(template, template.get_positions(), math.nan, np.full((n, 3), math.nan))
            fmax, nsteps, saved = math.nan, 0, False
        self._finish(track, frame, energy=frame.calc.results["energy"], fmax=fmax, nsteps=nsteps,
                     converged=False, failed=True, reason=REASON_OOM, final_is_saved=saved, stress=stress)

    def _check_and_retire(self) -> int:
        state = self._state
        assert state is not None
        is_cell = isinstance(state, CellLBFGSState)
        fmax = cell_system_fmax(state) if is_cell else system_fmax(state)
        bad_atom = (~torch.isfinite(state.forces)).any(dim=1).to(torch.float64)
        non_finite = (segment_max(bad_atom, state.system_idx, state.num_systems) > 0) | ~torch.isfinite(state.energy)
        if is_cell:
            non_finite = non_finite | ~torch.isfinite(state.stress).flatten(1).all(dim=1)
        exploded = ~non_finite & (fmax > self.max_force)
        converged = ~non_finite & ~exploded & (fmax < self.fmax)
        # one host sync per iteration: [4, S] flags/values
        host = torch.stack([non_finite.to(torch.float64), exploded.to(torch.float64),
                            converged.to(torch.float64), fmax]).cpu().numpy()
        non_finite_h, exploded_h, converged_h, fmax_h = host[0] > 0, host[1] > 0, host[2] > 0, host[3]
        done = [j for j, t in enumerate(self._active)
                if non_finite_h[j] or exploded_h[j] or converged_h[j] or t.nsteps >= self.steps]
        frame_wanted = [j for j, t in enumerate(self._active)
                        if t.nsteps == 0 or (self.save_every and t.nsteps % self.save_every == 0)]
        need = sorted(set(done) | set(frame_wanted))
        if not need:
            return 0
        if done:
            rows = state.rows.cpu().numpy()
            if is_cell:
                cell_rows = state.cell_rows.cpu().numpy()
        if is_cell:
            cells = state.cell.detach().cpu().numpy()
            stresses = state.stress.detach().cpu().numpy()
        pos = state.positions.detach().cpu().numpy()
        frc = state.forces.detach().cpu().numpy()
        eng = state.energy.detach().cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(state.natoms.cpu().numpy())])
        done_set = set(done)
        for j in need:
            t = self._active[j]
            a, b = bounds[j], bounds[j + 1]
            if is_cell:
                frame = make_frame(self._atoms[t.index], pos[a:b], eng[j], frc[a:b], cell=cells[j],
                                   stress=stresses[j])
            else:
                frame = make_frame(self._atoms[t.index], pos[a:b], eng[j], frc[a:b])
            if t.nsteps == 0:
                t.initial_energy = float(eng[j])
            saved = t.nsteps == 0 or bool(self.save_every and t.nsteps % self.save_every == 0)
            if saved:
                t.frames.append(frame)
            if j in done_set:
                self._history.release(rows[a:b])
                if is_cell:
                    self._history.release(cell_rows[j])
                if t.index in self._invalid:
                    reason, failed = self._invalid[t.index], True
                elif non_finite_h[j]:
                    reason, failed = REASON_NON_FINITE, True
                elif exploded_h[j]:
                    reason, failed = REASON_EXPLODED, True
                elif converged_h[j]:
                    reason, failed = REASON_CONVERGED, False
                else:
                    reason, failed = REASON_MAX_STEPS, False
                self._finish(t, frame, energy=float(eng[j]), fmax=float(fmax_h[j]), nsteps=t.nsteps,
                             converged=bool(converged_h[j]), failed=failed, reason=reason,
                             final_is_saved=saved, stress=stresses[j].copy() if is_cell else None)
        if done:
            keep = [j for j in range(len(self._active)) if j not in done_set]
            self._active = [self._active[j] for j in keep]
            self._state = state.select(keep) if keep else None
        return len(done)

    def _finish(self, track: _Track, frame: Atoms, *, energy: float, fmax: float, nsteps: int,
                converged: bool, failed: bool, reason: str, final_is_saved: bool,
                stress: np.ndarray | None = None) -> None:
        if not final_is_saved:
            track.frames.append(frame)
        result = RelaxResult(
            index=track.index, name=self._names[track.index], atoms=frame, energy=energy,
            fmax=fmax, nsteps=nsteps, converged=converged, failed=failed, reason=reason,
            initial_energy=track.initial_energy, trajectory=track.frames, stress=stress,
        )
        self._results[track.index] = result
        self.potential.release(track.index)
        self.stats.converged += int(converged)
        self.stats.failed += int(failed)
        if self.trajectory_dir is not None:
            write_trajectory(self.trajectory_dir / f"{result.name}.traj", result.trajectory)
        if self.on_result is not None:
            self.on_result(result)

    def _step(self) -> None:
        state = self._state
        assert state is not None
        # count <= iteration - 1 before this step's update; lets the two-loop skip empty slots
        state.max_count = min(state.history_size, max(0, max(t.nsteps for t in self._active) - 1))
        if isinstance(state, CellLBFGSState):
            cell_lbfgs_step(state, self.params)
        else:
            lbfgs_step(state, self.params)
        for t in self._active:
            t.nsteps += 1


def relax_batch(
    atoms_list: Sequence[Atoms],
    potential: Any,
    fmax: float = 0.05,
    steps: int = 300,
    *,
    names: Sequence[str] | None = None,
    max_atoms: int | None = None,
    max_edges: int | None = None,
    fix_tag0: bool = False,
    max_force: float = DEFAULT_MAX_FORCE,
    trajectory_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    progress: bool = True,
    on_result: Callable[[RelaxResult], None] | None = None,
    stats: RelaxStats | None = None,
    cell_filter: CellFilter | str | None = None,
    **optimizer_options: Any,
) -> list[RelaxResult]:
    """Relax every structure in ``atoms_list`` with batched L-BFGS (ASE semantics).

    Parameters
    ----------
    atoms_list:
        Structures to relax (not modified). ASE ``FixAtoms``/``FixCartesian`` constraints
        are honoured; fixed atoms move by exactly 0 Å. Sizes and pbc may differ.
    potential:
        An ASE calculator (e.g. ``EMT()``, evaluated structure by structure), an
        ``EquiformerV2Calculator`` (its batched potential is used), or a Potential.
    fmax:
        Converged when the largest free-atom force norm is < ``fmax`` eV/Å (default 0.05).
    steps:
        At most this many L-BFGS steps per structure (default 300).
    names:
        Identifiers used for trajectory file names (default: zero-padded input indices).
    max_atoms, max_edges:
        Capacity of one potential call (default 4096 atoms; edges only if the potential
        ``counts_edges``). Finished structures leave at once and queued ones take their
        place.
    fix_tag0:
        Also fix atoms with tag 0 (OC20 convention).
    max_force:
        A structure whose free-atom force exceeds this (eV/Å, default 1000) or becomes
        NaN/inf is stopped and returned with ``failed=True``.
    trajectory_dir, save_every:
        Write ``<dir>/<name>.traj`` (initial frame, every ``save_every``-th, final frame).
    progress:
        Show a tqdm progress bar.
    on_result:
        Callback invoked with each result as soon as its structure finishes.
    stats:
        If given, filled with run counters (:class:`RelaxStats`: utilization, potential
        calls, wall time, ...).
    cell_filter:
        None (default): relax positions, cells fixed. ``"frechet"``: relax positions and cell
        of every structure together, with the degrees of freedom, scaling and convergence test
        of ASE's ``FrechetCellFilter`` (:mod:`eqv2_calc.relax.cell`); needs a potential with
        stress (``provides_stress``, e.g. EMT) and 3-D periodic structures. ``fmax`` then
        applies to the generalized forces (atoms and cell rows), ``maxstep`` to their rows.
        Options (ASE names, only with ``cell_filter``): ``exp_cell_factor`` (default: atoms
        per structure), ``hydrostatic_strain=False``, ``constant_volume=False``,
        ``scalar_pressure=0.0`` (eV/Å³); or pass a
        :class:`~eqv2_calc.relax.cell.CellFilter`.
    **optimizer_options:
        L-BFGS options with ASE names and defaults: ``maxstep=0.2`` (Å), ``memory=100``,
        ``damping=1.0``, ``alpha=70.0`` (eV/Å², H0 = 1/alpha), plus
        ``curvature_guard="skip"`` (see :mod:`eqv2_calc.relax.lbfgs`), and the cell-filter
        options above.

    Returns
    -------
    list[RelaxResult]
        One result per input structure, in input order.
    """
    cell_options = {k: optimizer_options.pop(k) for k in CELL_FILTER_OPTIONS if k in optimizer_options}
    unknown = sorted(set(optimizer_options) - set(OPTIMIZER_OPTIONS))
    if unknown:
        raise InputError(
            f"unknown optimizer option(s) {unknown}; valid: {', '.join(OPTIMIZER_OPTIONS + CELL_FILTER_OPTIONS)}"
        )
    if cell_options:
        if cell_filter is None:
            raise InputError(f"{sorted(cell_options)} only apply to a cell relaxation: pass cell_filter='frechet'")
        if isinstance(cell_filter, CellFilter):
            raise InputError(f"pass {sorted(cell_options)} inside the CellFilter, not next to it")
        cell_filter = CellFilter(kind=cell_filter, **cell_options)  # type: ignore[arg-type]
    relaxer = BatchRelaxer(
        potential, fmax=fmax, steps=steps, params=LBFGSParams(**optimizer_options),
        max_atoms=max_atoms, max_edges=max_edges, fix_tag0=fix_tag0, max_force=max_force,
        save_every=save_every, trajectory_dir=trajectory_dir, progress=progress,
        on_result=on_result, cell_filter=cell_filter,
    )
    results = relaxer.run(atoms_list, names=names)
    if stats is not None:
        for f in stats.__dataclass_fields__:
            setattr(stats, f, getattr(relaxer.stats, f))
    return results

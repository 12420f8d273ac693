"""The in-flight batching engine of a batched relaxation: :class:`BatchRelaxer`
(front end: :func:`~eqv2_calc.relax.runner.relax_batch`).

Each iteration of the engine

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
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ase import Atoms

from eqv2_calc.batching import DEFAULT_MAX_ATOMS, Budget, is_out_of_memory
from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import atoms_to_batch
from eqv2_calc.potential import resolve_potential
from eqv2_calc.relax.cell import CellFilter, CellLBFGSState, cell_init, cell_lbfgs_step, cell_set_results
from eqv2_calc.relax.constraints import free_mask
from eqv2_calc.relax.evaluate import evaluate_batch, evaluate_one_by_one
from eqv2_calc.relax.inputs import check_cell_constraints, check_structures, structure_names
from eqv2_calc.relax.io import write_trajectory
from eqv2_calc.relax.lbfgs import HistoryBuffer, LBFGSParams, LBFGSState, lbfgs_init, lbfgs_set_results, lbfgs_step
from eqv2_calc.relax.readout import HostSnapshot, last_evaluation, system_status
from eqv2_calc.relax.results import (
    REASON_CONVERGED,
    REASON_EXPLODED,
    REASON_MAX_STEPS,
    REASON_NON_FINITE,
    REASON_OOM,
    RelaxResult,
    RelaxStats,
)

DEFAULT_MAX_FORCE = 1.0e3
"""Free-atom force (eV/Å) above which a system counts as exploded and is flagged failed."""


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
        check_structures(atoms_list, self.cell_filter)
        return structure_names(names, len(atoms_list), file_names=self.trajectory_dir is not None)

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
        self._start(min(sum(len(a) for a in atoms_list), self.budget.max_atoms or 1 << 62))
        self._admit(list(atoms_list), names)
        self._loop(None, total=len(atoms_list))
        results = self._results
        assert all(r is not None for r in results)  # every structure is retired exactly once
        return results  # type: ignore[return-value]

    def run_feed(self, feed: Callable[[bool], Sequence[Atoms] | None]) -> RelaxStats:
        """Relax structures as they arrive, on an open queue: the batch is topped up from ``feed``
        at every refill, so it never drains while more work is coming.

        ``feed(wait)`` returns the structures that arrived since the last call (possibly none),
        or None once no more will come; with ``wait=True`` (nothing left to run) it blocks until
        at least one structure arrives or the feed closes. Structures are numbered in arrival
        order (``RelaxResult.index``) and reported only through ``on_result`` (none are kept)."""
        self._start(self.budget.max_atoms or DEFAULT_MAX_ATOMS)
        self._loop(feed, total=None)
        return self.stats

    def _start(self, history_rows: int) -> None:
        self._atoms: list[Atoms] = []
        self._names: list[str] = []
        self._free: list[np.ndarray] = []
        self._history = HistoryBuffer(max(1, min(self.params.memory, self.steps)), history_rows, self.device)
        self.stats = RelaxStats(max_atoms=self.budget.max_atoms)
        self._queue: deque[_Track] = deque()
        self._active: list[_Track] = []
        self._state: LBFGSState | None = None
        self._results: list[RelaxResult | None] = []
        self._keep_results = True
        self._invalid: dict[int, str] = {}

    def _admit(self, atoms_list: list[Atoms], names: list[str]) -> None:
        """Append validated structures to the queue (largest first with ``sort_by_size``)."""
        first = len(self._atoms)
        free = [free_mask(a, fix_tag0=self.fix_tag0, index=first + i) for i, a in enumerate(atoms_list)]
        if self.cell_filter is not None:
            check_cell_constraints(free)
        self._atoms += atoms_list
        self._names += names
        self._free += free
        self._results += [None] * len(atoms_list)
        self.stats.n_systems += len(atoms_list)
        order = range(first, first + len(atoms_list))
        if self.sort_by_size:
            order = sorted(order, key=lambda i: -len(self._atoms[i]))
        self._queue.extend(_Track(index=i, natoms=len(self._atoms[i])) for i in order)

    def _poll(self, feed: Callable[[bool], Sequence[Atoms] | None], wait: bool) -> bool:
        """Admit what ``feed`` has; False once it is closed."""
        arrived = feed(wait)
        if arrived is None:
            return False
        if len(arrived):
            arrived = list(arrived)
            check_structures(arrived, self.cell_filter)
            self._admit(arrived, [f"{len(self._atoms) + i:06d}" for i in range(len(arrived))])
        return True

    def _loop(self, feed: Callable[[bool], Sequence[Atoms] | None] | None, total: int | None) -> None:
        from tqdm.auto import tqdm

        if feed is not None:
            self._keep_results = False
        open_feed = feed is not None
        t0 = time.perf_counter()
        with tqdm(total=total, desc="relax", unit="sys", disable=not self.progress, dynamic_ncols=True) as bar:
            while True:
                if open_feed:
                    open_feed = self._poll(feed, wait=not self._active and not self._queue)
                self._refill()
                if not self._active:
                    if open_feed or self._queue:
                        continue
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
        with_stress = self.cell_filter is not None
        try:
            energy, forces, stress = evaluate_batch(self.potential, batch, keys, with_stress=with_stress)
        except InputError:
            # a structure the potential rejects (e.g. atoms collapsed to < 0.1 Å, an element
            # it has no parameters for): find it by evaluating one system at a time, so that
            # only it fails
            energy, forces, stress = evaluate_one_by_one(self.potential, batch, keys, with_stress=with_stress,
                                                         invalid=self._invalid)
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
        """A structure ran out of memory alone: report its last evaluated frame as failed."""
        last = last_evaluation(state, self._atoms[track.index], self._free[track.index], track.nsteps,
                               self.save_every)
        self._finish(track, last.frame, energy=last.frame.calc.results["energy"], fmax=last.fmax,
                     nsteps=last.nsteps, converged=False, failed=True, reason=REASON_OOM,
                     final_is_saved=last.saved, stress=last.stress)

    def _check_and_retire(self) -> int:
        state = self._state
        assert state is not None
        status = system_status(state, self.fmax, self.max_force)
        done = [j for j, t in enumerate(self._active)
                if status.non_finite[j] or status.exploded[j] or status.converged[j] or t.nsteps >= self.steps]
        frame_wanted = [j for j, t in enumerate(self._active)
                        if t.nsteps == 0 or (self.save_every and t.nsteps % self.save_every == 0)]
        need = sorted(set(done) | set(frame_wanted))
        if not need:
            return 0
        if done:
            rows = state.rows.cpu().numpy()
            if isinstance(state, CellLBFGSState):
                cell_rows = state.cell_rows.cpu().numpy()
        snap = HostSnapshot(state)
        done_set = set(done)
        for j in need:
            t = self._active[j]
            frame = snap.frame(j, self._atoms[t.index])
            if t.nsteps == 0:
                t.initial_energy = float(snap.energy[j])
            saved = t.nsteps == 0 or bool(self.save_every and t.nsteps % self.save_every == 0)
            if saved:
                t.frames.append(frame)
            if j in done_set:
                a, b = snap.atom_range(j)
                self._history.release(rows[a:b])
                if snap.is_cell:
                    self._history.release(cell_rows[j])
                if t.index in self._invalid:
                    reason, failed = self._invalid[t.index], True
                elif status.non_finite[j]:
                    reason, failed = REASON_NON_FINITE, True
                elif status.exploded[j]:
                    reason, failed = REASON_EXPLODED, True
                elif status.converged[j]:
                    reason, failed = REASON_CONVERGED, False
                else:
                    reason, failed = REASON_MAX_STEPS, False
                self._finish(t, frame, energy=float(snap.energy[j]), fmax=float(status.fmax[j]), nsteps=t.nsteps,
                             converged=bool(status.converged[j]), failed=failed, reason=reason,
                             final_is_saved=saved, stress=snap.stress(j))
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
        if self._keep_results:
            self._results[track.index] = result
        else:  # open feed: reported, not kept
            self._atoms[track.index] = self._free[track.index] = None  # type: ignore[call-overload]
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
            cell_lbfgs_step(state, self.params, self.cell_filter)
        else:
            lbfgs_step(state, self.params)
        for t in self._active:
            t.nsteps += 1


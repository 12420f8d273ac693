"""Batched L-BFGS on packed batches: state dataclass and step functions.

The algorithm is ASE's ``ase.optimize.LBFGS`` (two-loop recursion, fixed initial inverse
Hessian ``H0 = 1/alpha``, step rescaled so that the largest atomic displacement is at most
``maxstep``, then multiplied by ``damping``), applied to every system of a packed batch
*independently*: every dot product, step length and history is per system, so the numbers
of one system never depend on which other systems share its batch.

Shapes: N = atoms in the batch (all systems concatenated, no padding), S = systems,
H = history slots (``memory``, capped by the step budget).

================  ==============  ===============================================================
field             shape / dtype   meaning
================  ==============  ===============================================================
positions         [N, 3] f64      current positions, Å
forces            [N, 3] f64      raw (unconstrained) forces at ``positions``, eV/Å
energy            [S] f64         potential energy at ``positions``, eV
free              [N, 3] bool     False for fixed Cartesian components (ASE FixAtoms/FixCartesian)
numbers           [N] int64       atomic numbers
system_idx        [N] int64       system of each atom, sorted 0..S-1
natoms            [S] int64       atoms per system
cell              [S, 3, 3] f64   lattice vectors as rows, Å
pbc               [S, 3] bool     periodicity
r0                [N, 3] f64      positions before the last step (``x_{k-1}``), Å
f0                [N, 3] f64      constrained forces at ``r0``, eV/Å
rows              [N] int64       row of each atom in the shared :class:`HistoryBuffer`
history           HistoryBuffer   ``sy`` [H, C, 2, 3] f64 ring buffers (C >= N rows):
                                  ``sy[h, rows, 0]`` = s = x_k - x_{k-1} and ``sy[h, rows, 1]``
                                  = y = g_k - g_{k-1} (g = -constrained forces) of slot h
rho               [S, H] f64      1 / (y . s) per stored pair (0 for empty slots)
head              [S] int64       ring slot the next accepted pair of each system is written to
count             [S] int64       number of valid pairs per system (<= H)
iteration         [S] int64       L-BFGS steps taken per system (ASE ``nsteps``)
================  ==============  ===============================================================

The (s, y) history lives in a :class:`HistoryBuffer` addressed by atom rows, shared by all
states derived from one another: :meth:`LBFGSState.select` and :meth:`LBFGSState.concat` copy
only the small per-atom and per-system fields, so systems can leave and join a batch without
copying anybody's history (rows of finished systems are returned with
:meth:`HistoryBuffer.release`).

``lbfgs_step`` updates ``state`` (and its rows of the history buffer) **in place** and returns
the same object. It needs ``forces``/``energy`` evaluated at the current positions; after it
returns, ``positions`` hold the new (not yet evaluated) positions. The caller (the runner)
evaluates the potential and stores the results with :func:`lbfgs_set_results`. Evaluation is
kept out of the step so that the runner can evaluate freshly inserted systems (at their
initial positions) together with the continuing ones in one potential call.

Minimal loop (the engine in :mod:`eqv2_calc.relax.engine` adds in-flight refill, failure
handling and outputs)::

    state = lbfgs_init(pos, numbers, natoms, cell, pbc, free, history_size=100)
    for _ in range(steps + 1):
        energy, forces = potential(state)   # the state is an AtomsBatch
        lbfgs_set_results(state, energy, forces)
        if bool((system_fmax(state) < fmax).all()):
            break
        lbfgs_step(state, LBFGSParams())

The optimizer state is float64 whatever the model's dtype (the potential casts its inputs).

Curvature guard (``curvature_guard``): ASE stores every pair, even when ``y.s <= 0`` (the
pair then makes the inverse-Hessian estimate indefinite and the next direction may point
uphill; ``y.s == 0`` gives ``rho = inf`` and NaN positions). ``"skip"`` (default) does not
store such a pair for that system, ``"reset"`` clears that system's history, ``"none"``
reproduces ASE exactly. While every ``y.s > 0`` (the usual case) all three give ASE's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import AtomsBatch

CurvatureGuard = Literal["skip", "reset", "none"]
CURVATURE_GUARDS: tuple[str, ...] = ("skip", "reset", "none")


@dataclass(frozen=True)
class LBFGSParams:
    """L-BFGS hyper-parameters (names and defaults as in ``ase.optimize.LBFGS``).

    Attributes
    ----------
    maxstep:
        Largest displacement of any single atom per step, Å (default 0.2). Values
        above 1.0 Å are rejected, as in ASE.
    memory:
        Number of (s, y, rho) pairs kept per system (default 100).
    damping:
        Factor applied to the step *after* the ``maxstep`` rescaling (default 1.0).
    alpha:
        Initial Hessian guess in eV/Å² (default 70.0); ``H0 = 1/alpha`` is never updated.
    curvature_guard:
        What to do with a pair whose ``y.s <= 0``: ``"skip"`` (default), ``"reset"``
        or ``"none"`` (store it, exactly like ASE). See the module docstring.
    """

    maxstep: float = 0.2
    memory: int = 100
    damping: float = 1.0
    alpha: float = 70.0
    curvature_guard: CurvatureGuard = "skip"

    def __post_init__(self) -> None:
        if not (0.0 < self.maxstep <= 1.0):
            raise InputError(
                f"maxstep={self.maxstep!r} Å is not allowed: use 0 < maxstep <= 1.0 Å "
                "(ASE rejects larger values as 'much too large')"
            )
        if not isinstance(self.memory, int) or isinstance(self.memory, bool) or self.memory < 1:
            raise InputError(f"memory={self.memory!r} must be a positive integer")
        if not self.damping > 0.0:
            raise InputError(f"damping={self.damping!r} must be > 0")
        if not self.alpha > 0.0:
            raise InputError(f"alpha={self.alpha!r} eV/Å² must be > 0")
        if self.curvature_guard not in CURVATURE_GUARDS:
            raise InputError(
                f"curvature_guard={self.curvature_guard!r}; expected one of {CURVATURE_GUARDS}"
            )


class HistoryBuffer:
    """Row-addressed storage of the (s, y) history of many systems.

    ``sy`` has shape [H, C, 2, 3] (float64): slot h, row r holds (s, y) of the atom stored in
    row r. Rows are handed out by :meth:`allocate` and given back by :meth:`release`; the
    buffer grows (one copy) when it runs out of rows.
    """

    def __init__(self, history_size: int, capacity: int, device: torch.device | str = "cpu") -> None:
        if history_size < 1:
            raise InputError(f"history_size must be >= 1, got {history_size}")
        self.history_size = int(history_size)
        self.sy = torch.zeros(self.history_size, max(1, capacity), 2, 3, dtype=torch.float64, device=device)
        self._in_use = np.zeros(self.sy.shape[1], dtype=bool)

    @property
    def capacity(self) -> int:
        return int(self.sy.shape[1])

    @property
    def rows_in_use(self) -> int:
        return int(self._in_use.sum())

    def allocate(self, n: int) -> np.ndarray:
        """Reserve ``n`` zeroed rows; returns their indices (host int64 array)."""
        free = np.flatnonzero(~self._in_use)
        if len(free) < n:
            grow = max(self.capacity, n - len(free))
            extra = torch.zeros(self.history_size, grow, 2, 3, dtype=self.sy.dtype, device=self.sy.device)
            self.sy = torch.cat([self.sy, extra], dim=1)
            self._in_use = np.concatenate([self._in_use, np.zeros(grow, dtype=bool)])
            free = np.flatnonzero(~self._in_use)
        rows = free[:n]
        self._in_use[rows] = True
        self.sy.index_fill_(1, torch.as_tensor(rows, dtype=torch.long, device=self.sy.device), 0.0)
        return rows

    def release(self, rows: np.ndarray | Sequence[int]) -> None:
        """Return rows of systems that left for good."""
        self._in_use[np.asarray(rows, dtype=np.int64)] = False


@dataclass(kw_only=True)
class LBFGSState(AtomsBatch):
    """Packed L-BFGS state of several systems: an :class:`~eqv2_calc.graph.AtomsBatch`
    (``numbers``, ``positions``, ``cell``, ``pbc``, ``system_idx``, ``natoms``) extended with
    the optimizer fields of the module docstring's table. It is passed to the potential as it
    is; :meth:`select` and :meth:`concat` copy the small per-atom and per-system fields and
    share the :class:`HistoryBuffer`."""

    PER_ATOM_FIELDS = AtomsBatch.PER_ATOM_FIELDS + ("forces", "free", "r0", "f0", "rows")
    PER_SYSTEM_FIELDS = AtomsBatch.PER_SYSTEM_FIELDS + ("energy", "rho", "head", "count", "iteration")

    forces: torch.Tensor
    energy: torch.Tensor
    free: torch.Tensor
    r0: torch.Tensor
    f0: torch.Tensor
    rows: torch.Tensor
    history: HistoryBuffer
    rho: torch.Tensor
    head: torch.Tensor
    count: torch.Tensor
    iteration: torch.Tensor
    max_count: int = 0
    """Host-side upper bound of ``count`` (bounds the two-loop without a device sync)."""

    @property
    def history_size(self) -> int:
        return self.history.history_size

    def constrained_forces(self) -> torch.Tensor:
        """Forces with fixed components set to exactly 0, [N, 3] eV/Å."""
        return torch.where(self.free, self.forces, torch.zeros_like(self.forces))

    def _shared(self) -> dict[str, Any]:
        return {"history": self.history, "max_count": self.max_count}

    @classmethod
    def _merge_shared(cls, parts: Sequence[AtomsBatch]) -> dict[str, Any]:
        states = [p for p in parts if isinstance(p, LBFGSState)]
        if len(states) != len(parts) or any(s.history is not states[0].history for s in states):
            raise InputError(
                "cannot concatenate states with different history buffers: create them with "
                "lbfgs_init(..., history=<the same HistoryBuffer>)"
            )
        return {"history": states[0].history, "max_count": max(s.max_count for s in states)}


def lbfgs_init(
    positions: torch.Tensor,
    numbers: torch.Tensor,
    natoms: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    free: torch.Tensor,
    *,
    history_size: int | None = None,
    history: HistoryBuffer | None = None,
) -> LBFGSState:
    """Create a state with empty history for systems that have not been evaluated yet.

    Parameters
    ----------
    positions:
        [N, 3] positions in Å (converted to float64).
    numbers:
        [N] atomic numbers.
    natoms:
        [S] atoms per system (positive), atoms of each system contiguous.
    cell, pbc:
        [S, 3, 3] lattice rows (Å) and [S, 3] periodicity.
    free:
        [N, 3] bool, False for fixed Cartesian components.
    history_size:
        Number of history slots H (normally ``min(memory, steps)``, at least 1); used to
        create a new :class:`HistoryBuffer` when ``history`` is not given.
    history:
        An existing buffer to take rows from (needed to :meth:`LBFGSState.concat` later).

    ``forces`` and ``energy`` are zero-filled placeholders; evaluate the potential and call
    :func:`lbfgs_set_results` before the first :func:`lbfgs_step`.
    """
    dev = positions.device
    pos = positions.to(torch.float64)
    n, s = pos.shape[0], natoms.shape[0]
    if pos.shape != (n, 3) or free.shape != (n, 3) or numbers.shape != (n,):
        raise InputError(
            f"inconsistent shapes: positions {tuple(pos.shape)}, free {tuple(free.shape)}, "
            f"numbers {tuple(numbers.shape)}; expected [N, 3], [N, 3], [N]"
        )
    if int(natoms.sum()) != n:
        raise InputError(f"natoms sums to {int(natoms.sum())} but there are {n} atoms")
    if history is None:
        if history_size is None:
            raise InputError("lbfgs_init needs history_size or history")
        history = HistoryBuffer(history_size, n, dev)
    elif history_size is not None and history_size != history.history_size:
        raise InputError(f"history_size={history_size} but the buffer has {history.history_size} slots")
    rows = torch.as_tensor(history.allocate(n), dtype=torch.long, device=dev)
    h = history.history_size
    zeros_n3 = torch.zeros(n, 3, dtype=torch.float64, device=dev)
    return LBFGSState(
        positions=pos.clone(),
        forces=zeros_n3.clone(),
        energy=torch.zeros(s, dtype=torch.float64, device=dev),
        free=free.to(device=dev, dtype=torch.bool),
        numbers=numbers.to(device=dev, dtype=torch.long),
        system_idx=torch.as_tensor(
            np.repeat(np.arange(s), natoms.cpu().numpy()), dtype=torch.long, device=dev
        ),
        natoms=natoms.to(device=dev, dtype=torch.long),
        cell=cell.to(device=dev, dtype=torch.float64),
        pbc=pbc.to(device=dev, dtype=torch.bool),
        r0=zeros_n3.clone(),
        f0=zeros_n3.clone(),
        rows=rows,
        history=history,
        rho=torch.zeros(s, h, dtype=torch.float64, device=dev),
        head=torch.zeros(s, dtype=torch.long, device=dev),
        count=torch.zeros(s, dtype=torch.long, device=dev),
        iteration=torch.zeros(s, dtype=torch.long, device=dev),
        max_count=0,
    )


def lbfgs_set_results(state: LBFGSState, energy: torch.Tensor, forces: torch.Tensor) -> LBFGSState:
    """Store a potential evaluation at the current positions (in place; returns ``state``).

    ``energy`` [S] eV and ``forces`` [N, 3] eV/Å are the raw potential outputs.
    """
    if energy.shape != (state.num_systems,) or forces.shape != (state.num_atoms, 3):
        raise InputError(
            f"potential returned energy {tuple(energy.shape)} and forces {tuple(forces.shape)}; "
            f"expected ({state.num_systems},) and ({state.num_atoms}, 3)"
        )
    state.energy = energy.to(device=state.device, dtype=torch.float64)
    state.forces = forces.to(device=state.device, dtype=torch.float64)
    return state


def segment_sum(values: torch.Tensor, system_idx: torch.Tensor, num_systems: int) -> torch.Tensor:
    """Sum ``values`` [N] per system -> [S]."""
    out = torch.zeros(num_systems, dtype=values.dtype, device=values.device)
    return out.index_add_(0, system_idx, values)


def segment_max(values: torch.Tensor, system_idx: torch.Tensor, num_systems: int) -> torch.Tensor:
    """Maximum of ``values`` [N] per system -> [S] (NaN propagates)."""
    out = torch.zeros(num_systems, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, system_idx, values, reduce="amax", include_self=False)


def system_fmax(state: LBFGSState) -> torch.Tensor:
    """Largest per-atom norm of the constrained forces of each system, [S] eV/Å (ASE's fmax)."""
    norms = torch.linalg.vector_norm(state.constrained_forces(), dim=1)
    return segment_max(norms, state.system_idx, state.num_systems)


def _update_history(
    state: LBFGSState, x: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, f0: torch.Tensor,
    sys_idx: torch.Tensor, rows: torch.Tensor, guard: str,
) -> None:
    """Append (s, y, rho) for systems that already took a step (ASE ``LBFGS.update``).

    ``x``/``x0`` [M, 3] are the current/previous coordinates, ``g`` the current gradient and
    ``f0`` the previous (constrained) forces; row m belongs to system ``sys_idx[m]`` and is
    stored in history row ``rows[m]`` (M = N for positions; more rows for generalized
    coordinates, see :func:`lbfgs_displacement`)."""
    ar_s = torch.arange(state.num_systems, device=state.device)
    has_prev = state.iteration > 0  # [S]
    s_new = x - x0
    y_new = g - (-f0)
    ys = segment_sum((y_new * s_new).sum(dim=1), sys_idx, state.num_systems)  # [S]
    if guard == "none":
        accept = has_prev
    else:
        accept = has_prev & (ys > 0)
        if guard == "reset":
            state.count = torch.where(has_prev & ~(ys > 0), torch.zeros_like(state.count), state.count)
    acc_atom = accept[sys_idx][:, None, None]  # [N, 1, 1]
    slot_atom = state.head[sys_idx]  # [N]
    sy = state.history.sy
    old = sy[slot_atom, rows]  # [N, 2, 3]
    sy[slot_atom, rows] = torch.where(acc_atom, torch.stack([s_new, y_new], dim=1), old)
    state.rho[ar_s, state.head] = torch.where(accept, 1.0 / ys, state.rho[ar_s, state.head])
    h = state.history_size
    state.head = torch.where(accept, (state.head + 1) % h, state.head)
    state.count = torch.where(accept, torch.clamp(state.count + 1, max=h), state.count)
    state.max_count = min(h, state.max_count + 1)


def _two_loop(
    state: LBFGSState, g: torch.Tensor, alpha: float, sys_idx: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Two-loop recursion per system: returns the search direction p = -H g, [M, 3] (rows as
    in :func:`_update_history`).

    Loops over the K = ``state.max_count`` most recent slots. Slots a system does not have
    (k >= count) get rho = 0, so they add exact zeros and a system's numbers do not depend on
    the history length of its batch mates.
    """
    h, k_max = state.history_size, state.max_count
    zeros_s = torch.zeros(state.num_systems, dtype=torch.float64, device=state.device)
    ages = torch.arange(k_max, device=state.device)
    slot = torch.remainder(state.head[None, :] - 1 - ages[:, None], h)  # [K, S]
    rho = torch.where(ages[:, None] < state.count[None, :],
                      state.rho.T.gather(0, slot), torch.zeros((), dtype=torch.float64, device=state.device))
    slot_atom = slot[:, sys_idx]  # [K, N]
    buf = state.history.sy

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per-system a . b -> [S]
        return zeros_s.index_add(0, sys_idx, torch.linalg.vecdot(a, b))

    q = g.clone()
    saved = []
    for k in range(k_max):  # newest -> oldest
        pair = buf[slot_atom[k], rows]  # [N, 2, 3]
        s_k, y_k = pair[:, 0], pair[:, 1]
        a_k = rho[k] * dot(s_k, q)
        q = q - a_k[sys_idx, None] * y_k
        saved.append((s_k, y_k, a_k))
    z = q * (1.0 / alpha)
    for k in range(k_max - 1, -1, -1):  # oldest -> newest
        s_k, y_k, a_k = saved[k]
        b_k = rho[k] * dot(y_k, z)
        z = z + s_k * (a_k - b_k)[sys_idx, None]
    return -z


def lbfgs_step(state: LBFGSState, params: LBFGSParams) -> LBFGSState:
    """Take one L-BFGS step for every system of ``state`` (in place; returns ``state``).

    Requires ``state.forces``/``state.energy`` evaluated at ``state.positions``. Follows
    ``ase.optimize.LBFGS.step``: update the history with the pair from the previous step
    (if any), compute ``p = -H g`` by the two-loop recursion with ``H0 = 1/alpha``, rescale
    ``p`` per system so that its largest atomic displacement is at most ``maxstep`` Å, multiply
    by ``damping``, and move. Fixed components never move (their displacement is exactly 0).
    Afterwards ``r0``/``f0`` hold the old positions and constrained forces, ``iteration`` is
    incremented, and ``forces``/``energy`` are stale until the next evaluation.
    """
    fc = state.constrained_forces()
    dr = lbfgs_displacement(state, state.positions, fc, state.r0, state.f0, state.free,
                            state.system_idx, state.rows, params)
    state.r0 = state.positions
    state.f0 = fc
    state.positions = state.positions + dr
    state.iteration = state.iteration + 1
    return state


def lbfgs_displacement(
    state: LBFGSState,
    x: torch.Tensor,
    fc: torch.Tensor,
    x0: torch.Tensor,
    f0: torch.Tensor,
    free: torch.Tensor,
    sys_idx: torch.Tensor,
    rows: torch.Tensor,
    params: LBFGSParams,
) -> torch.Tensor:
    """The L-BFGS displacement [M, 3] of the coordinates ``x`` [M, 3] of every system (the
    core of :func:`lbfgs_step`, for any coordinate vector made of 3-vectors).

    ``fc`` are the constrained forces at ``x`` (the negative gradient), ``x0``/``f0`` the
    coordinates and forces of the previous step (ignored for systems with ``iteration == 0``),
    ``free`` [M, 3] False for components that never move, ``sys_idx`` [M] the system of each
    row (any order) and ``rows`` [M] its rows in ``state.history``. Updates the history of
    ``state`` (``rho``, ``head``, ``count``, the buffer rows); does not move anything nor
    increment ``iteration``. The ``maxstep`` rescaling is over the rows of each system: with
    :mod:`~eqv2_calc.relax.cell` the three cell rows count like atoms, as in ASE's filters.
    """
    g = -fc
    _update_history(state, x, x0, g, f0, sys_idx, rows, params.curvature_guard)
    p = _two_loop(state, g, params.alpha, sys_idx, rows)
    p = torch.where(free, p, torch.zeros_like(p))
    longest = segment_max(torch.linalg.vector_norm(p, dim=1), sys_idx, state.num_systems)
    scale = torch.where(
        longest >= params.maxstep, params.maxstep / longest, torch.ones_like(longest)
    )
    dr = p * scale[sys_idx, None] * params.damping
    return torch.where(free, dr, torch.zeros_like(dr))

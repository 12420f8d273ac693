"""Batched relaxation front end: :func:`relax_batch`.

It sorts the keyword options (L-BFGS ones into :class:`~eqv2_calc.relax.lbfgs.LBFGSParams`,
cell-filter ones into :class:`~eqv2_calc.relax.cell.CellFilter`) and runs the in-flight
engine :class:`~eqv2_calc.relax.engine.BatchRelaxer`; see :mod:`eqv2_calc.relax.engine` for
how the batch is filled, evaluated, checked and stepped. The result types live in
:mod:`eqv2_calc.relax.results`; every name this module exported before the split is still
importable from here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from ase import Atoms

from eqv2_calc.errors import InputError
from eqv2_calc.relax.cell import CELL_FILTER_OPTIONS, CellFilter
from eqv2_calc.relax.engine import DEFAULT_MAX_FORCE, BatchRelaxer
from eqv2_calc.relax.lbfgs import LBFGSParams
from eqv2_calc.relax.results import (
    REASON_CONVERGED,
    REASON_EXPLODED,
    REASON_INVALID,
    REASON_MAX_STEPS,
    REASON_NON_FINITE,
    REASON_OOM,
    REASON_UNSUPPORTED_ELEMENT,
    RelaxResult,
    RelaxStats,
)

__all__ = [
    "relax_batch", "make_relaxer", "BatchRelaxer", "RelaxResult", "RelaxStats", "DEFAULT_MAX_FORCE", "OPTIMIZER_OPTIONS",
    "REASON_CONVERGED", "REASON_MAX_STEPS", "REASON_NON_FINITE", "REASON_EXPLODED", "REASON_OOM",
    "REASON_INVALID", "REASON_UNSUPPORTED_ELEMENT",
]

OPTIMIZER_OPTIONS: tuple[str, ...] = ("maxstep", "memory", "damping", "alpha", "curvature_guard")
"""Keyword arguments of :func:`relax_batch` that configure L-BFGS (see :class:`LBFGSParams`)."""


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
        ``scalar_pressure=0.0`` (eV/Å³), ``cell_mask=None`` (ASE's ``mask``: 6 Voigt
        components ``(xx, yy, zz, yz, xz, xy)`` or a symmetric 3×3 array, True/1 = relax,
        False/0 = keep that cell component; the same mask for every structure); or pass a
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
    relaxer = make_relaxer(
        potential, fmax, steps, max_atoms=max_atoms, max_edges=max_edges, fix_tag0=fix_tag0, max_force=max_force,
        trajectory_dir=trajectory_dir, save_every=save_every, progress=progress, on_result=on_result,
        cell_filter=cell_filter, **optimizer_options,
    )
    results = relaxer.run(atoms_list, names=names)
    if stats is not None:
        for f in stats.__dataclass_fields__:
            setattr(stats, f, getattr(relaxer.stats, f))
    return results


def make_relaxer(
    potential: Any,
    fmax: float = 0.05,
    steps: int = 300,
    *,
    max_atoms: int | None = None,
    max_edges: int | None = None,
    fix_tag0: bool = False,
    max_force: float = DEFAULT_MAX_FORCE,
    trajectory_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    progress: bool = True,
    on_result: Callable[[RelaxResult], None] | None = None,
    cell_filter: CellFilter | str | None = None,
    **optimizer_options: Any,
) -> BatchRelaxer:
    """The :class:`BatchRelaxer` that :func:`relax_batch` runs, from the same keyword options
    (L-BFGS and cell-filter options sorted into their objects); e.g. for
    :meth:`BatchRelaxer.run_feed` on an open queue."""
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
        if "cell_mask" in cell_options:  # CellFilter's name is ASE's: mask
            cell_options["mask"] = cell_options.pop("cell_mask")
        cell_filter = CellFilter(kind=cell_filter, **cell_options)  # type: ignore[arg-type]
    relaxer = BatchRelaxer(
        potential, fmax=fmax, steps=steps, params=LBFGSParams(**optimizer_options),
        max_atoms=max_atoms, max_edges=max_edges, fix_tag0=fix_tag0, max_force=max_force,
        save_every=save_every, trajectory_dir=trajectory_dir, progress=progress,
        on_result=on_result, cell_filter=cell_filter,
    )
    return relaxer

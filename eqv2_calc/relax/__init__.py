"""Batched L-BFGS relaxation of many structures at once (IS2RS / IS2RE).

Public API::

    from eqv2_calc.relax import relax_batch
    results = relax_batch(atoms_list, EMT(), fmax=0.05, steps=300)   # list[RelaxResult]

Building blocks: :mod:`~eqv2_calc.relax.lbfgs` (state + ``lbfgs_init``/``lbfgs_step``),
:mod:`~eqv2_calc.relax.cell` (cell relaxation in ASE ``FrechetCellFilter`` coordinates:
``relax_batch(..., cell_filter="frechet")``), :mod:`~eqv2_calc.relax.runner` (the
``relax_batch`` front end), :mod:`~eqv2_calc.relax.engine` (``BatchRelaxer``: in-flight
batching, with :mod:`~eqv2_calc.relax.inputs`, :mod:`~eqv2_calc.relax.evaluate` and
:mod:`~eqv2_calc.relax.readout`), :mod:`~eqv2_calc.relax.results` (``RelaxResult``,
``RelaxStats``), :mod:`~eqv2_calc.relax.io` (trajectory, IS2RE and IS2RS files),
:mod:`~eqv2_calc.relax.metrics` (energy MAE, ADwT).
"""

from eqv2_calc.relax.cell import CellFilter, CellLBFGSState, cell_init, cell_lbfgs_step, cell_set_results
from eqv2_calc.relax.io import read_is2re, write_is2re, write_is2rs, write_trajectory
from eqv2_calc.relax.lbfgs import LBFGSParams, LBFGSState, lbfgs_init, lbfgs_set_results, lbfgs_step
from eqv2_calc.relax.metrics import adwt, distance_within_threshold, energy_mae
from eqv2_calc.relax.runner import BatchRelaxer, RelaxResult, RelaxStats, make_relaxer, relax_batch

__all__ = [
    "relax_batch",
    "make_relaxer",
    "RelaxResult",
    "RelaxStats",
    "BatchRelaxer",
    "LBFGSParams",
    "CellFilter",
    "CellLBFGSState",
    "cell_init",
    "cell_lbfgs_step",
    "cell_set_results",
    "LBFGSState",
    "lbfgs_init",
    "lbfgs_step",
    "lbfgs_set_results",
    "write_is2re",
    "read_is2re",
    "write_is2rs",
    "write_trajectory",
    "energy_mae",
    "adwt",
    "distance_within_threshold",
]

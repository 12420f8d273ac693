"""IS2RE and IS2RS metrics with the OC20 definitions.

* IS2RE energy MAE: mean |E_pred - E_ref| over systems, eV.
* IS2RS ADwT (average distance within threshold), as in the OC20 evaluator
  (fairchem ``average_distance_within_threshold``):

  1. per system, the position error of every *free* atom (fixed atoms are excluded, as OC20
     does with ``fixed == 0``) is the minimum-image displacement between the predicted and the
     reference position: the fractional difference (in the reference cell) is wrapped into
     [-0.5, 0.5) along periodic directions;
  2. the system's error is the **mean** of these distances over its free atoms;
  3. DwT(t) = fraction of systems whose mean error is < t;
  4. ADwT = mean of DwT(t) over the thresholds ``t = np.arange(0.01, 0.5, 0.001)`` Å
     (490 thresholds, 0.5 excluded).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms

from eqv2_calc.errors import InputError
from eqv2_calc.relax.constraints import free_mask

OC20_THRESHOLDS: np.ndarray = np.arange(0.01, 0.5, 0.001)
"""ADwT thresholds in Å, exactly as in the OC20 evaluator."""


def energy_mae(predicted: Sequence[float], reference: Sequence[float]) -> float:
    """Mean absolute energy error, eV (IS2RE). Both sequences in the same system order."""
    p = np.asarray(predicted, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1 or p.size == 0:
        raise InputError(f"energy_mae needs two equally long non-empty lists, got {p.shape} and {r.shape}")
    return float(np.mean(np.abs(p - r)))


def min_image_displacement(pred: np.ndarray, ref: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Displacements ``pred - ref`` [n, 3] (Å) wrapped to the nearest periodic image.

    The fractional difference along periodic directions is mapped into [-0.5, 0.5) (OC20's
    ``min_diff``); non-periodic directions are left unwrapped.
    """
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return diff
    from ase.geometry.cell import complete_cell

    cell = np.asarray(complete_cell(np.asarray(cell, dtype=np.float64)))
    frac = np.linalg.solve(cell.T, diff.T).T
    frac[:, pbc] -= np.floor(frac[:, pbc] + 0.5)
    return frac @ cell


def mean_free_atom_distance(predicted: Atoms, reference: Atoms, *, fix_tag0: bool = False) -> float:
    """Mean minimum-image distance (Å) over the free atoms of one system.

    Free atoms are those with at least one free Cartesian component in ``reference``
    (its FixAtoms/FixCartesian constraints; also tag 0 if ``fix_tag0``).
    """
    if len(predicted) != len(reference) or np.any(predicted.numbers != reference.numbers):
        raise InputError("predicted and reference structures have different atoms")
    free = free_mask(reference, fix_tag0=fix_tag0).any(axis=1)
    if not free.any():
        raise InputError("the reference structure has no free atoms: ADwT is undefined")
    d = min_image_displacement(
        predicted.get_positions()[free], reference.get_positions()[free],
        reference.get_cell(), reference.get_pbc(),
    )
    return float(np.mean(np.linalg.norm(d, axis=1)))


def distance_within_threshold(
    predicted: Sequence[Atoms], reference: Sequence[Atoms], threshold: float, *, fix_tag0: bool = False
) -> float:
    """DwT: fraction of systems whose mean free-atom error is below ``threshold`` Å."""
    d = _mean_distances(predicted, reference, fix_tag0)
    return float(np.mean(d < threshold))


def adwt(
    predicted: Sequence[Atoms],
    reference: Sequence[Atoms],
    *,
    thresholds: np.ndarray | None = None,
    fix_tag0: bool = False,
) -> float:
    """Average distance within threshold (IS2RS, OC20 definition; see module docstring).

    Parameters
    ----------
    predicted, reference:
        Relaxed structures and reference relaxed structures, same order and atoms.
    thresholds:
        Thresholds in Å (default :data:`OC20_THRESHOLDS`).
    fix_tag0:
        Treat tag-0 atoms as fixed (OC20 data where constraints were not stored).

    Returns
    -------
    float
        ADwT in [0, 1].
    """
    d = _mean_distances(predicted, reference, fix_tag0)
    t = OC20_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return float(np.mean(d[None, :] < t[:, None]))


def _mean_distances(predicted: Sequence[Atoms], reference: Sequence[Atoms], fix_tag0: bool) -> np.ndarray:
    if len(predicted) != len(reference) or len(predicted) == 0:
        raise InputError(
            f"need equally many predicted and reference structures (got {len(predicted)} and {len(reference)})"
        )
    return np.array([
        mean_free_atom_distance(p, r, fix_tag0=fix_tag0) for p, r in zip(predicted, reference)
    ])

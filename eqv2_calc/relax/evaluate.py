"""Calling the potential on a relaxation batch: one call for the whole batch
(:func:`evaluate_batch`) and the fallback that isolates the structures a potential rejects
(:func:`evaluate_one_by_one`). Out-of-memory handling stays with the engine
(:mod:`eqv2_calc.relax.engine`)."""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch

from eqv2_calc.errors import InputError, UnsupportedElementError
from eqv2_calc.graph.batch import AtomsBatch
from eqv2_calc.potential import Potential
from eqv2_calc.relax.results import REASON_INVALID, REASON_UNSUPPORTED_ELEMENT

Evaluation = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""``(energy [S] eV, forces [N, 3] eV/Å, stress [S, 3, 3] eV/Å³ or None)``."""


def evaluate_batch(potential: Potential, batch: AtomsBatch, keys: Sequence[Hashable], *,
                   with_stress: bool) -> Evaluation:
    """One potential call on ``batch`` (systems keyed by ``keys``); the stress only if
    ``with_stress`` (a cell relaxation), else None. Errors propagate."""
    if with_stress:
        energy, forces, stress = potential(batch, list(keys), stress=True)
        return energy, forces, stress
    energy, forces = potential(batch, list(keys))
    return energy, forces, None


def evaluate_one_by_one(potential: Potential, batch: AtomsBatch, keys: Sequence[Hashable], *,
                        with_stress: bool, invalid: dict[Hashable, str]) -> Evaluation:
    """Evaluate each system of ``batch`` alone. Those the potential rejects (an
    :class:`~eqv2_calc.errors.InputError`, e.g. atoms collapsed closer than it allows or an
    element it has no parameters for) get NaN results and an entry ``invalid[key]`` (the
    failure reason with the potential's message); results are float64. The stress is None
    unless ``with_stress``."""
    energies, forces, stresses = [], [], []
    for key, sub in zip(keys, batch.split()):
        try:
            e, f, st = evaluate_batch(potential, sub, [key], with_stress=with_stress)
        except InputError as exc:
            kind = REASON_UNSUPPORTED_ELEMENT if isinstance(exc, UnsupportedElementError) else REASON_INVALID
            invalid[key] = f"{kind}: {exc}"
            e = torch.full((1,), math.nan, dtype=torch.float64, device=batch.device)
            f = torch.full((sub.num_atoms, 3), math.nan, dtype=torch.float64, device=batch.device)
            st = torch.full((1, 3, 3), math.nan, dtype=torch.float64, device=batch.device)
        energies.append(torch.as_tensor(e, dtype=torch.float64))
        forces.append(torch.as_tensor(f, dtype=torch.float64))
        if with_stress:
            stresses.append(torch.as_tensor(st, dtype=torch.float64))
    return torch.cat(energies), torch.cat(forces), (torch.cat(stresses) if with_stress else None)

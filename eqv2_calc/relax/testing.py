"""Test and benchmark helpers for the relaxer: small slab+adsorbate systems for EMT and a
potential wrapper that injects faults (NaN forces, out-of-memory errors).

A bitwise-reproducible EMT potential (a new calculator for every evaluation) is
``ASEPotential(factory=EMT)``."""

from __future__ import annotations

import itertools
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.constraints import FixAtoms

from eqv2_calc.graph.batch import AtomsBatch
from eqv2_calc.potential import Potential

METALS: tuple[str, ...] = ("Cu", "Pt", "Au", "Ni", "Pd", "Ag")
FACETS: tuple[str, ...] = ("111", "100")
ADSORBATES: tuple[str, ...] = ("H", "O", "N", "C", "CO", "OH")


def adsorbate(name: str) -> Atoms:
    """Adsorbate as built for :func:`adsorbate_slab` (first atom binds to the surface)."""
    if name == "CO":
        return molecule("CO")  # C first
    if name == "OH":
        return Atoms("OH", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.97]])
    return Atoms(name)


def adsorbate_slab(
    metal: str,
    facet: str,
    ads: str,
    size: tuple[int, int, int] = (2, 2, 3),
    *,
    fixed_layers: int = 1,
    height: float = 1.8,
    vacuum: float = 6.0,
    rattle: float = 0.0,
    seed: int = 0,
) -> Atoms:
    """An fcc(111)/(100) slab of ``metal`` with ``ads`` in a hollow site, bottom
    ``fixed_layers`` layers fixed with ``FixAtoms``; optionally rattled (Å, free atoms only)."""
    build = {"111": fcc111, "100": fcc100}[facet]
    slab = build(metal, size=size, vacuum=vacuum)
    nlayers = size[2]
    bottom = slab.get_tags() > nlayers - fixed_layers  # ase.build tags layers 1 (top) .. n
    add_adsorbate(slab, adsorbate(ads), height, "fcc" if facet == "111" else "hollow")
    fixed = np.concatenate([bottom, np.zeros(len(slab) - len(bottom), dtype=bool)])
    if rattle:
        rng = np.random.default_rng(seed)
        pos = slab.get_positions()
        pos[~fixed] += rng.normal(scale=rattle, size=(int((~fixed).sum()), 3))
        slab.set_positions(pos)
    slab.set_constraint(FixAtoms(mask=fixed))
    slab.info.pop("adsorbate_info", None)  # a dict: extxyz cannot store it
    return slab


def slab_systems(
    n: int,
    sizes: Sequence[tuple[int, int, int]] = ((2, 2, 3),),
    rattle: float = 0.0,
) -> list[Atoms]:
    """``n`` distinct slab+adsorbate systems cycling through metals, facets, adsorbates and
    ``sizes`` (deterministic)."""
    combos = list(itertools.product(METALS, FACETS, ADSORBATES))
    # interleave so that the first n cover all metals/facets/adsorbates
    order = sorted(range(len(combos)), key=lambda k: (k % 7, k))
    out = []
    for j in range(n):
        metal, facet, ads = combos[order[j % len(combos)]]
        size = sizes[j % len(sizes)]
        out.append(adsorbate_slab(metal, facet, ads, size, rattle=rattle, seed=j))
    return out


class FaultyPotential(Potential):
    """Wrap a :class:`~eqv2_calc.potential.Potential` and inject faults for tests.

    Parameters
    ----------
    base:
        The real potential.
    nan_when:
        ``(batch, call_number) -> [S] bool``: systems whose energy and forces are replaced by
        NaN in this call.
    oom_when:
        ``(batch, call_number) -> bool``: raise ``RuntimeError('CUDA out of memory ...')``
        instead of evaluating.
    """

    def __init__(
        self,
        base: Potential,
        *,
        nan_when: Callable[[AtomsBatch, int], torch.Tensor] | None = None,
        oom_when: Callable[[AtomsBatch, int], bool] | None = None,
    ) -> None:
        self.base = base
        self.device = base.device
        self.counts_edges = base.counts_edges
        self.provides_stress = base.provides_stress
        self.nan_when = nan_when
        self.oom_when = oom_when
        self.calls = 0
        self.batch_sizes: list[int] = []

    def count_edges(self, batch: AtomsBatch) -> torch.Tensor:
        return self.base.count_edges(batch)

    def attach(self, key: Hashable, atoms: Atoms) -> None:
        self.base.attach(key, atoms)

    def release(self, key: Hashable) -> None:
        self.base.release(key)

    def __repr__(self) -> str:
        return f"FaultyPotential({self.base!r})"

    def __call__(
        self, batch: AtomsBatch, keys: Sequence[Hashable] | None = None, *, stress: bool = False
    ) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        if self.oom_when is not None and self.oom_when(batch, self.calls):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by test)")
        self.batch_sizes.append(int(batch.positions.shape[0]))
        out = self.base(batch, keys, stress=True) if stress else self.base(batch, keys)
        energy, forces = out[0], out[1]
        if self.nan_when is not None:
            bad = self.nan_when(batch, self.calls).to(energy.device)
            energy = torch.where(bad, torch.full_like(energy, float("nan")), energy)
            forces = torch.where(bad[batch.system_idx][:, None], torch.full_like(forces, float("nan")), forces)
        if stress:
            return energy, forces, out[2]
        return energy, forces

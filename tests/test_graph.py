"""Radius graph vs. independent truth: ASE's neighbour list and a brute-force selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from eqv2_calc.graph import atoms_to_batch, radius_graph


def _edges(graph):
    return sorted(
        zip(graph.dst.tolist(), graph.src.tolist(), map(tuple, graph.shifts.tolist()))
    )


def _ase_edges(atoms, cutoff):
    i, j, shift, d = neighbor_list("ijSd", atoms, cutoff)
    keep = d > 1e-2
    return i[keep], j[keep], shift[keep], d[keep]


def _brute_force_select(atoms, cutoff, k, strict):
    """Per centre: sort by (d², j, shift) and apply fairchem's strict / non-strict rule."""
    i, j, shift, d = _ase_edges(atoms, cutoff)
    out = []
    for c in range(len(atoms)):
        rows = sorted(
            (d[e] ** 2, j[e], tuple(shift[e])) for e in np.flatnonzero(i == c)
        )
        if len(rows) > k:
            rows = rows[:k] if strict else [r for r in rows if r[0] <= rows[k][0] + 0.01]
        out += [(c, r[1], r[2]) for r in rows]
    return sorted(out)


@pytest.mark.parametrize(
    "atoms",
    [
        fcc111("Au", size=(1, 1, 3), vacuum=5.0, periodic=True),  # many periodic images
        fcc111("Pt", size=(2, 2, 3), vacuum=6.0),  # pbc (T, T, F)
        bulk("NaCl", "rocksalt", a=5.64, cubic=True),
        molecule("CH3OH"),  # no cell, no pbc
    ],
    ids=["1x1-slab", "mixed-pbc", "bulk", "molecule"],
)
def test_full_list_matches_ase(atoms):
    atoms = atoms.copy()
    atoms.rattle(0.02, seed=1)
    g = radius_graph(atoms_to_batch([atoms]), cutoff=6.0, max_neighbors=None)
    i, j, shift, _ = _ase_edges(atoms, 6.0)
    assert _edges(g) == sorted(zip(i.tolist(), j.tolist(), map(tuple, shift.tolist())))
    pos = atoms.positions
    ref_vec = pos[g.src.numpy()] + g.shifts.numpy() @ atoms.cell.array - pos[g.dst.numpy()]
    np.testing.assert_allclose(g.vec.numpy(), ref_vec, atol=1e-12)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("k", [5, 12, 20])
def test_max_neighbors_rules(strict, k):
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0, periodic=True)
    atoms.rattle(0.05, seed=2)
    g = radius_graph(atoms_to_batch([atoms]), cutoff=8.0, max_neighbors=k, strict=strict)
    assert _edges(g) == _brute_force_select(atoms, 8.0, k, strict)
    counts = torch.bincount(g.dst, minlength=len(atoms))
    if strict:
        assert counts.max() == k
    else:
        assert counts.min() >= k + 1


def test_nonstrict_keeps_degenerate_shell():
    """Perfect fcc: the 12 nearest neighbours tie; non-strict keeps all of a tied shell."""
    atoms = bulk("Cu", "fcc", a=3.6)
    g = radius_graph(atoms_to_batch([atoms]), cutoff=6.0, max_neighbors=10, strict=False)
    assert g.src.numel() == 12
    g = radius_graph(atoms_to_batch([atoms]), cutoff=6.0, max_neighbors=10, strict=True)
    assert g.src.numel() == 10


def test_batch_graph_is_union_of_single_graphs():
    systems = [fcc111("Pt", size=(2, 2, 3), vacuum=6.0, periodic=True), molecule("CO"), bulk("Cu", "fcc", a=3.6)]
    batch = radius_graph(atoms_to_batch(systems), cutoff=5.0, max_neighbors=12)
    offset, start = 0, 0
    for s, atoms in enumerate(systems):
        single = radius_graph(atoms_to_batch([atoms]), cutoff=5.0, max_neighbors=12)
        n = int(batch.num_edges[s])
        assert n == single.src.numel()
        assert torch.equal(batch.src[start : start + n] - offset, single.src)
        assert torch.equal(batch.vec[start : start + n], single.vec)
        offset, start = offset + len(atoms), start + n


def test_isolated_atom_has_no_edges():
    g = radius_graph(atoms_to_batch([Atoms("Cu", positions=[[0, 0, 0]])]), cutoff=6.0, max_neighbors=20)
    assert g.src.numel() == 0 and g.num_edges.tolist() == [0]

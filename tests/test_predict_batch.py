"""predict_batch: chunks under the atom/edge budget, graphs built per chunk, OOM halving,
errors that name the structure — checked against single-structure calls."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111

from conftest import calculator
from eqv2_calc.errors import InputError, UnsupportedElementError


def _systems(n: int) -> list[Atoms]:
    out = []
    for k in range(n):
        slab = fcc111("Cu", size=(2, 2, 2 + k % 2), vacuum=5.0, periodic=True)
        slab.rattle(0.05, seed=k)
        out.append(slab)
    return out


class _Spy:
    """Wraps an EquiformerV2Potential; records graph sizes and model calls, optionally failing
    calls above ``oom_above`` atoms with a CUDA-style out-of-memory error."""

    def __init__(self, pot, oom_above: int | None = None):
        self.pot, self.oom_above = pot, oom_above
        self.device = pot.device
        self.graph_atoms: list[int] = []
        self.call_atoms: list[int] = []

    def check_numbers(self, numbers):
        self.pot.check_numbers(numbers)

    def graph(self, batch):
        self.graph_atoms.append(batch.num_atoms)
        return self.pot.graph(batch)

    def evaluate(self, batch, graph):
        if self.oom_above is not None and batch.num_atoms > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB (injected by test)")
        self.call_atoms.append(batch.num_atoms)
        return self.pot.evaluate(batch, graph)


def test_chunks_respect_budget_and_match_single_calls():
    from eqv2_calc.calculator import predict_batch

    calc = calculator("eqv2_tiny_l4m2")
    systems = _systems(7)
    single = [calc.predict_batch([a])[0] for a in systems]
    spy = _Spy(calc.potential)
    budget = 30  # 8- and 12-atom slabs: two or three per call
    results = predict_batch(spy, systems, max_atoms=budget, max_edges=None)
    assert spy.graph_atoms == [len(a) for a in systems]  # one graph per structure, never the whole input
    assert max(spy.call_atoms) <= budget and sum(spy.call_atoms) == sum(len(a) for a in systems)
    assert len(spy.call_atoms) > 1
    for r, s in zip(results, single):
        assert r["energy"] == pytest.approx(s["energy"], abs=1e-5)
        np.testing.assert_allclose(r["forces"], s["forces"], atol=1e-5)


def test_edge_budget_limits_each_call():
    from eqv2_calc.calculator import predict_batch

    calc = calculator("eqv2_tiny_l4m2")
    systems = _systems(4)
    edges = [int(calc.potential.graph(_batch(a)).num_edges.sum()) for a in systems]
    spy = _Spy(calc.potential)
    predict_batch(spy, systems, max_atoms=None, max_edges=max(edges) + min(edges) - 1)  # never two per call
    assert spy.call_atoms == [len(a) for a in systems]


def _batch(atoms):
    from eqv2_calc.graph import atoms_to_batch

    return atoms_to_batch([atoms])


def test_out_of_memory_halves_the_chunk():
    from eqv2_calc.calculator import predict_batch

    calc = calculator("eqv2_tiny_l4m2")
    systems = _systems(6)
    ref = predict_batch(calc.potential, systems)
    spy = _Spy(calc.potential, oom_above=25)
    results = predict_batch(spy, systems)
    assert max(spy.call_atoms) <= 25
    for r, s in zip(results, ref):
        assert r["energy"] == pytest.approx(s["energy"], abs=1e-5)
    with pytest.raises(RuntimeError, match="out of memory"):  # one structure that never fits: re-raised
        predict_batch(_Spy(calc.potential, oom_above=5), systems[:1])


def test_errors_name_the_structure():
    calc = calculator("eqv2_tiny_l4m2")
    good = _systems(2)
    bad = Atoms("CuU", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(UnsupportedElementError, match="structure 2"):
        calc.predict_batch(good + [bad])
    close = Atoms("Cu2", positions=[[0, 0, 0], [0.05, 0, 0]])
    with pytest.raises(InputError, match="structure 1"):
        calc.predict_batch([good[0], close])

"""The Potential interface: ASEPotential's share/copy/fresh policies, resolve_potential, and
the explicit capabilities the relaxer relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from eqv2_calc.errors import InputError
from eqv2_calc.graph import atoms_to_batch
from eqv2_calc.potential import ASEPotential, Potential, resolve_potential
from eqv2_calc.relax import relax_batch
from eqv2_calc.relax.testing import slab_systems


class Harmonic(Calculator):
    """A third-party-style calculator (not from ase.calculators): E = Σ |r - r_ref|²/2 per atom;
    records which instance evaluated what."""

    implemented_properties = ("energy", "forces")
    log: list["Harmonic"] = []  # the instances that evaluated, in order (kept alive: ids stay unique)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.positions - self.atoms.positions.mean(axis=0)
        Harmonic.log.append(self)
        self.results = {"energy": 0.5 * float((d**2).sum()), "forces": -d}


def test_auto_policy_copies_ase_calculators_and_shares_others():
    assert ASEPotential(EMT()).policy == "copy"
    assert ASEPotential(Harmonic()).policy == "share"
    assert ASEPotential(factory=EMT).policy == "fresh"
    with pytest.raises(InputError, match="policy"):
        ASEPotential(EMT(), policy="sometimes")
    with pytest.raises(InputError, match="calculator"):
        ASEPotential()


@pytest.mark.parametrize("policy", ["share", "copy", "fresh"])
def test_policies_decide_which_calculator_evaluates(policy):
    calc = Harmonic()
    pot = ASEPotential(calc, policy=policy)
    systems = slab_systems(2, sizes=((2, 2, 3), (2, 2, 2)))
    for key, atoms in enumerate(systems):
        pot.attach(key, atoms)
    batch = atoms_to_batch(systems)
    Harmonic.log.clear()
    for _ in range(2):
        batch.positions += 0.01
        pot(batch, [0, 1])
    ids = [id(c) for c in Harmonic.log]
    assert len(ids) == 4
    if policy == "share":
        assert set(ids) == {id(calc)}
    elif policy == "copy":  # one private calculator per structure, kept between calls
        assert id(calc) not in ids and ids[0] == ids[2] and ids[1] == ids[3] and ids[0] != ids[1]
    else:  # a new calculator for every evaluation
        assert id(calc) not in ids and len(set(ids)) == 4


def test_results_do_not_depend_on_the_policy():
    systems = slab_systems(3)
    batch = atoms_to_batch(systems)
    ref_e = [a.copy() for a in systems]
    expected = []
    for a in ref_e:
        a.calc = EMT()
        expected.append(a.get_potential_energy())
    for policy in ("share", "copy", "fresh"):
        e, f = ASEPotential(EMT(), policy=policy)(batch)
        np.testing.assert_allclose(e.numpy(), expected, atol=1e-10)
        assert f.shape == (batch.num_atoms, 3) and f.dtype == torch.float64


def test_resolve_potential_and_capabilities():
    pot = ASEPotential(EMT())
    assert resolve_potential(pot) is pot

    class CalculatorLike:
        potential = pot

    assert resolve_potential(CalculatorLike()) is pot
    assert isinstance(resolve_potential(EMT()), ASEPotential)
    with pytest.raises(InputError, match="force provider"):
        resolve_potential(lambda batch: None)  # a bare callable: subclass Potential instead
    assert not pot.counts_edges
    with pytest.raises(InputError, match="max_atoms"):
        pot.count_edges(atoms_to_batch(slab_systems(1)))


def test_relaxer_attaches_and_releases_every_structure_once():
    events: list[tuple[str, int]] = []

    class Recording(Potential):
        def __init__(self):
            self.inner = ASEPotential(EMT())

        def attach(self, key, atoms):
            events.append(("attach", key))
            self.inner.attach(key, atoms)

        def release(self, key):
            events.append(("release", key))
            self.inner.release(key)

        def __call__(self, batch, keys=None):
            assert keys is not None and len(keys) == batch.num_systems
            return self.inner(batch, keys)

    systems = slab_systems(4)
    results = relax_batch(systems, Recording(), max_atoms=30, progress=False)
    assert all(r.converged for r in results)
    for k in range(4):
        assert events.count(("attach", k)) == 1 and events.count(("release", k)) == 1
        assert events.index(("attach", k)) < events.index(("release", k))

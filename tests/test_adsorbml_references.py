"""Adsorption energies (OC20 scheme): gas references, conventions, E_ads against hand computations.

Truth is computed here independently of adsorbml.references: EMT molecules relaxed with
LBFGS (the module uses BFGS), slabs and adslabs relaxed in the test, and the formula
E_ads = E(adslab) − E(slab) − Σ n ε written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from adsorbml.errors import AdsorbMLError, InputError
from adsorbml.references import (
    GasReferences,
    adsorbate_composition,
    adsorption_energies,
    adsorption_energy,
    convention_of,
    gas_reference_energy,
    parse_convention,
    reference_offset,
)
from adsorbml.testing import ReferencedEMT

DATA = Path(__file__).parent / "data"


def _relax(atoms: Atoms, fmax: float) -> float:
    atoms.calc = EMT()
    assert LBFGS(atoms, logfile=None).run(fmax=fmax, steps=1000), f"{atoms.get_chemical_formula()} did not relax"
    return float(atoms.get_potential_energy())


@pytest.fixture(scope="module")
def emt_molecules() -> dict[str, float]:
    """Relaxed EMT energies of H2, H2O, CO, N2 (eV), computed without the module."""
    out = {}
    for m in ("H2", "H2O", "CO", "N2"):
        a = molecule(m)
        a.center(vacuum=8.0)
        a.pbc = False
        out[m] = _relax(a, fmax=0.001)
    return out


@pytest.fixture(scope="module")
def emt_refs() -> GasReferences:
    return GasReferences.computed(EMT())


def _pt111() -> Atoms:
    """Pt(111) 3×3×4, OC20-style tags: top two layers 1, bottom two 0 (fixed)."""
    slab = fcc111("Pt", (3, 3, 4), vacuum=10.0)
    layer = slab.get_tags()  # ase: 1 = top layer ... 4 = bottom
    tags = np.where(layer <= 2, 1, 0)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    return slab


@pytest.fixture(scope="module")
def pt_slab() -> tuple[Atoms, float]:
    slab = _pt111()
    return slab, _relax(slab, fmax=0.01)


def _adslab(slab: Atoms, name: str) -> Atoms:
    ads = {"O": Atoms("O"), "OH": Atoms("OH", positions=[(0, 0, 0), (0, 0, 0.97)]),
           "CO": Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)])}[name]
    ads.set_tags(2)
    site, height = ("ontop", 1.9) if name == "CO" else ("fcc", 1.2)
    a = slab.copy()
    add_adsorbate(a, ads, height, site)
    return a


# ---------------------------------------------------------------------- reference sets


def test_oc20_constants_exact():
    refs = GasReferences.oc20()
    assert refs.epsilon == {"H": -3.477, "C": -7.282, "N": -8.083, "O": -7.204}
    assert refs.name == "oc20" and "RPBE" in refs.calculator and refs.molecule_energies is None
    assert refs["O"] == -7.204


def test_formulas_from_molecule_energies():
    e = {"H2": -6.9, "H2O": -14.2, "CO": -14.8, "N2": -16.6}
    refs = GasReferences.from_molecule_energies(e, calculator="made-up")
    eps = refs.epsilon
    assert eps["H"] == pytest.approx(-3.45) and eps["O"] == pytest.approx(-7.3)
    assert eps["C"] == pytest.approx(-7.5) and eps["N"] == pytest.approx(-8.3)
    # the reactions are reproduced: each molecule's Σ ε equals its energy
    assert 2 * eps["H"] == pytest.approx(e["H2"])
    assert 2 * eps["H"] + eps["O"] == pytest.approx(e["H2O"])
    assert eps["C"] + eps["O"] == pytest.approx(e["CO"])
    assert 2 * eps["N"] == pytest.approx(e["N2"])
    with pytest.raises(InputError, match="N2"):
        GasReferences.from_molecule_energies({k: v for k, v in e.items() if k != "N2"})


def test_computed_with_emt_matches_independent_molecules(emt_refs, emt_molecules):
    for m, e in emt_molecules.items():
        assert emt_refs.molecule_energies[m] == pytest.approx(e, abs=1e-3)
    assert emt_refs.name == "computed" and emt_refs.calculator == "EMT"
    assert emt_refs.details["pbc"] is False and set(emt_refs.details["steps"]) == {"H2", "H2O", "CO", "N2"}


def test_computed_accepts_a_factory_and_fails_loudly(emt_refs):
    assert GasReferences.computed(EMT).epsilon == pytest.approx(emt_refs.epsilon, abs=1e-9)
    with pytest.raises(AdsorbMLError, match="H2 did not relax"):
        GasReferences.computed(EMT(), steps=0)
    with pytest.raises(InputError, match="optimizer"):
        GasReferences.computed(EMT(), optimizer="FIRE")


def test_json_round_trip(emt_refs):
    for refs in (GasReferences.oc20(), emt_refs):
        back = GasReferences.from_dict(json.loads(json.dumps(refs.to_dict())))
        assert back == refs
    with pytest.raises(InputError, match="schema"):
        GasReferences.from_dict({"epsilon_eV": {}})


def test_compositions_and_unsupported_elements():
    assert adsorbate_composition("CH2OH") == {"C": 1, "H": 3, "O": 1}
    assert adsorbate_composition([8, 1]) == {"O": 1, "H": 1}
    assert adsorbate_composition({"C": 1, "O": 1}) == {"C": 1, "O": 1}
    assert gas_reference_energy("OH", GasReferences.oc20()) == pytest.approx(-7.204 - 3.477)
    with pytest.raises(InputError, match=r"S have no OC20 gas reference; supported: H, C, N, O"):
        adsorbate_composition("SH")
    slab = _pt111()
    with pytest.raises(InputError, match="tag 2"):
        adsorbate_composition(slab)
    pt_ads = slab.copy()
    pt_ads.set_tags(2)
    with pytest.raises(InputError, match="Pt"):
        adsorbate_composition(pt_ads)


# ---------------------------------------------------------------------- E_ads


@pytest.mark.parametrize("name", ["O", "OH", "CO"])
def test_emt_adsorption_energy_matches_hand_computation(name, pt_slab, emt_molecules, emt_refs):
    slab, e_slab = pt_slab
    adslab = _adslab(slab, name)
    e_adslab = _relax(adslab, fmax=0.02)
    m = emt_molecules
    eps_h, eps_o = m["H2"] / 2, m["H2O"] - m["H2"]
    gas = {"O": eps_o, "OH": eps_o + eps_h, "CO": (m["CO"] - eps_o) + eps_o}[name]
    hand = e_adslab - e_slab - gas
    got = adsorption_energy(e_adslab, "total", slab_energy=e_slab, adsorbate=adslab, refs=emt_refs)
    assert got == pytest.approx(hand, abs=1e-3)
    # the explicit composition gives the same
    assert adsorption_energy(e_adslab, "total", e_slab, name, emt_refs) == got
    # the referenced stand-in on the same structure gives the same E_ads directly
    standin = ReferencedEMT(e_slab, emt_refs)
    probe = adslab.copy()
    probe.calc = standin
    e_ref = probe.get_potential_energy()
    assert adsorption_energy(e_ref, convention_of(standin)) == pytest.approx(got, abs=1e-6)
    assert np.allclose(probe.get_forces(apply_constraint=False), adslab.calc.get_forces(), atol=1e-10, rtol=0)


def test_referenced_standin_for_slab(pt_slab, emt_refs):
    slab, e_slab = pt_slab
    standin = ReferencedEMT.for_slab(_pt111(), emt_refs)
    assert standin.slab_energy == pytest.approx(e_slab, abs=1e-6)
    relaxed = slab.copy()
    relaxed.calc = standin
    assert relaxed.get_potential_energy() == pytest.approx(0.0, abs=1e-6)  # no tag-2 atoms
    assert GasReferences.from_dict(standin.metadata["gas_references"]) == emt_refs


def test_vectorised_placements(emt_refs):
    energies = [10.0, None, float("nan"), 12.5]
    out = adsorption_energies(energies, "total", slab_energy=5.0, adsorbate="CO", refs=emt_refs)
    off = 5.0 + emt_refs.epsilon["C"] + emt_refs.epsilon["O"]
    assert out.shape == (4,) and np.isnan(out[1]) and np.isnan(out[2])
    assert out[[0, 3]] == pytest.approx(np.array([10.0, 12.5]) - off, abs=1e-12)
    assert reference_offset("total", 5.0, "CO", emt_refs) == pytest.approx(off)
    assert list(adsorption_energies([-0.5, 0.3], "referenced")) == [-0.5, 0.3]


def test_total_convention_needs_slab_and_refs():
    with pytest.raises(InputError, match="slab_energy"):
        adsorption_energy(-10.0, "total", adsorbate="O", refs=GasReferences.oc20())
    with pytest.raises(InputError, match="refs"):
        adsorption_energy(-10.0, "total", slab_energy=-5.0, adsorbate="O")
    # referenced energies are used as they are; the rest is not needed
    assert adsorption_energy(-1.25, "referenced") == -1.25


# ---------------------------------------------------------------------- conventions


def test_convention_detection_on_ase_calculators():
    emt = EMT()
    assert convention_of(emt) == "total"
    assert convention_of(emt, override="referenced") == "referenced"
    assert convention_of(ReferencedEMT(0.0, GasReferences.oc20())) == "referenced"
    assert convention_of(ReferencedEMT(0.0, GasReferences.oc20()), override="total") == "total"
    assert parse_convention("Total energy (linear element references added)") == "total"

    class Odd(EMT):
        metadata = {"energy_convention": "formation energy"}

    with pytest.raises(InputError, match="formation energy"):
        convention_of(Odd())
    assert convention_of(Odd(), override="total") == "total"
    with pytest.raises(InputError, match="expected a string starting with 'referenced' or 'total'"):
        convention_of(emt, override="relative")


def test_convention_detection_on_equiformer_checkpoints():
    from eqv2_calc import EquiformerV2Calculator

    shipped = EquiformerV2Calculator(device="cpu")
    assert shipped.metadata["energy_convention"].startswith("total")
    assert convention_of(shipped) == "total"
    oc20 = EquiformerV2Calculator(DATA / "eqv2_tiny_l4m2.pt", device="cpu")
    assert oc20.metadata["energy_convention"].startswith("referenced")
    assert convention_of(oc20) == "referenced"
    assert convention_of(oc20, override="total") == "total"

"""Bad input gets a clear, specific error (or the documented result)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111

from conftest import DATA, calculator
from eqv2_calc.errors import InputError, UnsupportedElementError


def _energy(atoms):
    atoms.calc = calculator("eqv2_tiny_l4m2")
    return atoms.get_potential_energy()


def test_empty_atoms():
    with pytest.raises(InputError, match="empty Atoms"):
        _energy(Atoms())


def test_nan_positions():
    atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    atoms.positions[3, 1] = np.nan
    with pytest.raises(InputError, match=r"non-finite positions for atoms \[3\]"):
        _energy(atoms)


def test_element_beyond_max_num_elements():
    atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    atoms.numbers[0] = 92  # U; the OC20 models embed Z < 90
    with pytest.raises(UnsupportedElementError, match=r"\[92\].*1\.\.89"):
        _energy(atoms)


def test_atoms_too_close():
    atoms = Atoms("CuCu", positions=[[0, 0, 0], [0.05, 0, 0]], cell=[10, 10, 10], pbc=True)
    with pytest.raises(InputError, match="0.0500 Å apart"):
        _energy(atoms)


def test_pbc_with_zero_cell_vector():
    atoms = Atoms("CuO", positions=[[0, 0, 0], [1.8, 0, 0]], cell=[5, 5, 0], pbc=True)
    with pytest.raises(InputError, match="cell vector 2 is zero"):
        _energy(atoms)


def test_lone_atom_gets_isolated_atom_energy_and_zero_force():
    """Documented: no neighbours within the cutoff → the model's isolated-atom energy, zero force.

    (fairchem crashes on a graph without edges.) The energy depends only on the element."""
    calc = calculator("eqv2_tiny_l4m2")
    res = calc.predict_batch([
        Atoms("Cu", positions=[[0, 0, 0]]),
        Atoms("Cu", positions=[[1, 2, 3]], cell=[30, 30, 30], pbc=True),
        Atoms("O", positions=[[0, 0, 0]]),
    ])
    assert np.isfinite(res[0]["energy"])
    assert np.all(res[0]["forces"] == 0)
    assert res[0]["energy"] == res[1]["energy"]
    assert res[0]["energy"] != res[2]["energy"]


def test_not_atoms():
    with pytest.raises(InputError, match="expected ase.Atoms"):
        calculator("eqv2_tiny_l4m2").predict_batch(["not atoms"])


def test_bad_dtype():
    from eqv2_calc import EquiformerV2Calculator

    with pytest.raises(InputError, match="float32"):
        EquiformerV2Calculator(DATA / "eqv2_tiny_l4m2.pt", dtype="bfloat16")

"""adsorbml.adsorbates and adsorbml.inputs: table lookup, errors, OC20 slab conventions."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc100, fcc111, molecule
from ase.constraints import FixAtoms

from adsorbml.adsorbates import adsorbate_from_atoms, available_adsorbates, get_adsorbate
from adsorbml.errors import InputError, UnknownAdsorbateError
from adsorbml.inputs import load_slab, prepare_slab, slabs_from_bulk

REQUIRED = ["*H", "*O", "*OH", "*OH2", "*C", "*CH", "*CH2", "*CH3", "*N", "*NH", "*NH2", "*NH3",
            "*CO", "*COH", "*CHO", "*NO"]


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_adsorbates(name):
    ads = get_adsorbate(name)
    formula = name[1:]
    # composition matches the name (e.g. *OH2 = 1 O + 2 H)
    expected = Atoms(formula).get_chemical_formula()
    assert ads.atoms.get_chemical_formula() == expected
    b = ads.binding_indices[0]
    assert ads.atoms[b].symbol == formula[0]  # binds through the first-named atom, as in OC20
    assert np.allclose(ads.atoms.positions[b], 0.0)
    assert np.all(ads.atoms.positions[:, 2] >= -1e-9)  # molecule points away from the surface
    if len(ads) > 1:
        d = ads.atoms.get_all_distances() + 10 * np.eye(len(ads))
        # every atom has a bonded partner at a chemical distance (X–H ≈ 0.96–1.11, C–O/N–O/O–O 1.15–1.45)
        assert np.all((d.min(axis=1) > 0.9) & (d.min(axis=1) < 1.5))


def test_name_without_star_and_unknown_name():
    assert get_adsorbate("CO").name == "*CO"
    with pytest.raises(UnknownAdsorbateError) as e:
        get_adsorbate("*Unobtainium")
    assert "*CO" in str(e.value) and "*Unobtainium" in str(e.value)
    assert "*CO" in available_adsorbates()
    with pytest.raises(InputError):
        get_adsorbate("")


def test_user_adsorbate_needs_binding_indices():
    co = molecule("CO")  # ASE lists O first, C second
    ads = adsorbate_from_atoms(co, [1])
    assert ads.atoms[ads.binding_indices[0]].symbol == "C"
    with pytest.raises(InputError, match="out of range"):
        adsorbate_from_atoms(co, [2])
    with pytest.raises(InputError, match="at least one"):
        adsorbate_from_atoms(co, [])


def test_prepare_ase_slab_retags_and_fixes():
    slab = fcc111("Pt", size=(3, 3, 4), vacuum=10.0)  # ASE tags: 1 = top layer ... 4 = bottom
    rec = prepare_slab(slab)
    a = rec.atoms
    tags = a.get_tags()
    top_z = a.positions[:, 2].max()
    # Pt(111) layer spacing 2.26 Å > 2 Å: only the top layer is surface
    assert np.array_equal(tags == 1, np.isclose(a.positions[:, 2], top_z))
    assert (tags == 1).sum() == 9 and (tags == 0).sum() == 27
    fixed = a.constraints[0]
    assert isinstance(fixed, FixAtoms)
    assert sorted(fixed.get_indices().tolist()) == np.flatnonzero(tags == 0).tolist()
    assert rec.info["tiling"] == [1, 1]  # |a| = 3 × 2.77 = 8.3 Å ≥ 8 Å


def test_tiling_to_8_angstrom():
    rec = prepare_slab(fcc100("Cu", size=(2, 3, 3), vacuum=10.0))  # |a| = 5.1, |b| = 7.7 Å
    la, lb, _ = rec.atoms.cell.lengths()
    assert rec.info["tiling"] == [2, 2] and la >= 8 and lb >= 8
    assert len(rec.atoms) == 2 * 3 * 3 * 4


def test_load_slab_from_file(tmp_path):
    path = tmp_path / "cu.traj"
    fcc111("Cu", size=(4, 4, 3), vacuum=8.0).write(path)
    rec = load_slab(path)
    assert rec.slab_id == "cu" and (rec.atoms.get_tags() == 1).sum() == 16


def test_bad_slabs():
    slab = fcc111("Pt", size=(3, 3, 3), vacuum=10.0)
    with pytest.raises(InputError, match="vacuum"):
        prepare_slab(fcc111("Pt", size=(3, 3, 3), vacuum=1.0))
    tilted = slab.copy()
    tilted.rotate(30, "x", rotate_cell=True)
    with pytest.raises(InputError, match="xy plane"):
        prepare_slab(tilted)
    with pytest.raises(InputError, match="non-empty"):
        prepare_slab(Atoms())
    with pytest.raises(InputError, match="not OC20 tags"):
        prepare_slab(slab, retag=False)
    with pytest.raises(FileNotFoundError):
        load_slab("/nonexistent/slab.traj")


def test_slabs_from_bulk_pt111():
    recs = slabs_from_bulk(bulk("Pt", "fcc", a=3.92, cubic=True), (1, 1, 1))
    assert len(recs) == 1
    a = recs[0].atoms
    cell = np.asarray(a.cell)
    assert abs(cell[0, 2]) < 1e-8 and abs(cell[1, 2]) < 1e-8 and cell[2, 0] == cell[2, 1] == 0
    la, lb, lc = a.cell.lengths()
    assert la >= 8 and lb >= 8
    z = a.positions[:, 2]
    assert z.max() - z.min() >= 7.0 - 1e-6  # min slab 7 Å
    assert lc - (z.max() - z.min()) >= 20.0 - 1e-6  # vacuum 20 Å
    # nearest-neighbour distance of Pt is a/√2 = 2.772 Å: the slab is an undistorted fcc cut
    d = a.get_all_distances(mic=True) + 100 * np.eye(len(a))
    assert d.min() == pytest.approx(3.92 / np.sqrt(2), abs=1e-3)
    tags = a.get_tags()
    assert np.array_equal(tags == 1, z >= z.max() - 2.0)
    assert recs[0].millers == (1, 1, 1)
    with pytest.raises(InputError, match="not all zero"):
        slabs_from_bulk(bulk("Pt", "fcc", a=3.92), (0, 0, 0))

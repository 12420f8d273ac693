"""adsorbml.placements: clearance (minimum image), binding atom on its site, seeds, site modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import fcc100, fcc111
from ase.data import covalent_radii

from adsorbml.errors import InputError
from adsorbml.inputs import prepare_slab
from adsorbml.placements import generate_placements, heuristic_sites, random_sites

GAP = 0.1


@pytest.fixture(scope="module")
def pt111():
    return prepare_slab(fcc111("Pt", size=(3, 3, 3), vacuum=10.0))  # a = 3.92 Å, 9 surface atoms


@pytest.fixture(scope="module")
def co_placements(pt111):
    return generate_placements(pt111, "*CO", num_random=30, seed=7)


def _clearances(atoms, gap=GAP):
    """(distance − (r_a + r_s + gap)) for every adsorbate–slab pair, minimum image (brute force)."""
    ads = np.flatnonzero(atoms.get_tags() == 2)
    slab = np.flatnonzero(atoms.get_tags() != 2)
    out = []
    for i in ads:
        d = atoms.get_distances(i, slab, mic=True)
        out.append(d - covalent_radii[atoms.numbers[i]] - covalent_radii[atoms.numbers[slab]] - gap)
    return np.array(out)


def _in_plane_equal(cell, p, q, tol=1e-8):
    frac = np.linalg.solve(np.asarray(cell)[:2, :2].T, (p - q)[:2])
    return np.allclose(frac - np.round(frac), 0.0, atol=tol)


@pytest.mark.parametrize("ads", ["*CO", "*OH2", "*CH3", "*O"])
def test_no_overlap_and_tight(pt111, ads):
    placements = generate_placements(pt111, ads, num_random=15, seed=3)
    for p in placements:
        c = _clearances(p.atoms)
        assert c.min() >= -1e-9, p.config_id  # never closer than covalent sum + gap
        assert c.min() < 1e-6, p.config_id  # closed-form height: touching, not floating


def test_full_rotation_no_overlap(pt111):
    for p in generate_placements(pt111, "*COH", num_random=20, heuristic=False, rotation="full", seed=1):
        assert _clearances(p.atoms).min() >= -1e-9


def test_binding_atom_on_site_and_tags(pt111, co_placements):
    n = len(pt111.atoms)
    for p in co_placements:
        a = p.atoms
        assert len(a) == n + 2
        assert a.get_tags()[n:].tolist() == [2, 2]
        assert np.array_equal(a.get_tags()[:n], pt111.atoms.get_tags())
        assert p.binding_index == n and a[p.binding_index].symbol == "C"
        assert _in_plane_equal(a.cell, a.positions[p.binding_index], p.site)
        assert sorted(a.constraints[0].get_indices().tolist()) == np.flatnonzero(a.get_tags() == 0).tolist()
        # tilt ≤ 20°: the C→O axis stays within 20° of the surface normal
        axis = a.positions[n + 1] - a.positions[n]
        assert math.degrees(math.acos(axis[2] / np.linalg.norm(axis))) <= 20.0 + 1e-9


def test_same_seed_same_output(pt111, co_placements):
    again = generate_placements(pt111, "*CO", num_random=30, seed=7)
    assert [p.config_id for p in again] == [p.config_id for p in co_placements]
    for p, q in zip(again, co_placements):
        assert np.array_equal(p.atoms.positions, q.atoms.positions)
    other = generate_placements(pt111, "*CO", num_random=30, seed=8)
    rand = [i for i, p in enumerate(other) if p.config_id.startswith("rand")]
    assert not np.allclose(other[rand[0]].atoms.positions, co_placements[rand[0]].atoms.positions)


def test_heuristic_sites_pt111(pt111):
    sites = heuristic_sites(pt111.atoms)
    kinds = [k for k, _ in sites]
    # fcc(111): one ontop, one bridge, two hollows (fcc and hcp)
    assert kinds == ["ontop", "bridge", "hollow", "hollow"]
    surf = pt111.atoms.positions[pt111.atoms.get_tags() == 1]
    a = pt111.atoms.cell

    def dxy(site):  # in-plane minimum-image distances to the surface atoms
        return sorted(
            min(np.linalg.norm((s - site)[:2] + i * a[0, :2] + j * a[1, :2]) for i in (-1, 0, 1) for j in (-1, 0, 1))
            for s in surf
        )

    nn = 3.92 / math.sqrt(2)
    assert dxy(sites[0][1])[0] == pytest.approx(0.0, abs=1e-6)  # ontop: above an atom
    assert dxy(sites[1][1])[:2] == pytest.approx([nn / 2] * 2, abs=1e-6)  # bridge: midway between two
    for _, s in sites[2:]:
        assert dxy(s)[:3] == pytest.approx([nn / math.sqrt(3)] * 3, abs=1e-6)  # hollow: centre of a triangle


def test_heights_hand_computed(pt111):
    """*O on Pt(111): R = r_O + r_Pt + gap = 0.66 + 1.36 + 0.1 = 2.12 Å.

    ontop: the atom below is at d_xy = 0 → h = z_top + 2.12.
    hollow: three atoms at d_xy = 2.772/√3 = 1.6004 → h = z_top + √(2.12² − 1.6004²) = z_top + 1.3905.
    """
    placements = generate_placements(pt111, "*O", num_random=0, seed=0)
    z_top = pt111.atoms.positions[:, 2].max()
    R = covalent_radii[8] + covalent_radii[78] + GAP
    assert R == pytest.approx(2.12)
    by_kind = {p.site_kind: p.atoms.positions[-1, 2] - z_top for p in placements}
    assert by_kind["ontop"] == pytest.approx(R, abs=1e-9)
    assert by_kind["hollow"] == pytest.approx(math.sqrt(R**2 - (3.92 / math.sqrt(2) / math.sqrt(3)) ** 2), abs=1e-9)
    assert [p.config_id for p in placements] == ["heur0", "heur1", "heur2", "heur3"]


def test_random_sites_uniform_in_area():
    slab = prepare_slab(fcc100("Cu", size=(3, 3, 3), vacuum=10.0))
    cell = np.asarray(slab.atoms.cell)
    sites = random_sites(slab.atoms, 4000, np.random.default_rng(0))
    frac = np.linalg.solve(cell[:2, :2].T, sites[:, :2].T).T
    assert np.all((frac >= 0) & (frac < 1))
    counts, _, _ = np.histogram2d(frac[:, 0], frac[:, 1], bins=4, range=[[0, 1], [0, 1]])
    # 16 equal-area bins, 250 expected each; 5σ ≈ 5·√250 ≈ 79
    assert np.all(np.abs(counts - 250) < 80)
    # heights lie between the lowest and highest surface (tag-1) atom
    zs = slab.atoms.positions[slab.atoms.get_tags() == 1, 2]
    assert np.all((sites[:, 2] >= zs.min() - 1e-9) & (sites[:, 2] <= zs.max() + 1e-9))


def test_random_only_and_counts(pt111):
    placements = generate_placements(pt111, "*OH", num_random=12, heuristic=False, seed=0)
    assert [p.config_id for p in placements] == [f"rand{i}" for i in range(12)]
    assert all(p.site_kind == "random" for p in placements)
    aug = generate_placements(pt111, "*OH", num_random=0, augmentations=3, seed=0)
    assert len(aug) == 12  # 4 sites × 3 orientations


def test_bad_options(pt111):
    with pytest.raises(InputError, match="gap"):
        generate_placements(pt111, "*O", gap=-1)
    with pytest.raises(InputError, match="nothing to place"):
        generate_placements(pt111, "*O", heuristic=False, num_random=0)
    with pytest.raises(InputError, match="rotation mode"):
        generate_placements(pt111, "*CO", rotation="spin", heuristic=False, num_random=1)


def test_untile_pymatgen_slab_with_boundary_rounding():
    """pymatgen slabs put atoms at fractional 1/na − ε; the repeat unit must still be found."""
    from ase.build import bulk

    from adsorbml.inputs import slabs_from_bulk
    from adsorbml.placements import _untile

    rec = slabs_from_bulk(bulk("Pt"), (1, 1, 1))[0]
    na, nb = rec.info["tiling"]
    unit = _untile(rec.atoms, (na, nb))
    assert len(unit) * na * nb == len(rec.atoms)
    assert np.allclose(unit.cell[0] * na, rec.atoms.cell[0]) and np.allclose(unit.cell[1] * nb, rec.atoms.cell[1])

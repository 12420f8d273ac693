"""adsorbml.anomalies on constructed structures; thresholds checked against hand-computed cutoffs."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111

from adsorbml.anomalies import (
    bond_cutoff,
    connectivity,
    detect_anomalies,
    has_surface_changed,
    is_desorbed,
    is_dissociated,
    is_intercalated,
)
from adsorbml.errors import InputError
from adsorbml.inputs import prepare_slab


@pytest.fixture(scope="module")
def slab():
    return prepare_slab(fcc111("Pt", size=(3, 3, 3), vacuum=10.0)).atoms  # Pt–Pt 2.772 Å


def co_on_top(slab, height=1.9, co=1.15):
    """CO upright above the first top-layer Pt atom (C at ``height`` Å above it)."""
    top = np.flatnonzero(slab.get_tags() == 1)[0]
    p = slab.positions[top]
    a = slab.copy()
    a.extend(Atoms("CO", positions=[p + (0, 0, height), p + (0, 0, height + co)], tags=[2, 2]))
    return a


def test_cutoffs_match_the_adsorbml_numbers():
    # r_cov: C 0.76, O 0.66, Pt 1.36, Cu 1.32 (ASE); + 0.6 Å total skin
    assert bond_cutoff(6, 8, 1.0) == pytest.approx(2.02)
    assert bond_cutoff(6, 78, 1.5) == pytest.approx(3.78)
    assert bond_cutoff(78, 78, 1.0) == pytest.approx(3.32)
    assert bond_cutoff(78, 78, 1.5) == pytest.approx(4.68)
    assert bond_cutoff(29, 29, 1.0) == pytest.approx(3.24)


def test_connectivity_pbc_and_threshold():
    # two H atoms 1.2 Å apart across a periodic boundary; H–H cutoff at m=1: 0.62 + 0.6 = 1.22 Å
    a = Atoms("H2", positions=[[0.1, 0, 0], [8.9, 0, 0]], cell=[10, 10, 10], pbc=True)
    assert connectivity(a, 1.0)[0, 1]
    a.pbc = False
    assert not connectivity(a, 1.0)[0, 1]


def test_clean_placement_has_no_anomaly(slab):
    a = co_on_top(slab)
    rep = detect_anomalies(a, a, reference_slab=slab)
    assert not rep.is_anomalous and rep.reason == "ok"
    assert set(rep.flags) == {"dissociated", "desorbed", "surface_changed", "intercalated"}


def test_dissociation(slab):
    init = co_on_top(slab)
    final = init.copy()
    final.positions[-1, 2] += 1.0  # C–O 2.15 Å > 2.02 Å cutoff
    assert is_dissociated(init, final)
    near = init.copy()
    near.positions[-1, 2] += 0.85  # C–O 2.00 Å < 2.02 Å: still bonded
    assert not is_dissociated(init, near)
    # a bond *formed* also counts (graph changed)
    assert is_dissociated(final, init)
    assert detect_anomalies(init, final, slab).reason == "dissociated"


def test_desorption_threshold(slab):
    # C straight above a Pt atom; the next Pt atoms are ≥ √(2.772² + h²) away.
    # C–Pt cutoff at m = 1.5: 1.5 (0.76 + 1.36) + 0.6 = 3.78 Å; O is further away.
    init = co_on_top(slab)
    assert not is_desorbed(co_on_top(slab, height=3.70))
    assert is_desorbed(co_on_top(slab, height=3.86))
    rep = detect_anomalies(init, co_on_top(slab, height=6.0), slab)
    assert rep.reasons == ["desorbed"]


def test_intercalation(slab):
    # an H atom put 1.0 Å above a subsurface (tag-0) Pt atom is bonded to it
    # (cutoff m=1: 0.31 + 1.36 + 0.6 = 2.27 Å)
    sub = np.flatnonzero(slab.get_tags() == 0)
    p = slab.positions[sub[sub.size - 1]]  # second layer
    a = slab.copy()
    a.extend(Atoms("H", positions=[p + (0, 0, 1.0)], tags=[2]))
    assert is_intercalated(a)
    assert not is_intercalated(co_on_top(slab))


def test_surface_change(slab):
    a = co_on_top(slab)
    top = np.flatnonzero(slab.get_tags() == 1)[1]
    small = a.copy()
    small.positions[top, 2] += 0.3  # bonds stretched, not broken
    assert not has_surface_changed(small, slab)
    # Lift a surface atom by δ. Its in-layer bonds become √(2.772² + δ²), its bonds to the three
    # second-layer atoms √(1.6004² + (2.2632 + δ)²) (in-plane offset 2.772/√3, layer spacing 3.92/√3).
    # Broken iff > 4.68 Å (Pt–Pt at m = 1.5): the second-layer bonds break first, at δ > 2.135 Å.
    for delta, changed in [(2.0, False), (2.3, True), (4.0, True)]:
        moved = a.copy()
        moved.positions[top, 2] += delta
        assert has_surface_changed(moved, slab) is changed, delta
    with pytest.raises(InputError, match="does not match"):
        has_surface_changed(a, slab[:-1])


def test_bad_input(slab):
    with pytest.raises(InputError, match="tag 2"):
        is_desorbed(slab)
    with pytest.raises(InputError, match="unknown anomaly"):
        detect_anomalies(co_on_top(slab), co_on_top(slab), slab, checks=["melted"])
    with pytest.raises(InputError, match="reference_slab"):
        detect_anomalies(co_on_top(slab), co_on_top(slab), None)

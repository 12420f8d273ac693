"""adsorbml.export: ranking, VASP/extxyz export; adsorbml.single_points: in-process single points."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.io import read

from adsorbml.export import export_top_k, surface_kpoints
from adsorbml.ranking import MLResult, rank_valid
from adsorbml.single_points import run_single_points
from adsorbml.inputs import prepare_slab
from adsorbml.placements import generate_placements


@pytest.fixture(scope="module")
def placements():
    slab = prepare_slab(fcc111("Pt", size=(3, 3, 3), vacuum=10.0))
    return generate_placements(slab, "*CO", num_random=4, heuristic=False, seed=0)


def test_rank_valid_sorts_and_filters(placements):
    a = placements[0].atoms
    res = [
        MLResult("rand0", a, -1.0),
        MLResult("rand1", a, -3.0, anomaly="desorbed"),
        MLResult("rand2", a, -2.0),
        MLResult("rand3", a, float("nan")),
        MLResult("heur0", a, -2.0),  # tie with rand2 → broken by config_id
    ]
    assert [r.config_id for r in rank_valid(res)] == ["heur0", "rand2", "rand0"]
    assert [r.config_id for r in rank_valid(res, k=1)] == ["heur0"]


def test_surface_kpoints_hand_computed():
    slab = fcc111("Pt", size=(3, 3, 3), vacuum=10.0)
    # a = (8.316, 0, 0) → ‖a‖∞ = 8.316, 40/8.316 = 4.81 → 5;  b = (4.158, 7.201, 0) → 40/7.201 = 5.55 → 6
    assert surface_kpoints(slab) == (5, 6, 1)


def test_export_top_k(tmp_path, placements):
    res = [MLResult(p.config_id, p.atoms, e) for p, e in zip(placements, [-1.0, -4.0, -2.0, -3.0])]
    paths = export_top_k({"sysA": res}, tmp_path, k=2)
    assert [p.name for p in paths] == ["rand1", "rand3"]
    frames = read(tmp_path / "sysA" / "top_k.extxyz", ":")
    assert [f.info["config_id"] for f in frames] == ["rand1", "rand3"]
    assert [f.info["ml_energy"] for f in frames] == [-4.0, -3.0]
    assert frames[0].get_tags().tolist() == placements[1].atoms.get_tags().tolist()
    d = tmp_path / "sysA" / "rand1"
    poscar = read(d / "POSCAR", format="vasp")
    assert poscar.get_chemical_symbols() == placements[1].atoms.get_chemical_symbols()  # order kept
    assert np.allclose(poscar.positions, placements[1].atoms.positions, atol=1e-6)
    fixed = poscar.constraints[0].get_indices().tolist()
    assert fixed == np.flatnonzero(placements[1].atoms.get_tags() == 0).tolist()
    from pymatgen.io.vasp import Incar, Kpoints, Poscar

    incar = Incar.from_file(d / "INCAR")  # as VASP tooling reads it back
    for key, val in {"NSW": 0, "NELM": 300, "IBRION": 2, "ISIF": 0, "ISYM": 0, "ISPIN": 1, "LREAL": "Auto",
                     "EDIFFG": -0.03, "ENCUT": 350, "SYMPREC": 1e-10, "NCORE": 4, "LWAVE": False,
                     "LAECHG": False}.items():
        assert incar[key] == val, key
    assert str(incar["GGA"]).upper() == "RP"
    kp = Kpoints.from_file(d / "KPOINTS")
    assert kp.style == Kpoints.supported_modes.Monkhorst and tuple(kp.kpts[0]) == (5, 6, 1)
    assert (d / "KPOINTS").read_text().splitlines()[3] == "5 6 1"
    pos = Poscar.from_file(d / "POSCAR")
    assert [s.specie.symbol for s in pos.structure] == placements[1].atoms.get_chemical_symbols()
    fixed = [not any(sd) for sd in pos.selective_dynamics]
    assert np.flatnonzero(fixed).tolist() == np.flatnonzero(placements[1].atoms.get_tags() == 0).tolist()
    assert (tmp_path / "paths.txt").read_text().split() == [str(p) for p in paths]


def test_left_handed_cell_is_fixed(tmp_path):
    a = Atoms("Cu", positions=[[1, 1, 5]], cell=[[0, 9, 0], [9, 0, 0], [0, 0, 20]], pbc=True)
    assert np.linalg.det(a.cell) < 0
    from adsorbml.export import write_vasp_inputs

    write_vasp_inputs(a, tmp_path)
    b = read(tmp_path / "POSCAR", format="vasp")
    assert np.linalg.det(b.cell) > 0 and np.allclose(b.positions, a.positions)


def test_vasp_output_is_read_by_vasp_import_only():
    """The hand-written XML/OUTCAR readers are gone: one reader, adsorbml.vasp_import."""
    from adsorbml import export

    for gone in ("read_vasp_single_point", "count_vasp_steps", "DFTResult"):
        assert not hasattr(export, gone), gone


def test_run_single_points_emt(placements):
    out = run_single_points([p.atoms for p in placements[:2]], EMT(), progress=False)
    for p, r in zip(placements, out):
        ref = p.atoms.copy()
        ref.calc = EMT()
        assert r.energy == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        assert r.ionic_steps == 1 and r.scf_steps is None
    bad = Atoms("Xe", positions=[[0, 0, 0]])  # EMT has no Xe parameters → recorded failure, with its message
    failed = run_single_points([bad], EMT(), progress=False)[0]
    assert failed.energy is None and failed.error.startswith("NotImplementedError") and "Xe" in failed.error

"""Reading finished VASP single points: real VASP output, and the ways a directory can be unusable.

Fixtures: ``data/vasp/Ir12Re4_singlepoint/vasprun.xml`` — a genuine VASP 5.4.4 vasprun.xml
(16-atom Ir12Re4 slab, one ionic step, 22 SCF steps; its final-block ``e_0_energy`` carries
the 5.4.4 bug, −0.00035 eV); and ASE's own test OUTCAR (VASP 5.3.3, 18 atoms, 63 SCF steps,
NELM 120), read from the installed ase package.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from adsorbml.errors import InputError
from adsorbml.vasp_import import (
    DFTResult,
    NoOutputError,
    UnfinishedOutputError,
    read_single_point,
    scan_export_dir,
    split_name,
)

DATA = Path(__file__).parent / "data"
IR12RE4 = DATA / "vasp" / "Ir12Re4_singlepoint"
E_IR12RE4 = -140.07469344  # σ→0, eV (ase and pymatgen agree)


def _ase_outcar() -> Path:
    import ase

    path = Path(ase.__file__).parent / "test" / "testdata" / "vasp" / "OUTCAR_example_1"
    if not path.is_file():
        pytest.skip("ase test data (OUTCAR_example_1) not installed")
    return path


def test_real_vasprun():
    res = read_single_point(IR12RE4)
    assert isinstance(res, DFTResult)
    assert res.energy == pytest.approx(-140.0747, abs=1e-4)
    assert res.energy == pytest.approx(E_IR12RE4, abs=1e-8)  # not the buggy −0.00035 eV
    assert res.force_consistent_energy == pytest.approx(-140.07481103, abs=1e-8)
    assert (res.scf_steps_last, res.scf_steps_total, res.ionic_steps) == (22, 22, 1)
    assert res.natoms == 16 and res.forces.shape == (16, 3) and len(res.atoms) == 16
    assert res.atoms.get_chemical_formula() == "Ir12Re4"
    assert res.nelm == 60 and res.converged is True
    assert res.vasp_version.startswith("5.4.4")
    assert res.atoms.get_potential_energy() == res.energy
    assert np.array_equal(res.atoms.get_forces(apply_constraint=False), res.forces)
    assert res.source == IR12RE4 / "vasprun.xml"
    assert read_single_point(IR12RE4 / "vasprun.xml").energy == res.energy
    d = res.to_dict(include_forces=True)
    assert d["energy"] == res.energy and d["scf_steps_total"] == 22 and len(d["forces"]) == 16


def test_gzipped_vasprun(tmp_path):
    d = tmp_path / "calc"
    d.mkdir()
    with open(IR12RE4 / "vasprun.xml", "rb") as src, gzip.open(d / "vasprun.xml.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    res = read_single_point(d)
    assert res.energy == pytest.approx(E_IR12RE4, abs=1e-8) and res.scf_steps_last == 22


def test_outcar_fallback(tmp_path):
    d = tmp_path / "calc"
    d.mkdir()
    shutil.copy(_ase_outcar(), d / "OUTCAR")
    res = read_single_point(d)
    assert res.energy == pytest.approx(-68.23102426, abs=1e-8)  # energy(sigma->0)
    assert res.force_consistent_energy == pytest.approx(-68.22868532, abs=1e-8)  # TOTEN
    assert (res.scf_steps_last, res.ionic_steps, res.nelm, res.converged) == (63, 1, 120, True)
    assert res.natoms == 18 and res.source.name == "OUTCAR"


def test_truncated_and_missing_outputs(tmp_path):
    text = (IR12RE4 / "vasprun.xml").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "vasprun.xml").write_bytes(text[: len(text) * 2 // 3])
    with pytest.raises(UnfinishedOutputError, match="truncated"):
        read_single_point(cut)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoOutputError, match="no vasprun.xml or OUTCAR"):
        read_single_point(empty)
    outcar = tmp_path / "outcar_cut"
    outcar.mkdir()
    lines = _ase_outcar().read_text().splitlines(keepends=True)
    (outcar / "OUTCAR").write_text("".join(lines[: len(lines) // 2]))
    with pytest.raises(UnfinishedOutputError, match="General timing"):
        read_single_point(outcar)


def _export_tree(tmp_path: Path) -> Path:
    """An export tree as ``adsorbml export`` lays it out, in various states of completion."""
    out = tmp_path / "export"
    calcs = {
        "sysA/heur0": "vasprun",      # finished
        "sysA/rand3": "truncated",    # killed mid-write
        "sysB/heur1": "inputs-only",  # not run yet
        "sysB/rand0": "unconverged",  # SCF hit NELM
    }
    text = (IR12RE4 / "vasprun.xml").read_text()
    for name, state in calcs.items():
        d = out / name
        d.mkdir(parents=True)
        (d / "INCAR").write_text("NSW = 0\nNELM = 300\n")
        (d / "POSCAR").write_text("placeholder\n")
        if state == "vasprun":
            shutil.copy(IR12RE4 / "vasprun.xml", d / "vasprun.xml")
        elif state == "truncated":
            (d / "vasprun.xml").write_text(text[: len(text) // 2])
        elif state == "unconverged":  # the same run, recorded as if NELM had been 22
            nelm_tag = '<i type="int" name="NELM">    60</i>'
            assert nelm_tag in text
            (d / "vasprun.xml").write_text(text.replace(nelm_tag, '<i type="int" name="NELM">    22</i>'))
    (out / "sysA" / "top_k.extxyz").write_text("")
    listed = [out / n for n in calcs] + [out / "sysC" / "heur0"]  # sysC/heur0 was deleted
    (out / "paths.txt").write_text("".join(f"{p}\n" for p in listed))
    return out


def test_scan_export_dir_reports_every_problem_by_name(tmp_path):
    out = _export_tree(tmp_path)
    results, problems = scan_export_dir(out)
    assert list(results) == ["sysA/heur0"]
    assert results["sysA/heur0"].energy == pytest.approx(E_IR12RE4, abs=1e-8)
    assert set(problems) == {"sysA/rand3", "sysB/heur1", "sysB/rand0", "sysC/heur0"}
    assert problems["sysA/rand3"].startswith("unfinished:") and "truncated" in problems["sysA/rand3"]
    assert problems["sysB/heur1"].startswith("no output:")
    assert problems["sysB/rand0"].startswith("not converged:") and "NELM = 22" in problems["sysB/rand0"]
    assert problems["sysC/heur0"].startswith("missing:")
    assert split_name("sysA/heur0") == ("sysA", "heur0")
    # without the convergence requirement the unconverged run is a result, flagged
    scan = scan_export_dir(out, require_converged=False)
    assert scan.results["sysB/rand0"].converged is False and "sysB/rand0" not in scan.problems


def test_scan_export_dir_bad_argument(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan_export_dir(tmp_path / "nope")

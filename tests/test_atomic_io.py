"""eqv2_calc.io: the one atomic write and the one "copy of Atoms with results" helper."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read

from eqv2_calc.io import atomic_write, atomic_write_text, copy_with_results, frame_with_results


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_creates_replaces_and_keeps_permissions(tmp_path):
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("new")

    path = tmp_path / "sub" / "dir" / "out.extxyz"
    assert atomic_write(path, write) == path
    assert path.read_text() == "new"
    tmp = seen[0]
    assert tmp.parent == path.parent and tmp.name.startswith(".out.extxyz.") and tmp.name.endswith(".extxyz.tmp")
    assert not tmp.exists()
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    atomic_write_text(path, "newer")
    assert path.read_text() == "newer"
    atomic_write(path, lambda t: Path(t).write_text("x"), suffix=".traj", fsync=False)
    assert path.read_text() == "x"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_leaves_the_old_file(tmp_path, exc):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def half_then_fail(tmp):
        Path(tmp).write_text("half")
        raise exc("stop")

    with pytest.raises(exc):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left

    def no_file(tmp):
        os.unlink(tmp)
        raise exc("stop")

    with pytest.raises(exc):
        atomic_write(path, no_file)  # a writer that removed the file is cleaned up after too
    assert path.read_text() == "old"


def _slab():
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    atoms.set_constraint(FixAtoms(indices=[0, 1]))
    atoms.info.update(note="kept", nested={"a": 1}, count=np.int64(3))
    atoms.calc = EMT()
    return atoms


def test_frame_with_results():
    atoms = _slab()
    forces = np.arange(3.0 * len(atoms)).reshape(-1, 3)
    pos = atoms.positions + 0.1
    frame = frame_with_results(atoms, np.float32(-1.5), forces, positions=pos, stress=np.arange(6.0),
                               info={"extra": 1})
    assert frame is not atoms and atoms.calc.__class__ is EMT  # the input keeps its calculator
    assert np.array_equal(frame.positions, pos)  # fixed atoms moved too: constraints not applied
    assert frame.constraints[0].get_indices().tolist() == [0, 1]
    assert np.array_equal(frame.get_tags(), atoms.get_tags()) and np.array_equal(frame.cell, atoms.cell)
    assert frame.info == {**atoms.info, "extra": 1}
    res = frame.calc.results
    assert type(res["energy"]) is float and res["energy"] == -1.5
    assert res["forces"].dtype == np.float64 and np.array_equal(res["forces"], forces)
    assert np.array_equal(frame.get_forces(apply_constraint=False), forces)
    assert np.all(frame.get_forces()[[0, 1]] == 0)  # ASE's convention on read-back
    assert np.array_equal(res["stress"], np.arange(6.0))
    forces[0, 0] = 99.0  # results are copies
    assert frame.calc.results["forces"][0, 0] == 0.0
    frame.positions[0, 0] = 123.0
    assert atoms.positions[0, 0] != 123.0
    plain = frame_with_results(atoms, -1.0, scalar_info_only=True, info={"rank": 0})
    assert plain.info == {"note": "kept", "count": 3, "rank": 0} and "forces" not in plain.calc.results


def test_copy_with_results_and_file_round_trip(tmp_path):
    atoms = _slab()
    e, f = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
    frame = copy_with_results(atoms, info={"k": 1}, scalar_info_only=True)
    assert frame.calc.results["energy"] == e and np.array_equal(frame.calc.results["forces"], f)
    assert set(frame.calc.results) == {"energy", "free_energy", "forces", "stress"} and frame.info["k"] == 1
    assert np.array_equal(frame.calc.results["stress"], atoms.calc.results["stress"])
    path = tmp_path / "f.extxyz"
    atomic_write(path, lambda tmp: frame.write(tmp, format="extxyz"))
    back = read(path)
    assert back.get_potential_energy() == pytest.approx(e, abs=1e-10)
    np.testing.assert_allclose(back.get_forces(apply_constraint=False), f, atol=1e-8)
    bare = _slab()
    bare.calc = None
    assert copy_with_results(bare).calc is None

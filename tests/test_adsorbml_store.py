"""adsorbml.store: transactional, idempotent rows; metadata, schema and settings checks."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from adsorbml.store import SCHEMA_VERSION, RunStore, StoreError


def _atoms():
    a = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    a.set_tags([0] * 8 + [1] * 4)
    a.set_constraint(FixAtoms(mask=a.get_tags() == 0))
    a.calc = SinglePointCalculator(a, energy=-1.25, forces=np.full((len(a), 3), 0.01))
    return a


def test_write_is_idempotent_and_round_trips(tmp_path):
    st = RunStore(tmp_path)
    a = _atoms()
    rid, written = st.write("ml", "s1", "rand0", a, {"ml_energy": np.float64(-1.25), "converged": np.bool_(True),
                                                    "nsteps": np.int64(7), "anomaly": "ok", "skip": None},
                            {"site": np.arange(3.0)})
    assert written
    rid2, written2 = st.write("ml", "s1", "rand0", _atoms(), {"ml_energy": 5.0})
    assert (rid2, written2) == (rid, False)  # never overwritten
    assert st.count("ml") == 1
    row = st.get("ml", "s1", "rand0")
    assert row.ml_energy == -1.25 and row.converged is True and row.nsteps == 7 and "skip" not in row.key_value_pairs
    back = row.toatoms()
    assert np.array_equal(back.get_tags(), a.get_tags())
    assert back.get_potential_energy() == -1.25
    assert np.array_equal(back.constraints[0].index, np.arange(8))
    assert np.array_equal(row.data["site"], np.arange(3.0))
    assert st.get("ml", "s1", "rand1") is None
    assert st.done("ml") == {("s1", "rand0")}
    with pytest.raises(ValueError, match="unknown stage"):
        st.write("relax", "s1", "x", a)


def test_write_many_is_all_or_nothing(tmp_path):
    st = RunStore(tmp_path)
    a = _atoms()
    with pytest.raises(TypeError):  # the bad value in the second row aborts the whole transaction
        st.write_many([("placement", "s", "rand0", a, {}, {}), ("placement", "s", "rand1", a, {"x": [1]}, {})])
    assert st.count("placement") == 0
    assert st.write_many([("placement", "s", "rand0", a, {}, {}), ("placement", "s", "rand1", a, {}, {})]) == 2
    assert st.write_many([("placement", "s", "rand0", a, {}, {})]) == 0


def test_runs_and_settings_check(tmp_path):
    st = RunStore(tmp_path)
    assert st.begin_run({"seed": 0, "progress": True}, {"seed": 0}) == 1
    st.update_run(1, ml_seconds=2.0)
    st.update_run(1, ml_seconds=1.5)
    st2 = RunStore(tmp_path)  # reopen
    assert st2.metadata["schema_version"] == SCHEMA_VERSION
    assert st2.metadata["runs"][0]["ml_seconds"] == pytest.approx(3.5)
    assert st2.begin_run({"seed": 0, "progress": False}, {"seed": 0}) == 2
    with pytest.raises(StoreError, match="seed"):
        st2.begin_run({"seed": 1}, {"seed": 1})
    with pytest.raises(FileNotFoundError):
        RunStore(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()


def test_other_schema_version_is_refused(tmp_path):
    st = RunStore(tmp_path)
    st.begin_run({"seed": 0})
    md = st.metadata
    md["schema_version"] = SCHEMA_VERSION + 1
    st._set_metadata(md)
    with pytest.raises(StoreError, match="schema_version"):
        RunStore(tmp_path)

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


# --------------------------------------------------------------------------- study scale (issue #10 item 6)


def _committed(tmp_path, stage="ml") -> int:
    """Rows of ``stage`` visible to another connection (i.e. committed)."""
    import sqlite3

    con = sqlite3.connect(f"file:{tmp_path / 'adsorbml.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM text_key_values WHERE key = 'stage' AND value = ?",
                           (stage,)).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        con.close()


def test_rows_are_what_ase_db_writes(tmp_path):
    """The fast row writer stores every column and key table exactly as ase.db's own write."""
    import sqlite3

    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.db import connect

    a = _atoms()
    a.set_initial_magnetic_moments(np.linspace(0, 1, len(a)))
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.random.default_rng(0).normal(size=(len(a), 3)),
                                   stress=np.arange(6.0))
    b = _atoms()
    b.calc = EMT()
    b.get_forces()
    c = _atoms()
    c.positions[0] += 0.5  # stale calculator results: not stored (as ase.db)
    mixed = fcc111("Cu", (2, 2, 2), vacuum=5.0) + molecule("CO")
    mixed.set_initial_charges(np.linspace(-1, 1, len(mixed)))
    cases = [a, b, c, mixed, molecule("H2O")]
    st = RunStore(tmp_path / "new")
    ref = connect(str(tmp_path / "ref.db"))
    for i, x in enumerate(cases):
        kvp = {"run_id": 1, "converged": True, "nsteps": 3, "ml_energy": -1.5, "anomaly": "ok"}
        st.write("ml", "s", f"r{i}", x, kvp, {"site": np.arange(3.0), "info": {"a": [1, 2]}})
        ref.write(x, key_value_pairs=dict(kvp, stage="ml", system_id="s", config_id=f"r{i}"),
                  data={"site": np.arange(3.0), "info": {"a": [1, 2]}})
    st.close()
    new, old = sqlite3.connect(tmp_path / "new" / "adsorbml.db"), sqlite3.connect(tmp_path / "ref.db")
    cols = [r[1] for r in new.execute("PRAGMA table_info(systems)")]
    rows_new, rows_old = list(new.execute("SELECT * FROM systems")), list(old.execute("SELECT * FROM systems"))
    assert len(rows_new) == len(rows_old) == len(cases)
    for rn, ro in zip(rows_new, rows_old):
        diff = [c for c, x, y in zip(cols, rn, ro) if x != y and c not in ("unique_id", "ctime", "mtime")]
        assert diff == []
    for table in ("species", "keys", "text_key_values", "number_key_values"):
        q = f"SELECT * FROM {table} ORDER BY rowid"
        assert list(new.execute(q)) == list(old.execute(q)), table
    back = RunStore(tmp_path / "new").get("ml", "s", "r0").toatoms()
    assert np.allclose(back.get_stress(), np.arange(6.0)) and np.allclose(back.get_initial_magnetic_moments(),
                                                                           a.get_initial_magnetic_moments())


def test_existence_check_never_duplicates(tmp_path):
    st = RunStore(tmp_path, batch_rows=1000, batch_seconds=60)
    a = _atoms()
    assert st.write("ml", "s1", "rand0", a, {"nsteps": 1})[1]
    assert st.write("ml", "s1", "rand0", a, {"nsteps": 2}) == (st.get("ml", "s1", "rand0").id, False)  # pending
    assert st.write("placement", "s1", "rand0", a)[1]  # other stage: another row
    assert st.write_many([("ml", "s1", "rand1", a, {}, {}), ("ml", "s1", "rand1", a, {}, {}),
                          ("ml", "s1", "rand0", a, {}, {})]) == 1
    st2 = RunStore(tmp_path)  # a second store of the file in this process sees every row
    assert st2.done("ml") == {("s1", "rand0"), ("s1", "rand1")}
    assert st2.write("ml", "s1", "rand1", a)[1] is False
    st2.close()
    st.close()
    st3 = RunStore(tmp_path)
    assert st3.count("ml") == 2 and st3.count("ml", system_id="s1") == 2 and st3.count("ml", nsteps=1) == 1
    assert [r.config_id for r in st3.rows("ml", "s1")] == ["rand0", "rand1"]
    assert st3.get("ml", "s1", "rand0").nsteps == 1
    assert st3.rows("ml", "nothing") is not None and list(st3.rows("ml", "nothing")) == []


def test_group_commit_boundaries(tmp_path):
    """Rows are committed at ``batch_rows``, after ``batch_seconds`` (timer), on flush, before
    metadata writes; events wait for their rows; a failed block rolls back only itself."""
    import time

    a = _atoms()
    st = RunStore(tmp_path, batch_rows=3, batch_seconds=60)
    st.begin_run({"seed": 0})
    st.write("ml", "s", "r0", a)
    st.log_event(event="finish", config_id="r0")
    st.write("ml", "s", "r1", a)
    assert _committed(tmp_path) == 0 and not st.events_path.exists()  # both pending, event held back
    assert st.done("ml") == {("s", "r0"), ("s", "r1")}  # ... but this store reads its own rows
    st.write("ml", "s", "r2", a)  # third row: the batch commits, then its events are written
    assert _committed(tmp_path) == 3 and [e["config_id"] for e in st.events()] == ["r0"]
    st.write("ml", "s", "r3", a)
    st.update_run(1, ml_seconds=1.0)  # metadata writes commit first
    assert _committed(tmp_path) == 4
    st.write("ml", "s", "r4", a)
    with pytest.raises(TypeError), st.transaction():
        st.write("ml", "s", "r5", a)
        st.write("ml", "s", "r6", a, {"bad": [1]})
    assert _committed(tmp_path) == 4 and st.done("ml") == {("s", f"r{i}") for i in range(5)}  # r4 still pending
    with pytest.raises(ValueError):  # a failing write leaves no trace, pending rows are kept
        st.write("ml", "s", "r7", a, {"energy": 1.0})  # reserved ase.db key
    st.write("ml", "s", "r8", a)
    st.flush()
    assert _committed(tmp_path) == 6 and st.get("ml", "s", "r7") is None
    st.close()

    quick = RunStore(tmp_path, batch_rows=100, batch_seconds=0.2)
    quick.write("ml", "s", "r9", a)
    assert _committed(tmp_path) == 6
    t0 = time.time()
    while _committed(tmp_path) < 7 and time.time() - t0 < 10:  # the timer commits a quiet batch
        time.sleep(0.05)
    assert _committed(tmp_path) == 7 and time.time() - t0 < 5
    strict = RunStore(tmp_path, batch_rows=1)
    strict.write("ml", "s", "r10", a)
    assert _committed(tmp_path) == 8  # batch_rows=1: committed before write returns


def test_store_of_a_previous_version_is_indexed_on_open(tmp_path):
    """A store written before the index table existed (plain ase.db rows) opens with every row."""
    from ase.db import connect

    db = connect(str(tmp_path / "adsorbml.db"), use_lock_file=False)
    for i in range(5):
        db.write(_atoms(), key_value_pairs={"stage": "ml", "system_id": "s", "config_id": f"rand{i}", "run_id": 1})
    db.write(_atoms(), key_value_pairs={"note": "foreign row"})
    st = RunStore(tmp_path)
    assert st.done("ml") == {("s", f"rand{i}") for i in range(5)}
    assert st.write("ml", "s", "rand3", _atoms()) == (4, False)
    assert st.write("ml", "s", "rand5", _atoms())[1]
    st.close()
    assert len(connect(str(tmp_path / "adsorbml.db"))) == 7
    del db[2]  # rows deleted with ase.db leave the index too
    assert RunStore(tmp_path).get("ml", "s", "rand1") is None


_WRITER = r"""
import sys
import numpy as np
from ase.build import fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from adsorbml.store import RunStore

st = RunStore(sys.argv[1], batch_rows=50, batch_seconds=0.3)
a = fcc111("Cu", (2, 2, 3), vacuum=6.0)
a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((len(a), 3)))
for i in range(10 ** 6):
    st.write("ml", "s", f"rand{i}", a, {"nsteps": i})
    st.log_event(event="finish", stage="ml", config_id=f"rand{i}")
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill9_during_group_commit_loses_at_most_one_batch(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    t0 = time.time()
    while time.time() - t0 < 120 and (not (tmp_path / "adsorbml.db").exists() or _committed(tmp_path) < 120):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    returned = int(out.split()[-1]) + 1  # writes that had returned before the kill
    st = RunStore(tmp_path)
    done = st.done("ml")
    assert done == {("s", f"rand{i}") for i in range(len(done))}  # a prefix: no holes, no duplicates
    assert returned - 50 <= len(done) <= returned + 1  # at most one batch lost (+ one not yet printed)
    assert all(r.toatoms().get_potential_energy() == -1.0 for r in st.rows("ml"))  # complete rows
    logged = {e["config_id"] for e in st.events()}
    assert logged <= {c for _, c in done}  # a finish is never logged for a lost row
    assert st.write("ml", "s", "rand0", _atoms())[1] is False and st.write("ml", "s", "new", _atoms())[1]

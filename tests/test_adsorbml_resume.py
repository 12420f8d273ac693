"""Acceptance: ``kill -9`` during ``adsorbml run``, then the same command again, gives the same
final results as an uninterrupted run, and no finished relaxation is redone.

EMT is both the "ML" model and the "DFT" here (plumbing, not physics). ``--max-atoms 60``
relaxes two 28-atom placements at a time, so finished relaxations reach the store one by
one and the test can kill the process while some, but not all, are stored.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase.build import fcc111
from ase.io import write

from adsorbml.cli import main
from adsorbml.store import RunStore
from conftest import count_ml_rows

N = 12  # random placements


def _argv(slab: Path, out: Path) -> list[str]:
    return ["run", "--out", str(out), "--slab", str(slab), "--adsorbate", "*O", "--placements", str(N),
            "--no-heuristic", "--seed", "3", "--ml-calculator", "emt", "--dft-calculator", "emt", "--k", "3",
            "--max-atoms", "60", "--no-plots", "--quiet"]


def _final(out: Path) -> tuple[dict, dict, dict]:
    st = RunStore(out, create=False)
    pos = {r.config_id: r.positions for r in st.rows("ml")}
    return json.loads((out / "results.json").read_text()), json.loads((out / "anomalies.json").read_text()), pos


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_run(tmp_path):
    slab = tmp_path / "Pt111.extxyz"
    write(slab, fcc111("Pt", size=(3, 3, 3), vacuum=8.0))  # 8.3 Å wide: no tiling, 27 atoms
    killed, ref = tmp_path / "killed", tmp_path / "ref"

    # 1. start the run as a separate process and SIGKILL it mid-way through the ML relaxations
    proc = subprocess.Popen([sys.executable, "-m", "adsorbml.cli", *_argv(slab, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = killed / "adsorbml.db"
    t0 = time.time()
    n_seen = 0
    while time.time() - t0 < 120 and proc.poll() is None:
        n_seen = count_ml_rows(db)
        if n_seen >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    n_before = count_ml_rows(db)
    assert 2 <= n_before < N, f"kill landed at {n_before}/{N} finished relaxations"
    store = RunStore(killed, create=False)
    done_before = store.done("ml")
    assert all(r.run_id == 1 for r in store.rows("ml"))

    # 2. the same command again resumes; 3. an uninterrupted run for comparison
    assert main(_argv(slab, killed)) == 0
    assert main(_argv(slab, ref)) == 0

    # no finished relaxation was redone: run 2 started exactly the missing ones ...
    events = store.events()
    started = {(e["run_id"], tuple(i)) for e in events if e["event"] == "start" and e["stage"] == "ml"
               for i in e["items"]}
    run2 = {i for rid, i in started if rid == 2}
    all_ids = {("Pt111_O", f"rand{i}") for i in range(N)}
    assert run2 == all_ids - done_before and not (run2 & done_before)
    # ... every relaxation finished (and was written) exactly once ...
    finishes = Counter((e["system_id"], e["config_id"]) for e in events if e["event"] == "finish" and e["stage"] == "ml")
    assert max(finishes.values()) == 1 and set(finishes) >= run2
    assert not [e for e in events if e["event"] == "finish" and not e["written"]]
    # ... and the store holds one row per placement, attributed to the run that relaxed it
    rows = list(store.rows("ml"))
    assert sorted((r.system_id, r.config_id) for r in rows) == sorted(all_ids)
    assert {(r.system_id, r.config_id) for r in rows if r.run_id == 1} == done_before
    assert store.count("placement") == N and store.count("slab_ml") == 1

    # same final results as the uninterrupted run
    res_k, anom_k, pos_k = _final(killed)
    res_r, anom_r, pos_r = _final(ref)
    assert anom_k == anom_r
    assert list(res_k["Pt111_O"]) == list(res_r["Pt111_O"])  # same ranking
    for cid, e in res_r["Pt111_O"].items():
        for key in ("ml_energy", "ml+dft_energy"):
            a, b = res_k["Pt111_O"][cid][key], e[key]
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-8)
    assert sum(e["ml+dft_energy"] is not None for e in res_r["Pt111_O"].values()) == 3
    for cid in pos_r:
        assert np.allclose(pos_k[cid], pos_r[cid], atol=1e-8)

    # a third invocation does nothing new
    assert main(_argv(slab, killed)) == 0
    assert [e for e in store.events() if e.get("run_id") == 3] == []
    assert len(store.metadata["runs"]) == 3
    print(f"killed at {n_before}/{N}")

"""Ray scale-out (issue 12): an AdsorbML run on a local Ray cluster — head + 1 worker node, 1 CPU
each, loopback only — gives the single-process rows bit for bit, and loses nothing when a worker
process, a worker node or the driver dies.

EMT is the "ML" model and the "DFT" here: its results do not depend on batch composition, so any
difference from the single-process run is a scheduling bug (lost, doubled or mixed-up results).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase.build import fcc111
from ase.io import write

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="the ray tests need the [ray] extra (part of make test)")

from adsorbml.cli import main  # noqa: E402
from conftest import count_ml_rows  # noqa: E402
from adsorbml.store import RunStore  # noqa: E402

HERE = Path(__file__).parent
N = 8  # random placements
SLOW = 'ray_helpers:SlowEMT{"delay": 0.01}'  # EMT's numbers, ~10 s per run: time to kill something mid-run
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep every address on 127.0.0.1 (no rewrite to the routable IP)
    "RAY_USAGE_STATS_ENABLED": "0",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU) + 1 worker node (1 CPU) on loopback; the test process is connected as driver."""
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    tmp = Path(f"/tmp/eqv2-ray-{os.getpid()}")  # short: Ray's unix socket paths must fit in 107 bytes
    tmp.mkdir(exist_ok=True)
    os.environ.update(LOOPBACK_ENV, RAY_TMPDIR=str(tmp),
                      PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    node_args = dict(num_cpus=1, object_store_memory=100 * 2**20)
    c = Cluster(initialize_head=True, head_node_args=node_args)
    c.worker_args = node_args
    c.worker = c.add_node(**node_args)
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def slab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slab") / "Pt111.extxyz"
    write(path, fcc111("Pt", size=(3, 3, 3), vacuum=8.0))
    return path


def _argv(slab: Path, out: Path, *extra: str, ml: str = "emt", n: int = N) -> list[str]:
    return ["run", "--out", str(out), "--slab", str(slab), "--adsorbate", "*O", "--placements", str(n),
            "--no-heuristic", "--seed", "5", "--ml-calculator", ml, "--dft-calculator", "emt", "--k", "3",
            "--max-atoms", "60", "--no-plots", "--quiet", *extra]


@pytest.fixture(scope="module")
def reference(slab, tmp_path_factory) -> dict:
    """The single-process run's rows."""
    out = tmp_path_factory.mktemp("reference")
    assert main(_argv(slab, out)) == 0
    return _rows(out)


def _rows(out: Path) -> dict:
    """(stage, system_id, config_id) → everything of a row but its run id (execution settings)."""
    rows: dict = {}
    for stage in ("slab_ml", "ml", "dft_sp"):
        for r in RunStore(out, create=False).rows(stage):
            key = (stage, r.system_id, r.config_id)
            assert key not in rows, f"row {key} doubled"
            kvp = {k: v for k, v in r.key_value_pairs.items() if k != "run_id"}
            rows[key] = (r.positions.tobytes(), r.numbers.tobytes(), r.cell.tobytes(), r.get("energy"),
                         None if r.get("forces") is None else r.forces.tobytes(), kvp)
    return rows


def _assert_same(out: Path, reference: dict) -> None:
    rows = _rows(out)
    assert sorted(rows) == sorted(reference)
    assert sum(k[0] == "ml" for k in rows) == N
    for key, value in reference.items():
        assert rows[key] == value, key
    finishes = Counter((e["system_id"], e["config_id"]) for e in RunStore(out, create=False).events()
                       if e["event"] == "finish" and e["stage"] == "ml")
    assert set(finishes.values()) == {1}, "a relaxation was written twice"


def _wait_for_rows(db: Path, n: int, alive, timeout: float = 90.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout and alive():
        seen = count_ml_rows(db)
        if seen >= n:
            return seen
        time.sleep(0.02)
    return count_ml_rows(db)


def test_ray_run_is_bit_identical_to_single_process(cluster, slab, reference, tmp_path):
    out = tmp_path / "ray"
    # slowed EMT (same numbers): the run outlasts the start-up of both actors, so both take part
    assert main(_argv(slab, out, "--ray", cluster.address, "--actors", "2", "--prefetch", "2", ml=SLOW)) == 0
    _assert_same(out, reference)
    (pool,) = [e for e in RunStore(out, create=False).events() if e["event"] == "ray" and e["stage"] == "ml"]
    assert (pool["actors"], pool["nodes"], pool["deaths"]) == (2, 2, 0)
    # resuming the Ray run in one process finds nothing to do (execution settings are not in the fingerprint)
    assert main(_argv(slab, out, ml=SLOW)) == 0
    assert [e for e in RunStore(out, create=False).events() if e.get("run_id") == 2 and e["event"] == "start"] == []


def test_worker_process_killed_mid_run(cluster, slab, reference, tmp_path):
    flag = tmp_path / "died"
    ml = 'ray_helpers:FaultyEMT{"die_after": 25, "flag": "%s"}' % flag
    out = tmp_path / "ray"
    assert main(_argv(slab, out, "--ray", cluster.address, "--actors", "2", "--prefetch", "2", ml=ml)) == 0
    assert flag.exists(), "no worker died: the test did not test anything"
    (pool,) = [e for e in RunStore(out, create=False).events() if e["event"] == "ray" and e["stage"] == "ml"]
    assert pool["deaths"] == 1 and pool["resubmitted"] >= 1 and pool["given_up"] == 0
    _assert_same(out, reference)


def test_worker_node_killed_mid_run(cluster, slab, reference, tmp_path):
    out = tmp_path / "ray"
    status: list[int] = []
    run = threading.Thread(target=lambda: status.append(
        main(_argv(slab, out, "--ray", cluster.address, "--actors", "2", "--prefetch", "2", ml=SLOW))))
    run.start()
    seen = _wait_for_rows(out / "adsorbml.db", 1, run.is_alive)
    assert 1 <= seen < N, f"the node was to be killed mid-run, but {seen}/{N} were done"
    cluster.remove_node(cluster.worker)
    run.join(180)
    cluster.worker = cluster.add_node(**cluster.worker_args)  # for the tests after this one
    assert status == [0]
    (pool,) = [e for e in RunStore(out, create=False).events() if e["event"] == "ray" and e["stage"] == "ml"]
    assert pool["deaths"] >= 1 and pool["given_up"] == 0
    _assert_same(out, reference)


def test_driver_kill9_then_resume(cluster, slab, reference, tmp_path):
    out = tmp_path / "ray"
    env = dict(os.environ, **LOOPBACK_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "adsorbml.cli",
                             *_argv(slab, out, "--ray", cluster.address, "--actors", "2", "--prefetch", "2", ml=SLOW)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = _wait_for_rows(out / "adsorbml.db", 2, lambda: proc.poll() is None, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 2 <= seen < N, f"the driver was to be killed mid-run, but {seen}/{N} were done"
    before = RunStore(out, create=False).done("ml")
    assert main(_argv(slab, out, "--ray", cluster.address, ml=SLOW)) == 0  # resume on Ray
    _assert_same(out, reference)
    store = RunStore(out, create=False)
    assert {(r.system_id, r.config_id) for r in store.rows("ml") if r.run_id == 1} == before


def _structures(n: int) -> list:
    out = []
    for i in range(n):
        s = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        s.rattle(0.05, seed=i)
        out.append(s)
    return out


def test_a_structure_that_kills_every_worker_is_given_up(cluster):
    from ase.calculators.emt import EMT
    from ray_helpers import PoisonEMT

    from eqv2_calc.distributed import REASON_WORKER_LOST, RayOptions, relax_on_ray
    from eqv2_calc.relax import relax_batch

    structures = _structures(4)
    structures[2][0].symbol = "Au"
    expected = relax_batch(structures[:2] + structures[3:], EMT(), fmax=0.05, steps=30, progress=False)
    results, stats = relax_on_ray(structures, PoisonEMT(), RayOptions(actors=2, prefetch=1, max_attempts=2),
                                  fmax=0.05, steps=30, progress=False, log=lambda _: None)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert results[2].failed and results[2].reason.startswith(REASON_WORKER_LOST)
    assert stats.given_up == 1 and stats.actor_deaths == 2
    for r, e in zip(results[:2] + results[3:], expected):
        assert (r.energy, r.nsteps, r.failed) == (e.energy, e.nsteps, False)
        np.testing.assert_array_equal(r.atoms.positions, e.atoms.positions)


def test_shipped_model_float32_on_ray_matches_single_process(cluster, slab, tmp_path):
    """float32: another batch composition rounds differently, so equality is within a tolerance;
    the top-k selection (the structures sent to DFT) must be the same."""
    runs = {}
    for name, extra in (("local", ()), ("ray", ("--ray", cluster.address, "--actors", "2", "--prefetch", "1"))):
        out = tmp_path / name
        assert main(_argv(slab, out, "--steps", "12", "--k", "2", *extra, ml="shipped", n=3)) == 0
        store = RunStore(out, create=False)
        runs[name] = ({r.config_id: r for r in store.rows("ml")}, sorted(r.config_id for r in store.rows("dft_sp")))
    (ml_l, top_l), (ml_r, top_r) = runs["local"], runs["ray"]
    assert top_l == top_r and len(top_l) == 3  # the clean slab and the top 2 of 3 placements
    assert sorted(ml_l) == sorted(ml_r)
    de = max(abs(ml_l[c].ml_energy - ml_r[c].ml_energy) for c in ml_l)
    dx = max(np.abs(ml_l[c].positions - ml_r[c].positions).max() for c in ml_l)
    print(f"shipped float32, Ray vs one process: max |dE| = {de:.2e} eV, max |dx| = {dx:.2e} A")
    assert de < 1e-3 and dx < 1e-2
    assert {c: ml_l[c].anomaly for c in ml_l} == {c: ml_r[c].anomaly for c in ml_r}


def test_eqv2_relax_on_ray_writes_the_same_files(cluster, tmp_path):
    """``eqv2 relax --ray``: the same structures, energies and trajectories as in one process."""
    from ase.io import read
    from ase.io import write as ase_write

    from eqv2_calc.cli import main as eqv2_main

    frames = tmp_path / "frames.extxyz"
    ase_write(frames, _structures(5))
    common = [str(frames), "--calculator", "emt", "--fmax", "0.05", "--steps", "40", "--save-every", "5",
              "--no-progress"]
    assert eqv2_main(["relax", *common, "--out", str(tmp_path / "one")]) == 0
    assert eqv2_main(["relax", *common, "--out", str(tmp_path / "ray"), "--ray", cluster.address,
                      "--actors", "2", "--prefetch", "1"]) == 0
    assert (tmp_path / "one" / "is2re.csv").read_text() == (tmp_path / "ray" / "is2re.csv").read_text()
    for sub in ("structures", "trajectories"):
        names = sorted(p.name for p in (tmp_path / "one" / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "ray" / sub).iterdir()) and len(names) == 5
        for name in names:
            a, b = read(tmp_path / "one" / sub / name, ":"), read(tmp_path / "ray" / sub / name, ":")
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x.positions, y.positions)
                assert x.get_potential_energy() == y.get_potential_energy()


def test_a_lazy_source_is_drawn_only_as_actors_have_room(cluster):
    """Placements are generated while earlier ones relax: with prefetch 1 and 2 actors, at most
    2 structures (+1 looked ahead) are drawn before the first result arrives."""
    from ase.calculators.emt import EMT

    from eqv2_calc.distributed import RayOptions, relax_on_ray
    from eqv2_calc.relax import relax_batch

    structures = _structures(6)
    log: list[str] = []

    def source():
        for i, s in enumerate(structures):
            log.append(f"draw {i}")
            yield s

    results, _ = relax_on_ray(source(), EMT(), RayOptions(actors=2, prefetch=1), fmax=0.05, steps=30, progress=False,
                              on_result=lambda r: log.append(f"result {r.index}"))
    first = next(i for i, e in enumerate(log) if e.startswith("result"))
    assert sum(e.startswith("draw") for e in log[:first]) <= 3 and sum(e.startswith("draw") for e in log) == 6
    for r, e in zip(results, relax_batch(structures, EMT(), fmax=0.05, steps=30, progress=False)):
        assert (r.energy, r.nsteps) == (e.energy, e.nsteps)

"""The distillation data generator (eqv2_calc.train.distill_data) and the teacher it labels with.

Labelling logic is checked with EMT standing in for the teacher (fast, exact, independent);
the SevenNet teacher itself is checked once through its calculator spec."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import read

import eqv2_calc.train.distill_data as dd
from eqv2_calc.errors import InputError
from eqv2_calc.relax.constraints import fixed_atoms
from eqv2_calc.train.emt_data import split_systems


@pytest.fixture
def emt_teacher(monkeypatch):
    """EMT in place of SevenNet, in this process (workers=1)."""
    calls = []

    def init(teacher, threads):
        calls.append(teacher)
        dd._TEACHER = EMT()

    monkeypatch.setattr(dd, "_init_worker", init)
    init("emt", 1)
    return calls


def _emt(atoms):
    a = atoms.copy()
    a.calc = EMT()
    return a.get_potential_energy(), a.get_forces(apply_constraint=False)


def test_systems_cover_every_surface_and_split_by_system():
    s = dd.systems(0, 5)
    assert s == dd.systems(0, 5)  # seeded
    assert len(s) == 5 * sum(len(v) for v in dd.SURFACES.values())
    assert {m for m, _, _ in s} == set(dd.SURFACES) and {a for _, _, a in s} <= set(dd.ADSORBATES)
    split = split_systems(s, 0)
    assert not set(split["test"]) & set(split["train"]) and not set(split["val"]) & set(split["train"])
    assert sorted(split["test"] + split["val"] + split["train"]) == sorted(s)
    with pytest.raises(InputError, match="ads_per_surface"):
        dd.systems(0, 0)


def test_complement_is_the_rest_of_every_surface_all_for_training():
    """The complement adds the adsorbates the seeded choice left out: together with the base
    systems it covers every (surface, adsorbate) once, so no validation or test combination of the
    base data is trained on, and its jobs are adsorbate systems only, all for training."""
    base, more = dd.systems(0, 5), dd.systems(0, 5, complement=True)
    every = {(m, dd.facet_name(h), a) for m, hs in dd.SURFACES.items() for h in hs for a in dd.ADSORBATES}
    assert not set(base) & set(more) and set(base) | set(more) == every and len(more) == len(base)
    opts = dd.generation_options(complement=True, n_initial=10, n_rattle=4, path_frames=0)
    jobs = dd.job_list(opts)
    assert {j["kind"] for j in jobs} == {"system"} and {j["split"] for j in jobs} == {"train"}
    assert sorted(j["system"] for j in jobs) == sorted(more)
    assert "complement" not in dd.generation_options()  # the base data's recorded options are unchanged
    with pytest.raises(InputError, match="complement needs ads_per_surface < 10"):
        dd.generation_options(complement=True, ads_per_surface=10)
    with pytest.raises(InputError, match="n_initial must be an integer >= 1"):
        dd.generation_options(n_initial=0)


def test_new_surfaces_are_other_facets_all_for_training_with_their_clean_slabs():
    """new_surfaces: facets the base data never uses, so no base system (and no held-out one)
    is among its systems; its jobs are each new surface's clean slab and its adsorbate systems,
    all for training, without gas molecules (the base data has them)."""
    base = {(m, dd.facet_name(h)) for m, hs in dd.SURFACES.items() for h in hs}
    new = {(m, dd.facet_name(h)) for m, hs in dd.NEW_SURFACES.items() for h in hs}
    assert not base & new and {m for m, _ in new} == set(dd.SURFACES)
    opts = dd.generation_options(new_surfaces=True)
    assert opts == {**dd.generation_options(), "new_surfaces": True}
    jobs = dd.job_list(opts)
    assert {j["split"] for j in jobs} == {"train"} and {j["kind"] for j in jobs} == {"system"}
    clean = [j["system"][:2] for j in jobs if not j["system"][2]]
    assert sorted(clean) == sorted(new)
    ads = [j["system"] for j in jobs if j["system"][2]]
    assert sorted(ads) == sorted(dd.systems(0, 5, new_surfaces=True)) and len(ads) == 5 * len(new)
    assert len(dd.systems(0, 5, complement=True, new_surfaces=True)) == 5 * len(new)
    slab = dd.build_slab("Cu", "210")
    assert 20 <= len(slab.atoms) <= 80 and set(slab.atoms.get_tags()) == {0, 1}
    with pytest.raises(InputError, match=r"no surface Cu\(110\)"):
        dd.build_slab("Cu", "110")


def test_job_without_path_frames_labels_starts_only(emt_teacher):
    opts = dd.generation_options(complement=True, n_initial=4, n_rattle=2, path_frames=0, num_random=5)
    res = dd._run_job({"kind": "system", "options": opts, "system": ("Cu", "100", "*OH"), "split": "train"})
    assert [f.info["kind"] for f in res["frames"]] == ["initial"] * 4 + ["rattle"] * 2
    assert res["relaxation"] is None and res["steps"] == 0
    with pytest.raises(InputError, match="fewer than n_initial"):
        dd._run_job({"kind": "system", "options": {**opts, "n_initial": 40}, "system": ("Cu", "100", "*OH"),
                     "split": "train"})


def test_job_order_interleaves_metals():
    names = dd.job_names(dd.generation_options())
    assert names[0] == "gas" and all(n.endswith("-clean") for n in names[1:31])
    first = names[31:61]  # the first 30 adsorbate systems already span most metals
    assert len({n.split("-")[0] for n in first}) >= 7


def test_path_picks_are_dense_at_the_start_and_keep_both_ends():
    p = dd._path_picks(60, 10)
    assert p[0] == 0 and p[-1] == 59 and len(p) <= 11 and np.all(np.diff(p) > 0)
    assert np.all(np.diff(p)[:-1] <= np.diff(p)[1:])  # spacing grows
    assert list(dd._path_picks(5, 10)) == [0, 1, 2, 3, 4]


def test_system_job_labels_adsorbml_placements(emt_teacher):
    from adsorbml.placements import generate_placements

    opts = dd.generation_options(n_initial=3, n_rattle=2, path_frames=5, relax_steps=15, num_random=5)
    res = dd._run_job({"kind": "system", "options": opts, "system": ("Pt", "111", "*CO"), "split": "test"})
    kinds = [f.info["kind"] for f in res["frames"]]
    assert kinds.count("initial") == 3 and kinds.count("rattle") == 2 and 2 <= kinds.count("path") <= 6
    slab = dd.build_slab("Pt", "111")
    placements = {p.config_id: p.atoms for p in generate_placements(
        slab, "*CO", num_random=5, heuristic=True, seed=dd.sub_seed(0, "Pt-111-CO", "placements") % (2**31))}
    for f in res["frames"]:
        e, forces = _emt(f)  # labels are the teacher's at exactly this geometry
        assert f.get_potential_energy() == pytest.approx(e, abs=1e-9)
        np.testing.assert_allclose(f.calc.results["forces"], forces, atol=1e-9)
        assert f.info["split"] == "test" and f.info["system"] == "Pt-111-CO"
        if f.info["kind"] == "initial":  # unmodified AdsorbML starts
            np.testing.assert_array_equal(f.positions, placements[f.info["placement"]].positions)
        if f.info["kind"] == "rattle":  # fixed atoms stay put
            start = placements[f.info["placement"]]
            fixed = fixed_atoms(start)
            np.testing.assert_array_equal(f.positions[fixed], start.positions[fixed])
            assert np.abs(f.positions[~fixed] - start.positions[~fixed]).max() > 0.01
    relax = res["relaxation"]
    np.testing.assert_array_equal(relax.positions, placements[relax.info["placement"]].positions)
    last = [f for f in res["frames"] if f.info["kind"] == "path"][-1]
    assert relax.info["teacher_relaxed_energy"] == pytest.approx(last.get_potential_energy())
    assert last.info["frame"] == relax.info["teacher_steps"]  # the trajectory's last frame is the relaxed one


def test_relax_job_relaxes_to_fmax_with_the_teacher(emt_teacher):
    """The reference relaxation of distill_eval: converged below fmax by the teacher's own
    forces at the returned geometry, labels exact, stale ``teacher_*`` entries replaced."""
    start = dd.build_slab("Cu", "100").atoms
    start.info.update(system="Cu-100-clean", teacher_converged=False, teacher_steps=60, teacher_relaxed_energy=1.0)
    start = dd._rattled(start, 0.05, np.random.default_rng(0))
    out = dd.relax_job({"atoms": start, "fmax": 0.05, "steps": 200})
    e, forces = _emt(out)
    free = ~fixed_atoms(out)
    assert out.info["teacher_converged"] and 0 < out.info["teacher_steps"] < 200
    assert np.linalg.norm(forces[free], axis=1).max() < 0.05 and out.get_potential_energy() == pytest.approx(e)
    assert "teacher_relaxed_energy" not in out.info and out.info["system"] == "Cu-100-clean"
    assert out.get_potential_energy() < _emt(start)[0]


def test_generation_resumes_and_is_deterministic(tmp_path, emt_teacher, monkeypatch):
    labelled = []
    run_job = dd._run_job
    monkeypatch.setattr(dd, "_run_job", lambda job: labelled.append(job["kind"]) or run_job(job))
    opts = dict(path_frames=4, relax_steps=8)
    m1 = dd.generate_distill_dataset(tmp_path / "a", workers=1, limit=3, progress=False, **opts)
    assert m1["limit"] == 3 and m1["frames"]["train"] > 0 and not m1["complete"]
    first = (tmp_path / "a" / "train.extxyz").read_bytes()
    # kill after one job: delete it, rerun; only that job is labelled again, output identical
    (tmp_path / "a" / "jobs" / "Ag-111-clean.json").unlink()
    assert len(labelled) == 3
    m2 = dd.generate_distill_dataset(tmp_path / "a", workers=1, limit=3, progress=False, **opts)
    assert len(labelled) == 4
    assert (tmp_path / "a" / "train.extxyz").read_bytes() == first and m2["sha256"] == m1["sha256"]
    assert dd.finished_prefix(tmp_path / "a", **opts) == 3
    gas = read(tmp_path / "a" / "train.extxyz", index=":")
    mols = {f.info["adsorbate"] for f in gas if f.info["system"].startswith("gas-")}
    assert mols == set(dd.MOLECULES) and not any(f.pbc.any() for f in gas if f.info["system"].startswith("gas-"))
    with pytest.raises(InputError, match="other options"):
        dd.generate_distill_dataset(tmp_path / "a", workers=1, limit=3, progress=False, path_frames=5)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["options"]["path_frames"] == 4


def test_teacher_errors_are_clear(monkeypatch):
    from eqv2_calc.train.teacher import make_teacher

    with pytest.raises(InputError, match="7net-0, 7net-l3i5"):
        make_teacher("7net-mf-ompa")
    monkeypatch.setitem(sys.modules, "sevenn.calculator", None)
    with pytest.raises(InputError, match=r"pip install 'eqv2-calc\[teacher\]'"):
        make_teacher()
    # with worker processes too: refused before the pool starts (a failing initializer respawns forever)
    with pytest.raises(InputError, match=r"pip install 'eqv2-calc\[teacher\]'"):
        dd.run_teacher_jobs([1.0], time.sleep, print, "7net-0", workers=2, threads=1, bar=None)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        return "\tZ" not in next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                                  if line.startswith("State:"))
    except (OSError, StopIteration):
        return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads parent pids from /proc (Linux)")
def test_teacher_workers_exit_when_the_labelling_process_is_killed():
    """A SIGTERM to the labelling process alone (not its process group) ends its teacher workers
    too, instead of leaving them labelling on."""
    pytest.importorskip("sevenn")
    script = ("import time\nfrom eqv2_calc.train.distill_data import run_teacher_jobs\n"
              "run_teacher_jobs([600.0, 600.0], time.sleep, print, '7net-0', workers=2, threads=1, bar=None)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)

    def workers() -> set[int]:
        pids = set()
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                ppid = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("PPid:"))
                spawned = b"spawn_main" in (status.parent / "cmdline").read_bytes()
            except (OSError, StopIteration):
                continue
            if ppid == str(parent.pid) and spawned:
                pids.add(int(status.parent.name))
        return pids

    try:
        deadline = time.monotonic() + 120
        while len(pool := workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pool) == 2, "the pool did not start"
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while (alive := {w for w in pool if _running(w)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"teacher workers {sorted(alive)} outlived the labelling process"
    finally:  # whatever happened: no process of the test's session survives it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def test_sevennet_spec_is_the_teacher():
    from ase.build import molecule
    from sevenn.calculator import SevenNetCalculator

    from eqv2_calc.calcspec import parse_calculator_spec

    spec = parse_calculator_spec('sevennet{"model": "7net-0"}', allow=("ase",))
    calc = spec.build()
    m = molecule("CO")
    m.center(vacuum=5.0)
    m.calc = calc
    e = m.get_potential_energy()
    ref = m.copy()
    ref.calc = SevenNetCalculator("7net-0", device="cpu")
    assert e == pytest.approx(ref.get_potential_energy(), abs=1e-6) and np.isfinite(e)


def test_committed_labels_restore_into_a_data_dir(tmp_path):
    """The committed archive holds finished jobs of the default options: restoring adds only
    what is missing, and every restored job is complete (frames + json marker)."""
    assert dd.LABELS_ARCHIVE.is_file()
    added = dd.restore_labels(tmp_path)
    done = sorted(p.stem for p in (tmp_path / "jobs").glob("*.json"))
    assert added > 0 and "gas" in done
    assert dd.finished_prefix(tmp_path) >= 100
    for name in done:
        meta = json.loads((tmp_path / "jobs" / f"{name}.json").read_text())
        assert len(read(tmp_path / "jobs" / f"{name}.extxyz", index=":")) == meta["frames"]
    assert dd.restore_labels(tmp_path) == 0  # nothing missing any more


def test_committed_complement_restores_complete_training_systems_only(tmp_path):
    """Stage 4 trains on the committed complement labels as they are: restoring them gives every
    job of its declared options finished (no teacher is loaded), only training frames of
    systems outside the base data, and the frame counts its options imply."""
    from eqv2_calc.train.distill import COMPLEMENT, more_systems

    assert COMPLEMENT.archive.is_file()
    train_file = more_systems(tmp_path / "more", COMPLEMENT, workers=1, relabel=False)
    manifest = json.loads((tmp_path / "more" / "manifest.json").read_text())
    opts = dd.generation_options(**COMPLEMENT.options)
    assert manifest["complete"] and manifest["options"] == opts
    frames = read(train_file, index=":")
    base = {dd.system_name(*s) for s in dd.systems(opts["seed"], opts["ads_per_surface"])}
    per_system = opts["n_initial"] + opts["n_rattle"]
    assert len(frames) == manifest["frames"]["train"] == per_system * len(dd.job_list(opts))
    assert sum(manifest["frames"].values()) == len(frames) and not {f.info["system"] for f in frames} & base
    assert {f.info["split"] for f in frames} == {"train"} and {f.info["kind"] for f in frames} == {"initial", "rattle"}
    assert all(np.isfinite(f.get_forces()).all() for f in frames)

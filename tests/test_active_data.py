"""One active-learning round (eqv2_calc.train.active_data): new starts of training systems,
relaxed by a model, teacher labels on its trajectory.

EMT stands in for the teacher and the distilled shipped model relaxes (its graph has no
neighbour cap, so its energy at the stored, 8-decimal positions is the recorded one); labels and
the model's energies are checked against independent evaluations at the stored geometries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import read

import eqv2_calc.train.active_data as ad
import eqv2_calc.train.distill_data as dd
from eqv2_calc.calculator import EquiformerV2Calculator
from eqv2_calc.checkpoint.registry import shipped_checkpoint
from eqv2_calc.errors import CheckpointError, InputError
from eqv2_calc.train.distill import ACTIVE_ROUNDS


@pytest.fixture
def emt_teacher(monkeypatch):
    monkeypatch.setattr(dd, "_init_worker", lambda teacher, threads: setattr(dd, "_TEACHER", EMT()))


@pytest.fixture
def base_dir(tmp_path):
    """A base data directory: only its manifest is read."""
    d = tmp_path / "base"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"options": dd.generation_options(num_random=5)}))
    return d


def test_starts_are_unused_placements_of_training_systems():
    base = dd.generation_options(num_random=5)
    split = {j["system"]: j["split"] for j in dd.job_list(base) if j["kind"] == "system"}
    train = ad.training_systems(base)
    assert train and all(split[s] == "train" and s[2] for s in train)
    assert len(train) == sum(1 for s, p in split.items() if p == "train" and s[2])  # every training system
    starts = ad.training_starts(base, 2, limit=2)
    assert [a.info["start_name"] for a in starts] == [ad.start_name(dd.system_name(*s), k) for s in train[:2] for k in (0, 1)]
    for a in starts:
        metal, facet, ads = a.info["metal"], a.info["facet"], a.info["adsorbate"]
        rng = np.random.default_rng(dd.sub_seed(base["seed"], a.info["system"]))
        ordered = dd.ordered_placements(dd.build_slab(metal, facet), ads, a.info["system"], base, rng)
        used = {p.config_id for p in ordered[: base["n_initial"] + 1]}  # what the base data labelled
        assert a.info["placement"] not in used
        new = ordered[base["n_initial"] + 1 + a.info["start"]]
        assert new.config_id == a.info["placement"]
        np.testing.assert_array_equal(a.positions, new.atoms.positions)

    # a later round skips the starts of the earlier one: start 1 of the system, named s1
    (later,) = ad.training_starts(base, 1, limit=1, first_start=1)
    assert (later.info["start"], later.info["start_name"]) == (1, ad.start_name(dd.system_name(*train[0]), 1))
    assert later.info["placement"] == starts[1].info["placement"]
    np.testing.assert_array_equal(later.positions, starts[1].positions)


def test_first_start_is_recorded_only_when_set():
    """Rounds made before ``first_start`` existed (the committed round 1) keep their options."""
    assert "first_start" not in ad.active_options({}, "0", n_starts=1)
    assert ad.active_options({}, "0", first_start=1)["first_start"] == 1
    with pytest.raises(InputError, match="first_start must be an integer >= 0"):
        ad.active_options({}, "0", first_start=-1)


def test_picks_are_even_and_keep_both_ends():
    assert list(ad._picks(61, 6)) == [0, 12, 24, 36, 48, 60]
    assert list(ad._picks(3, 6)) == [0, 1, 2]
    assert list(ad._picks(1, 6)) == [0]


def test_round_labels_the_model_trajectory_and_resumes(tmp_path, base_dir, emt_teacher):
    ckpt = shipped_checkpoint("7net")
    out = tmp_path / "al"
    opts = dict(n_starts=2, frames=3, steps=6, save_every=2, max_force=1e6)  # EMT on H: forces past 100 eV/Å
    m = ad.generate_active_dataset(out, base_dir, ckpt, workers=1, progress=False, limit=1, **opts)
    assert m["systems"] == 1 and not m["complete"] and m["dropped_frames"] == 0
    assert m["options"]["checkpoint_sha256"] == EquiformerV2Calculator(checkpoint_path=str(ckpt)).metadata["sha256"]
    frames = read(out / "train.extxyz", index=":")
    assert m["frames"] == len(frames) == 6
    starts = {a.info["start_name"]: a for a in ad.training_starts(m["options"]["base"], 2, limit=1)}
    model = EquiformerV2Calculator(checkpoint_path=str(ckpt))
    for f in frames:
        assert f.info["kind"] == "ml-path" and f.info["split"] == "train"
        a = f.copy()
        a.calc = EMT()  # the teacher's labels at this geometry (extxyz keeps 8 decimals)
        assert f.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(f.calc.results["forces"], a.get_forces(apply_constraint=False), atol=1e-6)
        a.calc = model  # the model's energy there, as recorded
        assert f.info["ml_energy"] == pytest.approx(a.get_potential_energy(), abs=2e-4)
        start = starts[ad.start_name(f.info["system"], f.info["start"])]
        np.testing.assert_array_equal(f.get_tags(), start.get_tags())
        if f.info["frame"] == 0:  # the unmodified start (extxyz keeps 8 decimals)
            np.testing.assert_allclose(f.positions, start.positions, rtol=0, atol=1e-8)
        else:
            assert 0 < f.info["ml_step"] <= 6 and np.abs(f.positions - start.positions).max() > 1e-3
    # resume: a lost labelling job is redone, the relaxations are kept; output identical
    first = (out / "train.extxyz").read_bytes()
    (out / "jobs" / f"{frames[0].info['system']}.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "ml").iterdir()}
    ad.generate_active_dataset(out, base_dir, ckpt, workers=1, progress=False, limit=1, **opts)
    assert (out / "train.extxyz").read_bytes() == first
    assert {p.name: p.stat().st_mtime_ns for p in (out / "ml").iterdir()} == kept
    with pytest.raises(InputError, match="other options or another model"):
        ad.generate_active_dataset(out, base_dir, ckpt, workers=1, progress=False, limit=1, **{**opts, "frames": 4})


def test_teacher_outliers_are_dropped_and_counted(tmp_path, base_dir, emt_teacher):
    m = ad.generate_active_dataset(tmp_path / "al", base_dir, shipped_checkpoint("emt"), workers=1, progress=False,
                                   limit=1, n_starts=1, frames=2, steps=2, max_force=1e-6)
    assert m["frames"] == 0 and m["dropped_frames"] == 2


def test_bad_input_is_explained(tmp_path):
    with pytest.raises(InputError, match="no manifest.json"):
        ad.generate_active_dataset(tmp_path / "al", tmp_path, shipped_checkpoint("emt"))
    with pytest.raises(InputError, match="unknown active-learning options"):
        ad.active_options({}, "0", n_start=3)
    with pytest.raises(InputError, match="frames must be an integer >= 2"):
        ad.active_options({}, "0", frames=0)
    with pytest.raises(InputError, match="fmax must be > 0"):
        ad.active_options({}, "0", fmax=-0.05)
    (tmp_path / "manifest.json").write_text(json.dumps({"options": dd.generation_options()}))
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        ad.generate_active_dataset(tmp_path / "al", tmp_path, tmp_path / "missing.pt")


@pytest.mark.parametrize("spec", ACTIVE_ROUNDS, ids=[r.name for r in ACTIVE_ROUNDS])
def test_committed_round_restores_complete_and_holds_training_systems_only(tmp_path, spec):
    """The stages after the active-learning rounds train on the committed rounds as they are:
    restoring one gives a complete round of its declared options (no model is loaded: the path
    below does not exist), every frame labelled, no validation or test system in it, and only
    the round's own starts."""
    from eqv2_calc.train.distill import active_round

    assert spec.archive.is_file()
    train_file = active_round(tmp_path / "al", spec, tmp_path / "no-base", tmp_path / "no-model.pt", workers=1,
                              relabel=False)
    manifest = json.loads((tmp_path / "al" / "manifest.json").read_text())
    frames = read(train_file, index=":")
    assert manifest["complete"] and len(frames) == manifest["frames"] > 0
    base = manifest["options"]["base"]
    assert base == dd.generation_options(**(spec.base.options if spec.base else {}))
    assert manifest["options"] == ad.active_options(base, manifest["options"]["checkpoint_sha256"], **spec.options)
    split = {dd.system_name(*j["system"]): j["split"] for j in dd.job_list(base) if j["kind"] == "system"}
    assert {split[f.info["system"]] for f in frames} == {"train"}
    held_out = {dd.system_name(*j["system"]) for j in dd.job_list(dd.generation_options())
                if j["kind"] == "system" and j["split"] != "train"}
    assert len(held_out) > 0 and not held_out & {f.info["system"] for f in frames}
    assert {f.info["kind"] for f in frames} == {"ml-path"}
    first = spec.options.get("first_start", 0)
    assert {f.info["start"] for f in frames} == set(range(first, first + spec.options["n_starts"]))
    assert all(np.isfinite(f.get_forces()).all() and np.abs(f.get_forces()).max() <= 100.0 for f in frames)


def test_rounds_relax_disjoint_starts_and_each_stage_trains_on_all_rounds_so_far(tmp_path):
    from eqv2_calc.train.distill import DISTILL_STAGE3, SMOOTH_GRAPH, distill_config

    starts = [(r.base, set(range(r.options.get("first_start", 0), r.options.get("first_start", 0) + r.options["n_starts"])))
              for r in ACTIVE_ROUNDS]  # rounds on the same systems relax different starts
    assert all(not (a & b) for i, (base, a) in enumerate(starts) for other, b in starts[i + 1:] if other == base)
    assert ACTIVE_ROUNDS[0].stage == DISTILL_STAGE3
    rounds = [tmp_path / r.name / "train.extxyz" for r in ACTIVE_ROUNDS]
    cfg = distill_config(tmp_path / "data", tmp_path / "out", ACTIVE_ROUNDS[-1].stage, tmp_path / "init.pt",
                         extra_train=rounds)
    assert cfg.train == [str(tmp_path / "data" / "train.extxyz"), *map(str, rounds)]
    assert cfg.val == [str(tmp_path / "data" / "val.extxyz")]
    assert cfg.model == SMOOTH_GRAPH and not cfg.refit_normalizers and cfg.init_checkpoint == str(tmp_path / "init.pt")


def test_committed_round_is_not_mixed_into_another_round(tmp_path):
    """A directory that already holds a round (here: other options, unfinished) gets nothing from
    the archive, and the new round with other options is refused with a clear error."""
    from eqv2_calc.train.distill import active_round

    out = tmp_path / "al"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"options": {"n_starts": 9}, "complete": False}))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "manifest.json").write_text(json.dumps({"options": dd.generation_options()}))
    with pytest.raises(InputError, match="other options"):
        active_round(out, ACTIVE_ROUNDS[0], tmp_path / "base", shipped_checkpoint("7net"), workers=1,
                     relabel=False)
    assert not (out / "train.extxyz").exists() and not list(out.glob("jobs/*"))

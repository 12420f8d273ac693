"""eqv2_calc.resume: one settings fingerprint / resume check for `eqv2 relax`, `eqv2 train` and
`adsorbml run` (allow-lists of the result-determining settings; execution settings may change)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import write

from eqv2_calc.errors import InputError, RelaxationError
from eqv2_calc.resume import (
    SettingsMismatchError,
    canonical_json,
    check_or_record,
    check_settings,
    select_settings,
    settings_diff,
    settings_sha256,
    structure_fingerprint,
)


def test_canonical_json_and_sha256():
    a = {"fmax": 0.05, "steps": 300, "slabs": [{"bulk": "Pt", "miller": (1, 1, 1)}], "flag": np.bool_(True)}
    b = {"slabs": [{"miller": [1, 1, 1], "bulk": "Pt"}], "flag": True, "steps": np.int64(300), "fmax": 0.05}
    assert canonical_json(a) == canonical_json(b) == (
        '{"flag":true,"fmax":0.05,"slabs":[{"bulk":"Pt","miller":[1,1,1]}],"steps":300}')
    assert settings_sha256(a) == settings_sha256(b) == hashlib.sha256(canonical_json(a).encode()).hexdigest()
    assert settings_sha256({**a, "fmax": 0.050000001}) != settings_sha256(a)
    assert select_settings({"x": (1, 2), "y": 3, "device": "cuda"}, ["y", "x"]) == {"y": 3, "x": [1, 2]}
    with pytest.raises(KeyError):
        select_settings({"x": 1}, ["x", "y"])


def test_check_settings_lists_every_difference():
    stored = {"fmax": 0.05, "steps": 300, "seed": 0, "old_key": 1}
    check_settings(None, {"fmax": 0.01}, where="x")  # nothing recorded: fine
    check_settings({"fmax": 0.05, "steps": 300}, {"steps": 300, "fmax": 0.05}, where="x")
    diff = settings_diff(stored, {"fmax": 0.01, "steps": 300, "seed": 0, "new_key": "a"})
    assert list(diff) == ["fmax", "new_key", "old_key"]  # current keys first, then stored-only ones
    assert diff["fmax"] == (0.05, 0.01) and diff["new_key"][1] == "a" and diff["old_key"][0] == 1
    with pytest.raises(SettingsMismatchError) as info:
        check_settings(stored, {"fmax": 0.01, "steps": 300, "seed": 2, "old_key": 1}, where="runs/a",
                       hint="use another --out")
    msg = str(info.value)
    assert msg.startswith("cannot resume: runs/a holds results made with other settings")
    assert "fmax: 0.05 → 0.01" in msg and "seed: 0 → 2" in msg and "steps" not in msg
    assert msg.endswith("rerun with the same settings, or use another --out")
    # keys that old files did not record take the value that was in effect then
    check_settings({"fmax": 0.05}, {"fmax": 0.05, "dtype": "float32"}, where="x", assume={"dtype": "float32"})
    with pytest.raises(InputError, match=r'dtype: "float32" → "float64"'):
        check_settings({"fmax": 0.05}, {"fmax": 0.05, "dtype": "float64"}, where="x",
                       assume={"dtype": "float32"}, error=InputError)
    with pytest.raises(SettingsMismatchError, match=r"new: \(not recorded\) → 1"):
        check_settings({}, {"new": 1}, where="x")


def test_check_or_record(tmp_path):
    path = tmp_path / "run" / "run.json"
    rec = check_or_record(path, {"fmax": 0.05, "steps": 3}, extra={"input": "in.xyz"})
    on_disk = json.loads(path.read_text())
    assert on_disk == rec == {"input": "in.xyz", "settings": {"fmax": 0.05, "steps": 3},
                              "settings_sha256": settings_sha256({"fmax": 0.05, "steps": 3})}
    check_or_record(path, {"steps": 3, "fmax": 0.05}, extra={"input": "other.xyz"})  # extra is not compared
    assert json.loads(path.read_text())["input"] == "other.xyz"
    before = path.read_text()
    with pytest.raises(RelaxationError, match="steps: 3 → 4"):
        check_or_record(path, {"fmax": 0.05, "steps": 4}, error=RelaxationError)
    assert path.read_text() == before  # a refused resume leaves the record alone
    path.write_text("{not json")
    with pytest.raises(SettingsMismatchError, match="not a settings file"):
        check_or_record(path, {"fmax": 0.05})


def test_structure_fingerprint_sees_what_determines_a_relaxation():
    from ase.constraints import FixAtoms

    from eqv2_calc.relax.testing import slab_systems

    a = slab_systems(1)[0]
    base = structure_fingerprint(a)
    assert structure_fingerprint(a.copy()) == base
    b = a.copy()
    b.positions[0, 2] += 1e-9
    c = a.copy()
    c.set_constraint(FixAtoms(indices=[0]))
    d = a.copy()
    d.info["note"] = "info does not matter"
    assert structure_fingerprint(b) != base and structure_fingerprint(c) != base
    assert structure_fingerprint(d) == base


# ------------------------------------------------------------------ allow-lists are complete
def test_every_relax_option_is_a_setting_or_an_execution_option():
    import argparse

    from eqv2_calc.relax import cli

    sub = argparse.ArgumentParser().add_subparsers()
    parser = cli.add_parser(sub)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    settings = set(cli.SETTINGS_KEYS) - {"potential"}
    assert not settings & set(cli.EXECUTION_ARGS) and settings <= dests
    unlisted = dests - settings - set(cli.POTENTIAL_ARGS) - set(cli.EXECUTION_ARGS)
    assert not unlisted, f"decide whether {unlisted} determine results (SETTINGS_KEYS) or not (EXECUTION_ARGS)"


def test_every_adsorbml_and_train_field_is_classified():
    from adsorbml.workflow import RunConfig
    from eqv2_calc.train.loop import RESUME_FREE, RESUME_KEYS, TrainConfig

    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert not set(RunConfig.RESULT_FIELDS) & set(RunConfig.EXECUTION_FIELDS)
    assert set(RunConfig.RESULT_FIELDS) | set(RunConfig.EXECUTION_FIELDS) == run_fields
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not set(RESUME_KEYS) & set(RESUME_FREE)
    assert set(RESUME_KEYS) | set(RESUME_FREE) == train_fields


# ------------------------------------------------------------------ the three commands
def _relax_args(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["relax", str(inp), "--calculator", "emt", "--out", str(out), "--no-progress", "--steps", "20", *extra]


def test_relax_resumes_with_other_execution_settings_only(tmp_path, capsys):
    from eqv2_calc.cli import main
    from eqv2_calc.relax.testing import slab_systems

    inp, out = tmp_path / "in.extxyz", tmp_path / "out"
    write(inp, slab_systems(2, rattle=0.05), format="extxyz")
    assert main(_relax_args(inp, out)) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["potential"] == "calculator:emt" and run["settings"]["dtype"] is None
    assert run["settings_sha256"] == settings_sha256(run["settings"])
    # execution settings may change: everything is read back
    assert main(_relax_args(inp, out, "--max-atoms", "7", "--save-every", "2", "--device", "cpu")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 2 and summary["this_run"]["potential_calls"] == 0
    # result settings may not; the message names them with both values
    capsys.readouterr()
    assert main(_relax_args(inp, out, "--fmax", "0.01", "--memory", "5")) == 2
    err = capsys.readouterr().err
    assert "fmax: 0.05 → 0.01" in err and "memory: 100 → 5" in err and "--out" in err
    # the same calculator spelled differently is the same setting; another one is not
    assert main([*_relax_args(inp, out)[:3], "EMT", *_relax_args(inp, out)[4:]]) == 0
    assert main([*_relax_args(inp, out)[:3], "ase.calculators.emt:EMT", *_relax_args(inp, out)[4:]]) == 2
    assert 'potential: "calculator:emt" → "calculator:ase.calculators.emt:EMT"' in capsys.readouterr().err


def test_relax_reads_run_files_of_the_previous_format(tmp_path):
    from eqv2_calc.cli import main
    from eqv2_calc.relax.testing import slab_systems

    inp, out = tmp_path / "in.extxyz", tmp_path / "out"
    write(inp, slab_systems(1, rattle=0.05), format="extxyz")
    assert main(_relax_args(inp, out)) == 0
    run = json.loads((out / "run.json").read_text())
    legacy = {"input": run["input"], "settings": {k: v for k, v in run["settings"].items() if k != "dtype"}}
    (out / "run.json").write_text(json.dumps(legacy))  # as written before dtype and the sha256
    assert main(_relax_args(inp, out)) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] == 1


def test_adsorbml_store_names_the_differing_settings(tmp_path):
    from adsorbml.store import RunStore, StoreError
    from adsorbml.workflow import RunConfig

    cfg = RunConfig.from_dict({"slabs": ["Pt:111"], "adsorbates": ["*O"], "max_atoms": 100})
    st = RunStore(tmp_path)
    st.begin_run(cfg.to_dict(), cfg.fingerprint())
    assert "max_atoms" not in cfg.fingerprint()
    assert st.metadata["fingerprint_sha256"] == settings_sha256(cfg.fingerprint())
    other_exec = dataclasses.replace(cfg, max_atoms=5)
    assert st.begin_run(other_exec.to_dict(), other_exec.fingerprint()) == 2
    other = dataclasses.replace(cfg, seed=4, fmax=0.05)
    with pytest.raises(StoreError) as info:
        st.begin_run(other.to_dict(), other.fingerprint())
    assert "seed: 0 → 4" in str(info.value) and "fmax: 0.02 → 0.05" in str(info.value)


def test_train_resume_check():
    from eqv2_calc.train.loop import TrainConfig, _check_resume

    cfg = TrainConfig.from_dict({"train": ["a.extxyz"], "out_dir": "runs/x", "lr": 1e-3, "threads": 1})
    stored = cfg.to_dict()
    _check_resume({**stored, "threads": 2, "epochs": 50, "val": ["v.extxyz"], "out_dir": "elsewhere"}, cfg)
    with pytest.raises(InputError) as info:
        _check_resume({**stored, "lr": 5e-3, "seed": 1}, cfg)
    msg = str(info.value)
    assert msg.startswith("cannot resume: the training run in runs/x")
    assert "lr: 0.005 → 0.001" in msg and "seed: 1 → 0" in msg and "--no-resume" in msg

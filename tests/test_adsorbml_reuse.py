"""adsorbml.reuse: a run that takes another run's ground truth is scored against the same
targets as one that relaxes everything itself, without a single ground-truth relaxation."""

from __future__ import annotations

import json

import pytest
from ase.build import fcc111
from ase.io import write

from adsorbml.errors import InputError
from adsorbml.reuse import COPIED_STAGES, GROUND_TRUTH_FIELDS, copy_ground_truth
from adsorbml.store import RunStore
from adsorbml.workflow import RunConfig, run_workflow


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reuse")
    write(tmp / "Pt111.extxyz", fcc111("Pt", size=(2, 2, 3), vacuum=8.0))
    base = {"slabs": [{"file": str(tmp / "Pt111.extxyz")}], "adsorbates": ["*O"], "num_random": 3,
            "heuristic": False, "seed": 1, "k": 2, "steps": 40, "gt_steps": 40, "ml_calculator": "emt",
            "dft_calculator": "emt", "ground_truth": True}
    run_workflow(RunConfig.from_dict({**base, "fmax": 0.05}), tmp / "a", plots=False, progress=False, log=lambda m: None)
    return tmp, base


def test_copied_ground_truth_gives_the_targets_of_a_full_run(source, tmp_path):
    tmp, base = source
    other = RunConfig.from_dict({**base, "fmax": 0.1, "steps": 20})  # another ML side
    n = copy_ground_truth(tmp / "a", tmp_path / "b", other)
    src = RunStore(tmp / "a", create=False)
    assert n == sum(src.count(s) for s in COPIED_STAGES) and src.count("gt") == 3
    assert set(GROUND_TRUTH_FIELDS) <= set(RunConfig.RESULT_FIELDS)  # all of them compared on resume too
    b = run_workflow(other, tmp_path / "b", plots=False, progress=False, log=lambda m: None)
    assert b.gt_relaxed_now == 0 and b.ml_relaxed_now == 3
    full = run_workflow(other, tmp_path / "c", plots=False, progress=False, log=lambda m: None)
    assert full.gt_relaxed_now == 3
    for name in ("targets.json", "compute.json", "results.json"):
        assert json.loads((tmp_path / "b" / name).read_text()) == json.loads((tmp_path / "c" / name).read_text())
    # a directory holding a run keeps its own rows
    assert copy_ground_truth(tmp / "a", tmp_path / "b", other) == 0


def test_refuses_another_ground_truth_or_none(source, tmp_path):
    tmp, base = source
    with pytest.raises(InputError, match=r"seed: 1 there, 2 here"):
        copy_ground_truth(tmp / "a", tmp_path / "b", RunConfig.from_dict({**base, "seed": 2}))
    with pytest.raises(InputError, match="gt_steps"):
        copy_ground_truth(tmp / "a", tmp_path / "b", RunConfig.from_dict({**base, "gt_steps": 41}))
    with pytest.raises(InputError, match="does not exist"):
        copy_ground_truth(tmp_path / "nothing", tmp_path / "b", RunConfig.from_dict(base))
    assert not (tmp_path / "b").exists()

"""adsorbml.pipeline end to end with EMT as both the "ML" model and the "DFT", and the metrics CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT

from adsorbml.cli import main
from adsorbml.inputs import prepare_slab
from adsorbml.metrics import write_results, write_targets
from conftest import markdown_table


@pytest.mark.slow
def test_run_system_emt():
    from adsorbml.pipeline import run_system

    slab = prepare_slab(fcc111("Cu", size=(3, 3, 3), vacuum=8.0), "Cu111", min_ab=7.0)
    res = run_system(slab, "*O", EMT(), dft_calculator=EMT(), num_random=3, heuristic=False, k=2,
                     seed=0, steps=100, progress=False)
    assert [r.config_id for r in res.ml] == ["rand0", "rand1", "rand2"]
    energies = [r.ml_energy for r in res.ranked]
    assert energies == sorted(energies)
    assert all(r.anomaly == "ok" for r in res.ranked)
    assert list(res.dft) == [r.config_id for r in res.ranked[:2]]
    for r in res.ranked[:2]:
        a = r.atoms.copy()
        a.calc = EMT()
        assert res.dft[r.config_id].energy == pytest.approx(a.get_potential_energy(), abs=1e-8)
        # the relaxed O stays bonded to the surface, below the slab top + 2.5 Å
        assert r.atoms.positions[-1, 2] < slab.atoms.positions[:, 2].max() + 2.5
    entry = res.results_entry()
    assert entry[res.ranked[0].config_id]["ionic_steps"] == 1
    assert np.isfinite(res.ml_seconds) and res.ml_force_calls >= 3


def test_metrics_cli(tmp_path, capsys):
    write_targets(tmp_path / "t.json", {"s": [("a", -1.0)], "u": [("a", -2.0)]})
    write_results(tmp_path / "r.json", {"s": {"c": {"ml_energy": -1.2, "ml+dft_energy": -0.95}}, "u": {}})
    files = ["--targets", str(tmp_path / "t.json"), "--results", str(tmp_path / "r.json"), "--k", "2"]
    assert main(["metrics", *files, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # by hand, for k = 1 and 2 alike (one result): s: −0.95 − (−1.0) = 0.05 ≤ 0.1 succeeds, not
    # "much better" (< −0.1); u has nothing valid. ML-only: s's DFT −0.95 is 0.25 eV from its ML
    # energy −1.2 (> 0.1), so it does not count. No compute file: no speedups.
    for k, row in zip((1, 2), rows, strict=True):
        assert row == {"k": k, "success": 0.5, "much_better": 0.0, "speedup_scf": None, "speedup_ionic": None,
                       "ml_only_success": 0.0, "n_systems": 2, "ml_seconds_per_relaxation": None}
    assert main(["metrics", *files]) == 0
    table = markdown_table(capsys.readouterr().out)
    assert [(r["k"], r["success"], r["much better"], r["ML-only success"], r["systems"]) for r in table] == [
        ("1", "50.0 %", "0.0 %", "0.0 %", "2"), ("2", "50.0 %", "0.0 %", "0.0 %", "2")]
    assert main(["metrics", "--targets", str(tmp_path / "nope.json"), "--results", str(tmp_path / "r.json")]) == 2

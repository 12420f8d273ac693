"""adsorbml.pipeline.run_system with EMT as both the "ML" model and the "DFT", and the metrics CLI."""

from __future__ import annotations

import json

import pytest
from ase.build import fcc111, molecule
from ase.calculators.emt import EMT
from ase.optimize import BFGS

from adsorbml.cli import main
from adsorbml.formats import write_results, write_targets
from adsorbml.inputs import prepare_slab
from conftest import markdown_table


def _emt(atoms):
    a = atoms.copy()
    a.calc = EMT()
    return a.get_potential_energy()


def _emt_epsilon_o() -> float:
    """ε_O = E(H2O) − E(H2), EMT molecules relaxed here with ase.optimize (no pbc, 10 Å vacuum)."""
    e = {}
    for m in ("H2", "H2O"):
        a = molecule(m, vacuum=10.0)
        a.pbc = False
        a.calc = EMT()
        BFGS(a, logfile=None).run(fmax=1e-4, steps=2000)
        e[m] = a.get_potential_energy()
    return e["H2O"] - e["H2"]


@pytest.mark.slow
def test_run_system_emt(tmp_path):
    """run_system is the workflow's stages on one system: its answer in adsorption energies equals
    the OC20 formula on EMT energies computed here, and the run directory is a normal, resumable one."""
    from adsorbml.pipeline import run_system

    slab = prepare_slab(fcc111("Cu", size=(3, 3, 3), vacuum=8.0), "Cu111", min_ab=7.0)
    kw = dict(dft_calculator=EMT(), num_random=3, heuristic=False, k=2, seed=0, steps=100, progress=False)
    run = run_system(slab, "*O", EMT(), out_dir=tmp_path / "run", **kw)
    res = run.results
    assert res.system_id == "Cu111_O" and run.summary.ml_relaxed_now == 3
    assert [r.config_id for r in res.ml] == ["rand0", "rand1", "rand2"]
    energies = [r.ml_energy for r in res.ranked]
    assert energies == sorted(energies) and all(r.anomaly == "ok" for r in res.ranked)
    top = res.ranked[:2]
    assert sorted(res.dft) == sorted(r.config_id for r in top)
    # independent truth: EMT single points on the relaxed structures, EMT molecules, the formula
    eps_o = _emt_epsilon_o()
    e_slab = _emt(run.relaxed_slab)
    assert run.relaxed_slab.get_chemical_formula() == slab.atoms.get_chemical_formula()
    for r in top:
        assert res.dft[r.config_id] == pytest.approx(_emt(r.atoms), abs=1e-8)
        # the relaxed O stays bonded to the surface, below the slab top + 2.5 Å
        assert r.atoms.positions[-1, 2] < slab.atoms.positions[:, 2].max() + 2.5
    hand = min(_emt(r.atoms) for r in top) - e_slab - eps_o
    assert run.e_ads == pytest.approx(hand, abs=1e-3)  # run's molecules relaxed to 0.01 eV/Å, ours to 1e-4
    assert res.answer.source == "ml+dft" and res.answer.anomaly_free
    best = res.results[res.answer.config_id]
    assert best["ml+dft_energy"] == run.e_ads and best["ionic_steps"] == 1
    # the same run directory resumes without redoing anything; a temporary one gives the same answer
    again = run_system(slab, "*O", EMT(), out_dir=tmp_path / "run", **kw)
    assert again.summary.run_id == 2 and again.summary.ml_relaxed_now == 0 and again.summary.dft_now == 0
    assert again.e_ads == run.e_ads
    assert run_system(slab, "*O", EMT(), **kw).e_ads == pytest.approx(run.e_ads, abs=1e-9)
    # the stored config reads back (adsorbml import uses it); resuming needs the slab object again
    from adsorbml.config import RunConfig
    from adsorbml.errors import InputError
    from adsorbml.store import RunStore
    from adsorbml.workflow import run_workflow

    stored = dict(RunStore(tmp_path / "run", create=False).config)
    stored.pop("energy_scheme")
    cfg = RunConfig.from_dict(stored)
    assert cfg.slabs[0].structure_sha256 and cfg.slabs[0].record is None
    with pytest.raises(InputError, match="given in memory"):
        run_workflow(cfg, tmp_path / "run", ml_calculator=EMT(), dft_calculator=EMT(), progress=False, log=print)


def test_run_system_rejects_a_plain_atoms():
    from adsorbml.errors import InputError
    from adsorbml.pipeline import run_system

    with pytest.raises(InputError, match="prepare_slab"):
        run_system(fcc111("Cu", size=(3, 3, 3), vacuum=8.0), "*O", EMT())


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

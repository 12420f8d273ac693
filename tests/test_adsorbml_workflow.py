"""adsorbml.workflow / CLI: config parsing and errors, a tiny ground-truth run, export, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import fcc111
from ase.io import read, write

from adsorbml.cli import main
from adsorbml.errors import InputError, UnknownAdsorbateError
from adsorbml.store import RunStore
from adsorbml.workflow import RunConfig, SlabSpec, load_config
from conftest import markdown_table


def test_slab_spec_parsing():
    assert SlabSpec.parse("Pt:111").miller == (1, 1, 1)
    assert SlabSpec.parse("bulk.cif:1,-1,0") == SlabSpec(bulk="bulk.cif", miller=(1, -1, 0))
    assert SlabSpec.parse({"bulk": "Cu", "miller": [1, 0, 0], "max_slabs": 2}).max_slabs == 2
    for bad in ("Pt", "Pt:000", "Pt:1x1", {"file": "a", "bulk": "Cu", "miller": "111"}, {"bulk": "Cu"}, {"fil": "x"}):
        with pytest.raises(InputError):
            SlabSpec.parse(bad)


def test_run_config_errors(tmp_path):
    ok = {"slabs": ["Pt:111"], "adsorbates": ["*O"]}
    assert RunConfig.from_dict(ok).fmax == 0.02 and RunConfig.from_dict(ok).steps == 300
    with pytest.raises(InputError, match="unknown config keys"):
        RunConfig.from_dict({**ok, "placement": 3})
    with pytest.raises(UnknownAdsorbateError, match="available"):
        RunConfig.from_dict({**ok, "adsorbates": ["*XYZ"]})
    with pytest.raises(InputError, match="no slabs"):
        RunConfig.from_dict({"adsorbates": ["*O"]})
    with pytest.raises(InputError, match="ground_truth needs"):
        RunConfig.from_dict({**ok, "ground_truth": True, "dft_calculator": "none"})
    with pytest.raises(InputError, match="anomaly checks"):
        RunConfig.from_dict({**ok, "checks": ["melted"]})
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    # the CLI turns these into exit code 2 with a message
    assert main(["run", "--out", str(tmp_path / "o"), "--surface", "Pt:111"]) == 2
    assert main(["run", "--out", str(tmp_path / "o"), "--surface", "Pt:111", "--adsorbate", "*O",
                 "--ml-calculator", "emt", "--dft-calculator", "vasp"]) == 2
    assert main(["run", "--out", str(tmp_path / "o"), "--surface", "Pt:111", "--adsorbate", "*O",
                 "--ml-calculator", "nosuchmodule:Calc"]) == 2
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.slow
def test_tiny_ground_truth_run_outputs_export_and_metrics(tmp_path, capsys):
    slab = tmp_path / "Pt111.extxyz"
    write(slab, fcc111("Pt", size=(3, 3, 3), vacuum=8.0))
    cfg = {"slabs": [{"file": str(slab)}], "adsorbates": ["*O"], "num_random": 3, "heuristic": False,
           "seed": 1, "k": 2, "steps": 40, "gt_steps": 40, "ml_calculator": "emt", "dft_calculator": "emt",
           "ground_truth": True}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "run.json"), "--out", str(out), "--quiet"]) == 0
    st = RunStore(out, create=False)
    sid = "Pt111_O"
    # files agree with the store (independent read of the rows)
    targets = json.loads((out / "targets.json").read_text())
    gt = [r for r in st.rows("gt", sid)]
    assert len(gt) == 3 and st.count("slab_gt") == 1
    valid = [r.gt_energy for r in gt if r.anomaly == "ok"]
    # the files hold adsorption energies: EMT totals − E_EMT(ground-truth relaxed clean slab) − ε_O,
    # ε_O = E(H2O) − E(H2) from EMT molecules (references "dft" by default with EMT as the DFT)
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    mol = {}
    for m in ("H2", "H2O"):
        a = molecule(m, vacuum=10.0)
        a.pbc = False
        a.calc = EMT()
        BFGS(a, logfile=None).run(fmax=0.001)
        mol[m] = a.get_potential_energy()
    eps_o = mol["H2O"] - mol["H2"]
    slab_gt = st.get("slab_gt", "Pt111", "slab").gt_energy
    off = slab_gt + eps_o
    assert st.config["references"] == "dft" and st.config["ml_energy_convention"] == "total"
    assert min(e for _, e in targets[sid]) == pytest.approx(min(valid) - off, abs=2e-3)
    energies = json.loads((out / "energies.json").read_text())
    assert energies["systems"][sid]["dft_slab_energy"] == pytest.approx(slab_gt, abs=1e-9)
    assert energies["systems"][sid]["dft"] == pytest.approx(off, abs=2e-3)
    assert "ground-truth" in energies["systems"][sid]["dft_slab_reference"]
    ml_off = st.get("slab_ml", "Pt111", "slab").ml_energy + eps_o
    compute = json.loads((out / "compute.json").read_text())
    assert sorted(compute[sid]) == sorted(["rand0", "rand1", "rand2", "surface"])
    assert all(compute[sid][r.config_id]["ionic"] == r.nsteps + 1 for r in gt)
    results = json.loads((out / "results.json").read_text())
    ml_ok = sorted((r.ml_energy, r.config_id) for r in st.rows("ml", sid) if r.anomaly == "ok")
    assert list(results[sid]) == [c for _, c in ml_ok]  # same ranking in E_ads and in totals
    for e_ml, c in ml_ok:
        assert results[sid][c]["ml_energy"] == pytest.approx(e_ml - ml_off, abs=2e-3)
    with_dft = [c for c, e in results[sid].items() if e["ml+dft_energy"] is not None]
    assert with_dft == [c for _, c in ml_ok[:2]]
    for c in with_dft:  # the single point is EMT on the ML-relaxed structure
        a = st.get("ml", sid, c).toatoms()
        a.calc = EMT()
        assert results[sid][c]["ml+dft_energy"] == pytest.approx(a.get_potential_energy() - off, abs=2e-3)
        assert results[sid][c]["ionic_steps"] == 1
    assert (out / "plots" / f"{sid}.png").stat().st_size > 1000
    # metrics.md, checked against success@k / speedup worked out from the files above: the best
    # ML+DFT energy among the k lowest-ML-energy valid placements vs the ground-truth minimum;
    # speedup (ionic) = ground-truth force calls of all placements / k single points
    table = markdown_table((out / "metrics.md").read_text())
    assert [row["k"] for row in table] == ["1", "2"]
    gt_min = min(e for _, e in targets[sid])
    gt_calls = sum(v["ionic"] for c, v in compute[sid].items() if c != "surface")
    for k, row in zip((1, 2), table):
        best = min(e["ml+dft_energy"] for e in list(results[sid].values())[:k])
        assert row["success"] == ("100.0 %" if best - gt_min <= 0.1 else "0.0 %"), (k, best, gt_min)
        assert row["systems"] == "1"
        assert row["speedup (ionic / force calls)"] == f"{gt_calls / k:,.1f}×"

    # export: top-2 VASP inputs + extxyz, best first
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    frames = read(tmp_path / "exp" / sid / "top_k.extxyz", ":")
    assert [f.info["config_id"] for f in frames] == with_dft
    poscar = read(tmp_path / "exp" / sid / with_dft[0] / "POSCAR")
    assert np.allclose(poscar.positions, st.get("ml", sid, with_dft[0]).positions, atol=1e-5)

    # the written OC20-Dense files score with `adsorbml metrics`
    capsys.readouterr()
    assert main(["metrics", "--targets", str(out / "targets.json"), "--results", str(out / "results.json"),
                 "--compute", str(out / "compute.json"), "--k", "2", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert [row["k"] for row in scored] == [1, 2]
    for row, md_row in zip(scored, table):
        assert f"{100 * row['success']:.1f} %" == md_row["success"]
        assert row["speedup_ionic"] == pytest.approx(gt_calls / row["k"])
        assert row["n_systems"] == 1

    # resuming with other settings is refused, with the differing keys named
    cfg["seed"] = 2
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["run", "--config", str(tmp_path / "run.json"), "--out", str(out), "--quiet"]) == 2
    assert "seed" in capsys.readouterr().err


def test_demo_without_the_shipped_model_is_an_error_not_an_emt_fallback(tmp_path, monkeypatch, capsys):
    """A missing shipped model stops the demo with a message; EMT as the 'ML' model only on request."""
    import adsorbml.workflow as wf
    from adsorbml.workflow import RunSummary
    from eqv2_calc.checkpoint import registry
    from eqv2_calc.errors import CheckpointError

    seen = {}

    def fake_run(cfg, out, **kw):
        seen["cfg"], seen["out"] = cfg, out
        return RunSummary(tmp_path, 1, [], 0, 0, 0, 0, 0, 0.0)

    def missing(variant="emt"):
        raise CheckpointError("the shipped model eqv2-emt-small.pt is not part of this installation")

    monkeypatch.setattr(wf, "run_workflow", fake_run)
    monkeypatch.chdir(tmp_path)
    real = registry.shipped_checkpoint
    monkeypatch.setattr(registry, "shipped_checkpoint", missing)
    assert main(["demo", "--quiet", "--toy"]) == 2
    err = capsys.readouterr().err
    assert "eqv2-emt-small.pt" in err and "--ml-calculator emt" in err
    assert not seen  # nothing ran

    assert main(["demo", "--quiet", "--toy", "--ml-calculator", "emt"]) == 0  # explicit request only
    cfg = seen["cfg"]
    assert cfg.ml_calculator == "emt" and cfg.dft_calculator == "emt" and cfg.ground_truth
    assert [s.to_dict() for s in cfg.slabs] == [{"bulk": "Pt", "miller": [1, 1, 1], "max_slabs": 1},
                                                 {"bulk": "Cu", "miller": [1, 0, 0], "max_slabs": 1}]
    assert cfg.adsorbates == ["*CO", "*O", "*OH"] and cfg.fmax == 0.02 and cfg.steps == 300
    assert str(seen["out"]).endswith("adsorbml-demo/emt")

    monkeypatch.setattr(registry, "shipped_checkpoint", real)
    assert main(["demo", "--quiet", "--toy"]) == 0
    import hashlib

    sha8 = hashlib.sha256(Path(real()).read_bytes()).hexdigest()[:8]  # the directory names the file's content
    assert seen["cfg"].ml_calculator == "shipped" and str(seen["out"]).endswith(f"adsorbml-demo/eqv2-emt-small-{sha8}")
    assert f"shipped EquiformerV2 checkpoint ({real()})" in capsys.readouterr().out


def test_demo_answers_with_the_distilled_model_and_teacher_single_points(tmp_path, monkeypatch, capsys):
    """The default demo: shipped-7net relaxes, SevenNet single points on the top k, teacher gas
    references on both sides, no ground truth; without the teacher a message with the install
    command (never a silent EMT stand-in)."""
    import sys

    import adsorbml.workflow as wf
    from adsorbml.workflow import RunSummary
    from eqv2_calc.checkpoint import registry

    seen = {}

    def fake_run(cfg, out, **kw):
        seen["cfg"], seen["out"] = cfg, out
        return RunSummary(tmp_path, 1, [], 0, 0, 0, 0, 0, 0.0)

    monkeypatch.setattr(wf, "run_workflow", fake_run)
    monkeypatch.chdir(tmp_path)
    fake_model = tmp_path / "eqv2-7net-small.pt"
    fake_model.write_bytes(b"")
    monkeypatch.setattr(registry, "shipped_checkpoint", lambda variant="emt": fake_model)
    import eqv2_calc.train.teacher as teacher

    monkeypatch.setattr(teacher, "make_teacher", lambda *a, **k: object())
    assert main(["demo", "--quiet"]) == 0
    cfg = seen["cfg"]
    assert (cfg.ml_calculator, cfg.dft_calculator, cfg.references, cfg.ground_truth) == (
        "shipped-7net", "sevennet", "dft", False)
    assert str(seen["out"]).endswith("adsorbml-demo/eqv2-7net-small-e3b0c442")  # sha256 of the empty file
    assert "SevenNet teacher" in capsys.readouterr().out

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(wf, "run_workflow", fake_run)
    monkeypatch.setitem(sys.modules, "sevenn.calculator", None)
    seen.clear()
    assert main(["demo", "--quiet"]) == 2
    assert "pip install 'eqv2-calc[teacher]'" in capsys.readouterr().err and not seen


def test_resume_refuses_another_checkpoint_under_the_same_name(tmp_path):
    """The checkpoint's sha256 is part of the fingerprint: replacing the file (e.g. a retrained
    shipped model) must not resume the old model's relaxations as if they were the new one's."""
    import shutil

    from adsorbml.store import StoreError
    from adsorbml.workflow import run_workflow
    from eqv2_calc.checkpoint import registry

    model = tmp_path / "model.pt"
    shutil.copyfile(registry.shipped_checkpoint("emt"), model)
    cfg = RunConfig.from_dict({"slabs": ["Cu:100"], "adsorbates": ["*O"], "num_random": 1, "heuristic": False,
                               "steps": 2, "ml_calculator": str(model), "dft_calculator": "none"})
    kw = dict(plots=False, progress=False, log=lambda _m: None)
    run_workflow(cfg, tmp_path / "run", **kw)
    fp = RunStore(tmp_path / "run", create=False).metadata["fingerprint"]
    assert fp["ml_model_sha256"] == registry.file_sha256(model)
    assert run_workflow(cfg, tmp_path / "run", **kw).run_id == 2  # the same file resumes

    shutil.copyfile(registry.shipped_checkpoint("7net"), model)
    with pytest.raises(StoreError, match="ml_model_sha256"):
        run_workflow(cfg, tmp_path / "run", **kw)

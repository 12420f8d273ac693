"""``adsorbml import RUN_DIR EXPORT_DIR``: finished VASP single points back into a run, through the CLI.

The run store is built by hand around the real VASP 5.4.4 fixture (``data/vasp/Ir12Re4_singlepoint``:
16-atom Ir12Re4 slab, σ→0 energy −140.07469344 eV, 22 SCF steps): its structure is the run's
ML-relaxed clean slab ``Ir12Re4``, and one *O placement sits on it. ``adsorbml export`` writes the
VASP inputs (clean slab + top k); the fixture's vasprun.xml goes into the clean slab's directory;
the placement's directory stays without output and must be reported by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from adsorbml.cli import main
from adsorbml.energies import build_scheme
from adsorbml.store import RunStore
from adsorbml.vasp_import import read_single_point
from adsorbml.workflow import RunConfig

IR12RE4 = Path(__file__).parent / "data" / "vasp" / "Ir12Re4_singlepoint"
E_SLAB = -140.07469344  # eV, σ→0 of the fixture
E_ML_SLAB, E_ML_ADSLAB = -139.9, -146.0  # made-up ML energies (total-energy convention), eV


def _run_dir(tmp_path: Path) -> Path:
    slab = read_single_point(IR12RE4).atoms
    slab = Atoms(slab.numbers, positions=slab.positions, cell=slab.cell, pbc=True)
    top = slab.positions[:, 2] > slab.positions[:, 2].max() - 1.0
    slab.set_tags(top.astype(int))
    ads = slab.copy()
    i = int(np.argmax(slab.positions[:, 2]))
    ads += Atoms("O", positions=[slab.positions[i] + [0.0, 0.0, 1.9]], tags=[2])
    cfg = RunConfig.from_dict({"slabs": [{"file": str(IR12RE4 / "vasprun.xml"), "slab_id": "Ir12Re4"}],
                               "adsorbates": ["*O"], "num_random": 1, "heuristic": False, "k": 1,
                               "ml_calculator": "emt", "dft_calculator": "none", "references": "oc20",
                               "ml_energy_convention": "total"})
    scheme = build_scheme("oc20", "total", None, None)
    out = tmp_path / "run"
    st = RunStore(out)
    st.begin_run(dict(cfg.to_dict(), energy_scheme=scheme.to_dict()), cfg.fingerprint())
    st.write("slab", "Ir12Re4", "slab", slab, {"run_id": 1})
    st.write("slab_ml", "Ir12Re4", "slab", slab, {"run_id": 1, "ml_energy": E_ML_SLAB, "converged": True,
                                                  "nsteps": 3, "force_calls": 4})
    st.write("placement", "Ir12Re4_O", "rand0", ads, {"run_id": 1, "slab_id": "Ir12Re4", "adsorbate": "*O",
                                                      "site_kind": "random"},
             {"site": ads.positions[-1].tolist(), "site_kind": "random", "binding_index": 0,
              "rotation": np.eye(3).tolist()})
    st.write("ml", "Ir12Re4_O", "rand0", ads, {"run_id": 1, "ml_energy": E_ML_ADSLAB, "anomaly": "ok",
                                               "converged": True, "nsteps": 5, "force_calls": 6})
    return out


def test_import_real_vasprun_through_the_cli(tmp_path, capsys):
    run = _run_dir(tmp_path)
    exp = tmp_path / "export"
    assert main(["export", str(run), "--out", str(exp)]) == 0
    assert (exp / "Ir12Re4" / "slab" / "POSCAR").is_file() and (exp / "Ir12Re4_O" / "rand0" / "INCAR").is_file()
    shutil.copy(IR12RE4 / "vasprun.xml", exp / "Ir12Re4" / "slab" / "vasprun.xml")
    capsys.readouterr()

    # the placement's single point has not run: reported by name, exit 1
    assert main(["import", str(run), str(exp), "--no-plots"]) == 1
    cap = capsys.readouterr()
    assert "imported Ir12Re4/slab: E = -140.0747 eV, 22 SCF steps, 1 ionic step(s) (vasprun.xml)" in cap.out
    assert "NOT IMPORTED Ir12Re4_O/rand0: no output" in cap.err and "--allow-missing" in cap.err
    st = RunStore(run, create=False)
    row = st.get("dft_sp", "Ir12Re4", "slab")
    assert row.dft_energy == pytest.approx(E_SLAB, abs=1e-8) and row.scf_steps == 22 and row.ionic_steps == 1
    assert row.dft_source.endswith("Ir12Re4/slab/vasprun.xml")
    assert st.metadata["runs"][-1]["command"] == "import"
    ev = [e for e in st.events() if e["event"] == "import"]
    assert len(ev) == 1 and ev[0]["scf_steps"] == 22 and ev[0]["energy"] == pytest.approx(E_SLAB, abs=1e-8)
    assert [e["name"] for e in st.events() if e["event"] == "import_problem"] == ["Ir12Re4_O/rand0"]

    # outputs recomputed: the DFT clean-slab energy of the system is the imported single point;
    # E_ads(ML) = E_ML − E_ML(slab) − ε_O(OC20) = −146.0 + 139.9 + 7.204 eV
    energies = json.loads((run / "energies.json").read_text())
    sysinfo = energies["systems"]["Ir12Re4_O"]
    assert sysinfo["dft_slab_energy"] == pytest.approx(E_SLAB, abs=1e-8)
    assert sysinfo["dft"] == pytest.approx(E_SLAB - 7.204, abs=1e-8)
    assert energies["scheme"]["references"] == "oc20" and "adsorption energies" in energies["note"]
    results = json.loads((run / "results.json").read_text())
    assert results["Ir12Re4_O"]["rand0"]["ml_energy"] == pytest.approx(E_ML_ADSLAB - E_ML_SLAB + 7.204, abs=1e-9)
    assert results["Ir12Re4_O"]["rand0"]["ml+dft_energy"] is None
    answer = json.loads((run / "summary.json").read_text())["systems"][0]
    assert (answer["config_id"], answer["source"]) == ("rand0", "ml")

    # a partial import on request; a row already imported is kept, never overwritten
    assert main(["import", str(run), str(exp), "--allow-missing", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "0 single points imported, 1 already in the store" in out and "kept Ir12Re4/slab: E = -140.0747 eV" in out
    # output of another structure in a placement's directory is refused, by name
    shutil.copy(IR12RE4 / "vasprun.xml", exp / "Ir12Re4_O" / "rand0" / "vasprun.xml")
    assert main(["import", str(run), str(exp), "--no-plots"]) == 1
    assert "NOT IMPORTED Ir12Re4_O/rand0: mismatch" in capsys.readouterr().err
    assert st.get("dft_sp", "Ir12Re4_O", "rand0") is None


def test_import_errors(tmp_path, capsys):
    assert main(["import", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "no AdsorbML store" in capsys.readouterr().err
    run = _run_dir(tmp_path)
    assert main(["import", str(run), str(tmp_path / "missing")]) == 2
    assert "export directory does not exist" in capsys.readouterr().err
    assert len(RunStore(run, create=False).metadata["runs"]) == 1  # nothing recorded

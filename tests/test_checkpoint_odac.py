"""The ODAC direct IS2RE model (``EquiformerV2-IS2RE-ODAC``): an energy-only checkpoint whose config
names the normalisation constants ``norm_scale_nodes`` / ``norm_scale_degree``.

Parity: tests/data/odac_is2re_tiny.pt and its reference energies were made by fairchem-core 1.10
(tests/reference/make_odac_fixture.py in the reference venv): fairchem's own ``EquiformerV2`` with
``regress_forces=False`` in the 2023 OCP IS2RE layout, evaluated by fairchem's OCPCalculator. fairchem
1.10 cannot build the file as it is (no ``norm_scale_*`` parameters: TypeError, recorded in the JSON),
so it evaluated a copy that names the constants ``avg_num_nodes`` / ``avg_degree``; the JSON also
holds fairchem's energies for the same weights with neither constant given (its defaults), which
the default branch of the loader is checked against. Tolerance 1e-4 eV. These tests never run
fairchem, except the ``reference`` ones at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.io import read

from conftest import DATA, refvenv_python
from eqv2_calc import EquiformerV2Calculator, load_model
from eqv2_calc.checkpoint import registry
from eqv2_calc.errors import CheckpointError, InputError
from eqv2_calc.graph.batch import atoms_to_batch
from eqv2_calc.model import AVG_DEGREE_OC20, AVG_NUM_NODES_OC20
from eqv2_calc.relax import relax_batch

HERE = Path(__file__).parent
ODAC = DATA / "odac_is2re_tiny.pt"
TOL_E = 1e-4  # eV
NAME = "EquiformerV2-IS2RE-ODAC"


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((DATA / "odac_is2re_tiny.reference.json").read_text())


def _raw() -> dict:
    return torch.load(ODAC, map_location="cpu", weights_only=True)


def _save(tmp_path: Path, ckpt: dict, name: str = "variant.pt") -> Path:
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def _energies(path, structures, dtype: str = "float32") -> dict[str, float]:
    calc = EquiformerV2Calculator(path, device="cpu", dtype=dtype)
    names = list(structures)
    return {n: r["energy"] for n, r in zip(names, calc.predict_batch([structures[n] for n in names]))}


# ----------------------------------------------------------------------------- the fixture
def test_fixture_has_the_odac_is2re_layout(ref):
    ckpt = _raw()
    attrs = ckpt["config"]["model_attributes"]
    assert ckpt["config"]["model"] == "equiformer_v2" and ckpt["config"]["trainer"] == "equiformerv2_energy"
    assert attrs["regress_forces"] is False
    assert attrs["norm_scale_nodes"] == 192.561 and attrs["norm_scale_degree"] == 21.024127419363214
    assert "avg_num_nodes" not in attrs and "avg_degree" not in attrs
    assert attrs["lmax_list"] == [4] and attrs["mmax_list"] == [2] and attrs["max_radius"] == 8.0
    assert not any("force_block" in k for k in ckpt["state_dict"])
    assert set(ckpt["normalizers"]) == {"target"}
    assert ODAC.stat().st_size < 1_000_000
    assert ref["checkpoint_sha256"] == hashlib.sha256(ODAC.read_bytes()).hexdigest()
    assert "unexpected keyword argument 'norm_scale_nodes'" in ref["fairchem_on_original_config"]


def test_fixture_is_not_trivial(ref):
    """The energies differ between structures, and from those of fairchem's default constants,
    by far more than the tolerance, so a wrong constant or normalizer is caught."""
    energies = np.array([v["energy"] for v in ref["structures"].values()])
    control = np.array(list(ref["fairchem_defaults_control"]["energies"].values()))
    assert np.ptp(energies) > 1000 * TOL_E
    assert np.abs(energies - control).min() > 100 * TOL_E
    assert max(v["repeat_diff"] for v in ref["structures"].values()) < 0.01 * TOL_E


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_calculator_energy_matches_fairchem(dtype, ref, structures):
    calc = EquiformerV2Calculator(ODAC, device="cpu", dtype=dtype)
    assert set(ref["structures"]) == set(structures)
    for name, expected in ref["structures"].items():
        atoms = structures[name].copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        assert abs(energy - expected["energy"]) < TOL_E, (name, energy, expected["energy"])
        assert set(calc.results) == {"energy"}


def test_predict_batch_matches_fairchem_without_forces(ref, structures):
    calc = EquiformerV2Calculator(ODAC, device="cpu")
    names = list(structures)
    results = calc.predict_batch([structures[n] for n in names], max_atoms=40)  # several packed batches
    for name, res in zip(names, results):
        assert set(res) == {"energy"}, name
        assert abs(res["energy"] - ref["structures"][name]["energy"]) < TOL_E, name


def test_norm_scale_values_are_the_constants(tmp_path, ref, structures):
    model, meta = load_model(ODAC)
    assert model.cfg.avg_num_nodes == 192.561 and model.cfg.avg_degree == 21.024127419363214
    assert not model.cfg.regress_forces and not hasattr(model, "force_block")
    # the same file with the constants under fairchem 1.10's names (what fairchem evaluated)
    ckpt = _raw()
    attrs = ckpt["config"]["model_attributes"]
    attrs["avg_num_nodes"], attrs["avg_degree"] = attrs.pop("norm_scale_nodes"), attrs.pop("norm_scale_degree")
    assert _energies(_save(tmp_path, ckpt), structures) == _energies(ODAC, structures)


def test_neither_name_gives_fairchems_default_constants(tmp_path, ref, structures):
    ckpt = _raw()
    for key in ("norm_scale_nodes", "norm_scale_degree"):
        del ckpt["config"]["model_attributes"][key]
    path = _save(tmp_path, ckpt)
    model, _ = load_model(path)
    assert model.cfg.avg_num_nodes == AVG_NUM_NODES_OC20 == 77.81317
    assert model.cfg.avg_degree == AVG_DEGREE_OC20 == 23.395238876342773
    control = ref["fairchem_defaults_control"]["energies"]
    for name, energy in _energies(path, structures).items():
        assert abs(energy - control[name]) < TOL_E, name


def test_both_names_agreeing_are_accepted_and_disagreeing_refused(tmp_path, structures):
    ckpt = _raw()
    ckpt["config"]["model_attributes"].update(avg_num_nodes=192.561, avg_degree=21.024127419363214)
    assert _energies(_save(tmp_path, ckpt, "same.pt"), structures) == _energies(ODAC, structures)
    ckpt["config"]["model_attributes"]["avg_degree"] = 23.395238876342773
    with pytest.raises(CheckpointError, match=r"avg_degree=23\.39.*norm_scale_degree=21\.02.*two different values"):
        load_model(_save(tmp_path, ckpt, "different.pt"))


@pytest.mark.parametrize("value", [-192.561, "many", float("inf"), [192.561]])
def test_bad_constant_is_refused(tmp_path, value):
    ckpt = _raw()
    ckpt["config"]["model_attributes"]["norm_scale_nodes"] = value
    with pytest.raises(CheckpointError, match=r"avg_num_nodes=.*must be a positive number"):
        load_model(_save(tmp_path, ckpt))


def test_hydra_file_with_only_an_energy_head_is_energy_only(tmp_path, ref, structures):
    """The same weights in the hydra layout (backbone + an energy head, fairchem 1.x normalizers)."""
    ckpt = _raw()
    sd = {}
    for key, value in ckpt["state_dict"].items():
        key = key.replace("module.", "")
        sd["module." + (f"output_heads.energy.{key}" if key.startswith("energy_block") else f"backbone.{key}")] = value
    backbone = {"model": "equiformer_v2_backbone", **copy.deepcopy(ckpt["config"]["model_attributes"])}
    target = ckpt["normalizers"]["target"]
    hydra = {"state_dict": sd, "normalizers": {"energy": {"mean": target["mean"], "rmsd": target["std"]}},
             "config": {"model": {"name": "hydra", "backbone": backbone,
                                  "heads": {"energy": {"module": "equiformer_v2_energy_head"}}}}}
    path = _save(tmp_path, hydra)
    assert EquiformerV2Calculator(path).implemented_properties == ("energy",)
    for name, energy in _energies(path, structures).items():
        assert abs(energy - ref["structures"][name]["energy"]) < TOL_E, name


# ----------------------------------------------------------------------------- energy only
def test_metadata_says_energy_only():
    calc = EquiformerV2Calculator(ODAC)
    meta = calc.metadata
    assert calc.implemented_properties == ("energy",)
    assert meta["properties"] == ("energy",)
    assert "no force head" in meta["architecture"]
    assert "energy-only model (direct IS2RE" in meta["energy_convention"]
    assert calc.potential.provides_forces is False and calc.potential.provides_stress is False
    s2ef = EquiformerV2Calculator(DATA / "eqv2_tiny_l4m2.pt")
    assert s2ef.potential.provides_forces and s2ef.metadata["properties"] == ("energy", "forces")
    assert "energy-only" not in s2ef.metadata["energy_convention"]


def test_asking_for_forces_names_the_reason(structures):
    atoms = structures["Pt100_OH"].copy()
    atoms.calc = EquiformerV2Calculator(ODAC)
    reason = r"odac_is2re_tiny\.pt is an energy-only model \(direct IS2RE, regress_forces=False: no force head\)"
    with pytest.raises(PropertyNotImplementedError, match=r"calc\.get_forces\(\): .*" + reason):
        atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError, match=r"free_energy.*" + reason):
        atoms.get_potential_energy(force_consistent=True)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    assert isinstance(atoms.get_potential_energy(), float)  # the energy still works


def test_relaxing_with_an_energy_only_model_is_refused(structures):
    atoms = structures["Fe110_N"]
    calc = EquiformerV2Calculator(ODAC)
    for potential in (calc, calc.potential):
        with pytest.raises(InputError, match=r"relaxing structures.*energy-only model.*EquiformerV2-S2EF-ODAC"):
            relax_batch([atoms], potential, fmax=0.05, steps=3, progress=False)
    with pytest.raises(InputError, match=r"potential\(batch\).*energy-only model"):
        calc.potential(atoms_to_batch([atoms], "cpu"))
    batch = atoms_to_batch([atoms], "cpu")
    energy, forces = calc.potential.evaluate(batch, calc.potential.graph(batch))
    assert forces is None and energy.shape == (1,) and energy.dtype == torch.float64


def test_predict_cli_writes_energies_only(tmp_path, ref):
    from eqv2_calc.cli import main

    out = tmp_path / "pred.extxyz"
    assert main(["predict", str(DATA / "structures.extxyz"), "--checkpoint", str(ODAC), "--out", str(out)]) == 0
    names = json.loads((DATA / "structure_names.json").read_text())
    for name, frame in zip(names, read(out, ":")):
        assert abs(frame.get_potential_energy() - ref["structures"][name]["energy"]) < TOL_E
        assert "forces" not in frame.calc.results


# ----------------------------------------------------------------------------- registry
def test_registry_entry():
    url = registry.OFFICIAL_CHECKPOINTS[NAME]
    assert url == "https://dl.fbaipublicfiles.com/dac/checkpoints_20231018/Equiformer_V2_Direct.pt"
    info = registry.MODEL_INFO[NAME]
    assert info["energy_only"] is True and "ODAC23" in info["training_data"] and "no forces" in info["note"]


def test_hand_downloaded_file_is_identified_by_name(tmp_path):
    path = tmp_path / "Equiformer_V2_Direct.pt"
    path.write_bytes(ODAC.read_bytes())
    _, meta = load_model(path)
    assert meta.model_info["registry_name"] == NAME and meta.model_info["identified_by"] == "file name"
    assert meta.model_info["energy_only"] is True


def test_readme_lists_the_name():
    readme = (HERE.parent / "README.md").read_text()
    assert f"`{NAME}`" in readme and "norm_scale_nodes" in readme


# ----------------------------------------------------------------------------- reference (fairchem venv)
@pytest.mark.reference
def test_registry_urls_match_fairchem_110():
    """Every URL entry equals fairchem 1.10's pretrained_models.json (the file in the reference venv)."""
    python = refvenv_python()
    listing = subprocess.run(
        [str(python), "-c", "import fairchem.core.models as m, os; print(os.path.join(os.path.dirname(m.__file__), "
         "'pretrained_models.json'))"], capture_output=True, text=True, check=True).stdout.strip()
    fairchem = json.loads(Path(listing).read_text())
    assert fairchem[NAME] == {"type": "url", "url": registry.OFFICIAL_CHECKPOINTS[NAME]}
    for name, url in registry.OFFICIAL_CHECKPOINTS.items():
        entry = fairchem[name]
        if entry["type"] == "url":
            assert entry["url"] == url, name
        else:
            assert url.endswith("/" + entry["filename"]) and entry["repo_id"] in url, name


@pytest.mark.reference
def test_fixture_generator_reproduces_the_fixture(tmp_path, ref):
    python = refvenv_python()
    subprocess.run([str(python), str(HERE / "reference" / "make_odac_fixture.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=900)
    assert (tmp_path / ODAC.name).read_bytes() == ODAC.read_bytes()
    live = json.loads((tmp_path / "odac_is2re_tiny.reference.json").read_text())
    for name, expected in ref["structures"].items():
        assert abs(live["structures"][name]["energy"] - expected["energy"]) < 1e-6, name

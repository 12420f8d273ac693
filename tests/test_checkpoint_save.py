"""Writing fairchem 2023-layout checkpoints (eqv2_calc.checkpoint.save / random_init).

* round trip: save → load_model reproduces a model bit-for-bit;
* re-saving a fairchem-made file reproduces its key list, order, shapes, dtypes and values;
* written files have the layout fairchem 1.10 requires to strict-load them (state_dict keys,
  shapes and dtypes of fairchem's own module, model_attributes its constructor accepts, every
  entry without which it fails to load), recorded in tests/data/fairchem_layout.json by
  tests/reference/make_fairchem_layout.py in the reference venv; checked here without fairchem;
* slow: the seeded random 31M checkpoint regenerates byte-identically and our calculator
  matches the fairchem 1.10 numbers stored in tests/data/reference_31M_seed0.json (made by
  tests/reference/make_reference.py inside the reference venv); same for the 153M weights
  (in memory) on one small structure;
* reference (not in `make test`): fairchem's OCPCalculator strict-loads files we write and
  agrees with us, run live in the venv named by $EQV2_REFVENV (default /tmp/eqv2-refvenv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eqv2_calc import EquiformerV2Calculator, load_model
from eqv2_calc.checkpoint.keymap import strip_prefixes
from eqv2_calc.checkpoint.random_init import (
    file_sha256,
    make_random_checkpoint,
    make_random_model,
    state_dict_sha256,
)
from eqv2_calc.checkpoint.save import checkpoint_dict, save_fairchem_checkpoint
from eqv2_calc.checkpoint.state_dict import fairchem_keys, fairchem_state_dict
from eqv2_calc.model import EquiformerV2Config
from eqv2_calc.potential import EquiformerV2Potential
from conftest import refvenv_python

HERE = Path(__file__).parent
DATA = HERE / "data"

# The official cutoff: with 600 Gaussians on [0, r], a small r makes the distance features so
# sharp that fairchem's float32 input positions alone move its forces by ~1e-5 eV/Å.
_SMALL = dict(max_radius=12.0, max_neighbors=20, grid_resolution=18)
TINY = {
    "l4m2": EquiformerV2Config(
        num_layers=1, sphere_channels=16, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
        attn_value_channels=4, ffn_hidden_channels=16, lmax=4, mmax=2, edge_channels=8, **_SMALL),
    "l6m3": EquiformerV2Config(
        num_layers=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
        attn_value_channels=4, ffn_hidden_channels=8, lmax=6, mmax=3, edge_channels=8, **_SMALL),
    "l3m3_oc22": EquiformerV2Config(
        num_layers=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
        attn_value_channels=4, ffn_hidden_channels=8, lmax=3, mmax=3, edge_channels=8,
        enforce_max_neighbors_strictly=False, use_energy_lin_ref=True, **_SMALL),
}
_GRID_BUFFERS = ("edge_to_grid", "edge_from_grid", "node_to_grid", "node_from_grid")


def _calc(model) -> EquiformerV2Calculator:
    return EquiformerV2Calculator(potential=EquiformerV2Potential(model))


def _predict(model, atoms):
    atoms = atoms.copy()
    atoms.calc = _calc(model)
    return atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)


# ------------------------------------------------------------------ (a) round trip, layout
@pytest.mark.parametrize("name", list(TINY))
def test_save_load_round_trip_is_bit_identical(name, tmp_path, structures):
    model = make_random_model(TINY[name], seed=11)
    with torch.no_grad():  # exercise fairchem 1.x elementrefs too
        model.element_refs.copy_(torch.randn(model.cfg.max_num_elements, generator=torch.Generator().manual_seed(1)))
    path = save_fairchem_checkpoint(model, tmp_path / "tiny.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["config"]["model"] == "equiformer_v2"
    assert ckpt["config"]["trainer"] == "equiformerv2_forces"
    assert all(k.startswith("module.module.") for k in ckpt["state_dict"])

    loaded, meta = load_model(path)
    assert meta.num_parameters == sum(p.numel() for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for key in _GRID_BUFFERS:  # S2 grids are read back from the file
        assert torch.equal(getattr(loaded, key), getattr(model, key)), key
    for sname in ("Cu111_CO", "Au111_1x1_H"):
        e0, f0 = _predict(model, structures[sname])
        e1, f1 = _predict(loaded, structures[sname])
        assert e0 == e1, sname
        assert np.array_equal(f0, f1), sname


def test_saving_is_deterministic_and_path_independent(tmp_path):
    model = make_random_model(TINY["l4m2"], seed=5)
    a = save_fairchem_checkpoint(model, tmp_path / "a.pt")
    b = save_fairchem_checkpoint(model, tmp_path / "sub" / "other_name.pt")
    assert file_sha256(a) == file_sha256(b)
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("fixture", ["eqv2_tiny_l4m2", "eqv2_tiny_l6m3", "eqv2_tiny_l3m3_oc22"])
def test_resaving_fairchem_file_reproduces_its_state_dict(fixture):
    """Key set and order, dtypes, shapes and values of a fairchem-made checkpoint."""
    original = torch.load(DATA / f"{fixture}.pt", map_location="cpu", weights_only=True)
    model, _ = load_model(DATA / f"{fixture}.pt")
    ours = checkpoint_dict(model)
    sd_ref, sd = original["state_dict"], ours["state_dict"]
    assert list(sd) == list(sd_ref)
    L, M = model.cfg.lmax, model.cfg.mmax
    used = {f"SO3_grid.{L}.{M}.", f"SO3_grid.{L}.{L}."}
    for key, ref in sd_ref.items():
        mine = sd[key]
        assert mine.dtype == ref.dtype and mine.shape == ref.shape, key
        local = strip_prefixes(key)
        grid = "SO3_grid." in local and local.rsplit(".", 1)[-1] in ("to_grid_mat", "from_grid_mat")
        if grid and not any(u in local for u in used):
            # unused grids: ours from e3nn in float64, fairchem's in float32
            torch.testing.assert_close(mine, ref, rtol=0, atol=2e-6, msg=key)
        else:
            assert torch.equal(mine, ref), key
    for target in ("target", "grad_target"):
        for stat in ("mean", "std"):
            assert float(ours["normalizers"][target][stat]) == pytest.approx(
                float(original["normalizers"][target][stat]), rel=1e-7)
    attrs, ref_attrs = ours["config"]["model_attributes"], original["config"]["model_attributes"]
    for key, value in ref_attrs.items():
        if key not in ("alpha_drop", "drop_path_rate", "proj_drop", "weight_init"):
            assert attrs[key] == value, key


def test_fairchem_key_count_31m():
    """4455 entries for the 31M OC20 architecture (reference notes §1.17), exactly fairchem's."""
    from eqv2_calc.checkpoint.random_init import SIZES

    keys = fairchem_keys(SIZES["31M"])
    assert len(keys) == 4455 and len(set(keys)) == 4455
    assert ["module.module." + k for k in keys] == [k for k, _, _ in LAYOUT["configs"]["31M"]["state_dict"]]


# ------------------------------------------------------------------ (a') the layout fairchem requires
LAYOUT = json.loads((DATA / "fairchem_layout.json").read_text())


def _layout(state_dict) -> list:
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state_dict.items()]


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_state_dict_layout(state_dict, expected: list) -> None:
    got = _layout(state_dict)
    missing = sorted({k for k, _, _ in expected} - {k for k, _, _ in got})
    unexpected = sorted({k for k, _, _ in got} - {k for k, _, _ in expected})
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]} (fairchem strict load)"
    wrong = [(g, e) for g, e in zip(sorted(got), sorted(expected)) if g != e]
    assert not wrong, f"shape/dtype differs from fairchem's module: {wrong[:5]}"
    assert [k for k, _, _ in got] == [k for k, _, _ in expected], "not in fairchem's state_dict order"


@pytest.mark.parametrize("name", list(TINY))
def test_written_checkpoint_has_the_layout_fairchem_requires(name, tmp_path, structures):
    """The file save_fairchem_checkpoint writes, against what fairchem-core 1.10 needs to
    strict-load it and what it then computes (recorded live in the reference venv by
    tests/reference/make_fairchem_layout.py; see the module docstring)."""
    entry = LAYOUT["configs"][name]
    assert EquiformerV2Config(**entry["eqv2_config"]) == TINY[name]  # the data is for these configs
    model = make_random_model(TINY[name], seed=entry["seed"])
    path = save_fairchem_checkpoint(model, tmp_path / "x.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    _check_state_dict_layout(ckpt["state_dict"], entry["state_dict"])
    attrs = ckpt["config"]["model_attributes"]
    unknown = set(attrs) - set(LAYOUT["constructor_parameters"])
    assert not unknown, f"fairchem's EquiformerV2 does not take {sorted(unknown)}"
    assert attrs == entry["model_attributes"]  # the attributes fairchem's module above was built from
    for req in LAYOUT["required"]:  # entries without which fairchem fails or computes otherwise
        node = ckpt
        for key in req["path"]:
            assert isinstance(node, dict) and key in node, f"{'.'.join(req['path'])} missing ({req['why']})"
            node = node[key]
        assert _kind(node) == req["type"], (req["path"], _kind(node))
        if "value" in req:  # a value fairchem accepted for this configuration
            assert node == entry["required_values"][".".join(req["path"])], (req["path"], node, req["why_value"])
    for target in ("target", "grad_target"):  # scalar normalizers
        assert {k: ckpt["normalizers"][target][k].shape for k in ("mean", "std")} == {
            "mean": torch.Size([]), "std": torch.Size([])}
    # the same file in fairchem's OCPCalculator gave these numbers
    assert state_dict_sha256(path) == entry["state_dict_sha256"], "the seeded weights changed; regenerate the data"
    calc = EquiformerV2Calculator(path, device="cpu")
    for sname, expected in entry["fairchem_results"].items():
        atoms = structures[sname].copy()
        atoms.calc = calc
        # fairchem draws a random roll of every edge frame per call: ~1e-6..1e-5 eV/Å of noise
        assert abs(atoms.get_potential_energy() - expected["energy"]) < 1e-5, sname
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), expected["forces"],
                                   rtol=0, atol=3e-5, err_msg=sname)


@pytest.mark.slow
def test_31m_state_dict_has_fairchem_layout():
    """The published 31M architecture: keys, shapes, dtypes and order of fairchem's module."""
    from eqv2_calc.checkpoint.random_init import SIZES

    entry = LAYOUT["configs"]["31M"]
    assert EquiformerV2Config(**entry["eqv2_config"]) == SIZES["31M"]
    model = make_random_model("31M", seed=3)
    _check_state_dict_layout(fairchem_state_dict(model), entry["state_dict"])
    assert checkpoint_dict(model)["config"]["model_attributes"] == entry["model_attributes"]


def test_ema_and_normalizer_overrides(tmp_path):
    model = make_random_model(TINY["l4m2"], seed=2)
    ema = {k: v + 0.01 for k, v in model.named_parameters()}
    path = save_fairchem_checkpoint(
        model, tmp_path / "ema.pt", ema_state_dict=ema,
        normalizers={"target": {"mean": 1.5, "std": 3.0}, "grad_target": {"mean": 0.0, "std": 2.0}},
        extra_config={"task": {"description": "unit test"}, "note": "x"},
    )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["config"]["task"]["description"] == "unit test" and ckpt["config"]["note"] == "x"
    assert ckpt["config"]["dataset"]["target_mean"] == 1.5
    plain, _ = load_model(path)
    assert (float(plain.energy_mean), float(plain.energy_std), float(plain.force_std)) == (1.5, 3.0, 2.0)
    averaged, meta = load_model(path, use_ema=True)
    assert meta.weights == "ema"
    for key, value in ema.items():
        assert torch.equal(dict(averaged.named_parameters())[key], value), key


# ------------------------------------------------------------------ (b) seeded 31M vs fairchem numbers
@pytest.mark.slow
def test_seeded_31m_checkpoint_matches_fairchem_reference(tmp_path, structures):
    ref = json.loads((DATA / "reference_31M_seed0.json").read_text())
    path = make_random_checkpoint(ref["size"], ref["seed"], tmp_path / "eqv2_31M_seed0.pt")
    sd_sha, file_sha = state_dict_sha256(path), file_sha256(path)
    why = (
        f"regenerated checkpoint: state_dict sha256 {sd_sha} (reference {ref['state_dict_sha256']}), "
        f"file sha256 {file_sha} (reference {ref['checkpoint_sha256']}); torch {torch.__version__} "
        f"(reference made with torch {ref['torch_version']}, fairchem {ref['fairchem_version']})"
    )
    assert sd_sha == ref["state_dict_sha256"], (
        "the seeded generator no longer reproduces the weights the fairchem reference was computed "
        "with (torch RNG or eqv2_calc.checkpoint.random_init changed); regenerate "
        "tests/data/reference_31M_seed0.json with tests/reference/make_reference.py. " + why
    )
    if torch.__version__ == ref["torch_version"]:
        assert file_sha == ref["checkpoint_sha256"], "same tensors but different file bytes. " + why

    calc = EquiformerV2Calculator(path, device="cpu", dtype="float32")
    for sname in ("Cu111_CO", "Fe110_N", "Au111_1x1_H"):
        atoms = structures[sname].copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces(apply_constraint=False)
        expected = ref["structures"][sname]
        assert abs(energy - expected["energy"]) < 1e-4, f"{sname}: {energy} vs {expected['energy']}; {why}"
        np.testing.assert_allclose(forces, expected["forces"], rtol=0, atol=1e-4, err_msg=f"{sname}; {why}")


@pytest.mark.slow
def test_seeded_153m_model_matches_fairchem_reference(structures):
    """L=6, M=3, 20 layers: weights from the seed (in memory; the file is ~600 MB) vs fairchem."""
    ref = json.loads((DATA / "reference_153M_seed0.json").read_text())
    model = make_random_model(ref["size"], ref["seed"])
    sd_sha = state_dict_sha256(fairchem_state_dict(model))
    assert sd_sha == ref["state_dict_sha256"], (
        f"the seeded generator no longer reproduces the 153M reference weights (state_dict sha256 {sd_sha}, "
        f"reference {ref['state_dict_sha256']}; torch {torch.__version__} vs {ref['torch_version']})"
    )
    sname = "Au111_1x1_H"
    energy, forces = _predict(model, structures[sname])
    expected = ref["structures"][sname]
    assert abs(energy - expected["energy"]) < 1e-4
    np.testing.assert_allclose(forces, expected["forces"], rtol=0, atol=1e-4)


# ------------------------------------------------------------------ (c) live fairchem


@pytest.mark.reference
@pytest.mark.parametrize("name", list(TINY))
def test_fairchem_strict_loads_and_agrees(name, tmp_path, structures):
    python = refvenv_python()
    model = make_random_model(TINY[name], seed=3)
    path = save_fairchem_checkpoint(model, tmp_path / f"tiny_{name}.pt")
    out = tmp_path / "fairchem.json"
    names = ["Cu111_CO", "NaCl_bulk", "Au111_1x1_H"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(python), str(HERE / "reference" / "make_reference.py"), "--checkpoint", str(path),
         "--out", str(out), "--structures", ",".join(names)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"fairchem failed ({time.perf_counter() - t0:.0f} s):\n{proc.stderr[-4000:]}"
    ref = json.loads(out.read_text())
    assert ref["strict_load"] and ref["state_dict_keys_match"]
    buffers = ref["derived_buffers_vs_fairchem"]
    assert buffers["keys_equal_in_order"]
    assert max(buffers["max_abs_diff"].values()) < 2e-6, buffers["max_abs_diff"]
    calc = _calc(model)
    for sname in names:
        atoms = structures[sname].copy()
        atoms.calc = calc
        expected = ref["structures"][sname]
        # fairchem draws a random roll of every edge frame per call: ~1e-6..1e-5 eV/Å of noise
        assert abs(atoms.get_potential_energy() - expected["energy"]) < 1e-5, sname
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), expected["forces"],
                                   rtol=0, atol=3e-5, err_msg=sname)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-m", "reference or not reference"]))

"""Checkpoint formats, key mapping, EMA opt-in, registry and error messages."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch

from conftest import DATA, reference
from eqv2_calc import EquiformerV2Calculator, load_model
from eqv2_calc.checkpoint.keymap import strip_prefixes
from eqv2_calc.checkpoint.registry import OFFICIAL_CHECKPOINTS
from eqv2_calc.errors import CheckpointError

TINY = DATA / "eqv2_tiny_l4m2.pt"


def _raw():
    return torch.load(TINY, map_location="cpu", weights_only=True)


def _predict(path, atoms, **kw):
    return EquiformerV2Calculator(path, **kw).predict_batch([atoms])[0]


def _to_hydra(ckpt):
    """Rewrite an old-style checkpoint the way fairchem's eqv2_to_eqv2_hydra converter does."""
    sd = {}
    for k, v in ckpt["state_dict"].items():
        k = k.replace("module.", "")
        if "force_block" in k:
            k = k.replace("force_block", "output_heads.forces.force_block")
        elif "energy_block" in k:
            k = k.replace("energy_block", "output_heads.energy.energy_block")
        else:
            k = "backbone." + k
        sd["module." + k] = v
    attrs = dict(ckpt["config"]["model_attributes"])
    config = {
        "model": {
            "name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
            "backbone": {"model": "equiformer_v2_backbone", **attrs},
            "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                      "forces": {"module": "equiformer_v2_force_head"}},
        }
    }
    norms = {"energy": {"mean": ckpt["normalizers"]["target"]["mean"], "rmsd": ckpt["normalizers"]["target"]["std"]},
             "forces": {"mean": ckpt["normalizers"]["grad_target"]["mean"],
                        "rmsd": ckpt["normalizers"]["grad_target"]["std"]}}
    return {"state_dict": sd, "config": config, "normalizers": norms}


def test_hydra_and_fairchem1x_layouts_give_reference_results(tmp_path, structures):
    atoms, ref = structures["Cu111_CO"], reference("eqv2_tiny_l4m2")["Cu111_CO"]
    hydra = tmp_path / "hydra.pt"
    torch.save(_to_hydra(_raw()), hydra)
    new_style = _raw()
    new_style["config"]["model"] = {"name": "equiformer_v2", **new_style["config"].pop("model_attributes")}
    new_style["state_dict"] = {k.replace("module.module.", ""): v for k, v in new_style["state_dict"].items()}
    new_path = tmp_path / "new.pt"
    torch.save(new_style, new_path)
    for path in (hydra, new_path):
        res = _predict(path, atoms)
        assert abs(res["energy"] - ref["energy"]) < 1e-4
        np.testing.assert_allclose(res["forces"], ref["forces"], atol=1e-4, rtol=0)


def test_key_mapping_examples():
    assert strip_prefixes("module.module.blocks.3.ffn.grid_mlp.2.weight") == "blocks.3.ffn.grid_mlp.2.weight"
    assert strip_prefixes("module.output_heads.energy.energy_block.so3_linear_2.bias") == "energy_block.so3_linear_2.bias"
    assert strip_prefixes("module.backbone.sphere_embedding.weight") == "sphere_embedding.weight"


def test_ema_is_opt_in(tmp_path, structures):
    ckpt = _raw()
    model, _ = load_model(TINY)
    params = {n for n, _ in model.named_parameters()}
    # fairchem's shadow_params follow its parameter order = the state_dict order of parameters
    names = [k for k in ckpt["state_dict"] if strip_prefixes(k) in params]
    gen = torch.Generator().manual_seed(0)
    shadow = [ckpt["state_dict"][k] + 0.05 * torch.randn(ckpt["state_dict"][k].shape, generator=gen) for k in names]
    ckpt["ema"] = {"decay": 0.999, "num_updates": 10, "shadow_params": shadow}
    with_ema = tmp_path / "ema.pt"
    torch.save(ckpt, with_ema)
    # the same weights written straight into state_dict
    ckpt2 = _raw()
    for k, v in zip(names, shadow):
        ckpt2["state_dict"][k] = v
    direct = tmp_path / "direct.pt"
    torch.save(ckpt2, direct)
    atoms = structures["Pt100_OH"]
    plain, ema, ref = _predict(with_ema, atoms), _predict(with_ema, atoms, use_ema=True), _predict(direct, atoms)
    assert plain["energy"] == _predict(TINY, atoms)["energy"]
    assert ema["energy"] != plain["energy"]
    assert ema["energy"] == ref["energy"] and np.array_equal(ema["forces"], ref["forces"])
    assert EquiformerV2Calculator(with_ema, use_ema=True).metadata["weights"] == "ema"


def test_metadata():
    calc = EquiformerV2Calculator(TINY)
    meta = calc.metadata
    assert meta["cutoff"] == 12.0 and meta["max_neighbors"] == 20 and meta["strict_max_neighbors"]
    assert meta["energy_convention"].startswith("referenced energy")
    assert len(meta["sha256"]) == 64
    oc22 = EquiformerV2Calculator(DATA / "eqv2_tiny_l3m3_oc22.pt").metadata
    assert oc22["energy_convention"].startswith("total energy") and not oc22["strict_max_neighbors"]
    assert "stress" not in EquiformerV2Calculator.implemented_properties


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_model("no/such/file.pt")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(TINY.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)


def test_other_architecture(tmp_path):
    ckpt = _raw()
    ckpt["config"]["model"] = "gemnet_oc"
    path = tmp_path / "gemnet.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="'gemnet_oc' model, not EquiformerV2"):
        load_model(path)


def test_unsupported_variant_and_mismatched_weights(tmp_path):
    ckpt = _raw()
    ckpt["config"]["model_attributes"]["norm_type"] = "rms_norm_sh"
    path = tmp_path / "rms.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="norm_type='rms_norm_sh' is not supported"):
        load_model(path)
    ckpt = _raw()
    ckpt["config"]["model_attributes"]["num_layers"] = 3
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="missing.*blocks.2"):
        load_model(path)


def test_unknown_name_lists_official_names():
    with pytest.raises(CheckpointError, match="EquiformerV2-31M-S2EF-OC20-All\\+MD"):
        load_model("EquiformerV2-7M")


def test_offline_download_names_url_and_destination(tmp_path, monkeypatch):
    monkeypatch.setenv("EQV2_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    name = "EquiformerV2-31M-S2EF-OC20-All+MD"
    with pytest.raises(CheckpointError) as err:
        load_model(name)
    assert OFFICIAL_CHECKPOINTS[name] in str(err.value)
    assert str(tmp_path / "eq2_31M_ec4_allmd.pt") in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_cached_official_file_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("EQV2_CACHE", str(tmp_path))
    (tmp_path / "eq2_31M_ec4_allmd.pt").write_bytes(TINY.read_bytes())
    model, meta = load_model("EquiformerV2-31M-S2EF-OC20-All+MD")
    assert meta.path == str(tmp_path / "eq2_31M_ec4_allmd.pt")

"""Deepening a trained model (eqv2_calc.train.grow): the grown model predicts exactly what the
trained one did, its new blocks can learn, and bad requests are refused."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111

from eqv2_calc import EquiformerV2Calculator, load_model
from eqv2_calc.checkpoint.random_init import make_random_model
from eqv2_calc.checkpoint.save import save_fairchem_checkpoint
from eqv2_calc.errors import InputError
from eqv2_calc.graph import atoms_to_batch
from eqv2_calc.model import EquiformerV2Config
from eqv2_calc.potential import EquiformerV2Potential
from eqv2_calc.train.grow import ZEROED, grow_layers

CFG = EquiformerV2Config(
    num_layers=1, sphere_channels=16, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
    attn_value_channels=4, ffn_hidden_channels=16, lmax=3, mmax=2, edge_channels=8,
    max_radius=5.0, max_neighbors=20, grid_resolution=14)
NORMS = dict(energy_mean=-0.7, energy_std=2.5, force_mean=0.0, force_std=0.4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("grow") / "small.pt"
    return save_fairchem_checkpoint(make_random_model(CFG, seed=3, normalizers=NORMS), path, normalizers=NORMS)


def slab():
    atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", 1.6, "fcc")
    atoms.rattle(0.05, seed=1)
    return atoms


def predict(path):
    atoms = slab()
    atoms.calc = EquiformerV2Calculator(path, device="cpu", dtype="float64")
    return atoms.get_potential_energy(), atoms.get_forces()


def test_grown_model_predicts_what_the_trained_one_did(trained, tmp_path):
    grown = grow_layers(trained, 3, tmp_path / "grown.pt", seed=5)
    model, _ = load_model(grown)
    assert model.cfg.num_layers == 3
    e0, f0 = predict(trained)
    e1, f1 = predict(grown)
    assert abs(e0) > 1e-3 and np.abs(f0).max() > 1e-3  # a model that predicts something
    assert e1 == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(f1, f0, atol=1e-9)
    for key in ("energy_mean", "energy_std", "force_std"):
        assert float(getattr(model, key)) == pytest.approx(NORMS[key])


def test_new_blocks_are_zero_only_in_their_output_projections_and_get_gradients(trained, tmp_path):
    model, _ = load_model(grow_layers(trained, 2, tmp_path / "grown.pt"))
    new = {k.split(".", 2)[2]: v for k, v in model.state_dict().items() if k.startswith("blocks.1.")}
    zeroed = {k for k in new if k.startswith(ZEROED)}
    assert zeroed and all(not new[k].any() for k in zeroed)
    assert all(new[k].any() for k in new if k not in zeroed and new[k].dtype.is_floating_point
               and new[k].numel() > 1 and "norm" not in k)
    # the energy depends on the zeroed projections at first order: they learn from the first step
    model.requires_grad_(True)
    potential = EquiformerV2Potential(model)
    batch = atoms_to_batch([slab()])
    graph = potential.graph(batch)
    energy = model(batch.numbers, graph.src, graph.dst, graph.vec, batch.system_idx, batch.num_systems)[0]
    energy.sum().backward()
    grads = {k.split(".", 2)[2]: p.grad for k, p in model.named_parameters() if k.startswith("blocks.1.")}
    assert all(grads[k] is not None and grads[k].abs().max() > 0 for k in zeroed)


def test_refuses_to_shrink_or_keep_depth(trained, tmp_path):
    for n in (0, 1):
        with pytest.raises(InputError, match="num_layers > 1"):
            grow_layers(trained, n, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

"""Physical invariances of the model, in float64 so that only the model's own errors remain.

Rotations: the edge frames are exactly covariant (a rotation about y shifts every edge's
azimuth α), but the feed-forward S2 activation samples an 18×18 grid *in the global frame*,
which is only invariant under rotations that map the grid onto itself (about y by multiples
of 2π/18). So:
* a 40° rotation about y must agree to float64 round-off (1e-9);
* a generic rotation is limited by the grid's aliasing error — the part of SiLU(signal) above
  the band limit that the 18-point quadrature folds back. That error is what fairchem's own
  model has too (issue #1068). We measure it on the bare S2 activation below and bound the
  model's relative force error by ~10× its value (several layers, two grids per layer).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import calculator, rotated, rotation
from eqv2_calc.so3.grid import node_grid
from eqv2_calc.so3.wigner import wigner_blocks






def _predict(name, atoms):
    return calculator(name, "float64").predict_batch([atoms])[0]


def s2_activation_rotation_error(lmax: int, res: int = 18) -> float:
    """Relative equivariance error of from_grid(SiLU(to_grid(x))) under a generic rotation."""
    to, frm = node_grid(lmax, res)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(to.shape[1], 64, generator=gen, dtype=torch.float64)
    vec = torch.tensor([[0.3, 0.5, -0.8]], dtype=torch.float64)
    d = torch.block_diag(*[b[0] for b in wigner_blocks(vec, lmax)])
    act = lambda y: frm @ torch.nn.functional.silu(to @ y)  # noqa: E731
    return float((act(d @ x) - d @ act(x)).abs().max() / act(x).abs().max())


@pytest.mark.parametrize("name", ["eqv2_tiny_l4m2", "eqv2_tiny_l6m3"])
def test_rotation_about_grid_axis_is_exact(name, structures):
    atoms = structures["Cu111_CO"]
    rot = rotation([0, 1, 0], 2 * 2 * math.pi / 18)
    a, b = _predict(name, atoms), _predict(name, rotated(atoms, rot))
    assert abs(a["energy"] - b["energy"]) < 1e-9
    np.testing.assert_allclose(b["forces"], a["forces"] @ rot.T, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name,lmax", [("eqv2_tiny_l4m2", 4), ("eqv2_tiny_l6m3", 6)])
def test_generic_rotation_within_grid_error(name, lmax, structures):
    grid_err = s2_activation_rotation_error(lmax)
    for sname in ["Cu111_CO", "Pt100_OH", "NaCl_bulk"]:
        atoms = structures[sname]
        rot = rotation([0.2, -0.7, 0.4], 1.234)
        a, b = _predict(name, atoms), _predict(name, rotated(atoms, rot))
        scale = np.abs(a["forces"]).max()
        force_err = np.abs(b["forces"] - a["forces"] @ rot.T).max() / scale
        assert force_err < 10 * grid_err, (sname, force_err, grid_err)
        assert abs(a["energy"] - b["energy"]) < 10 * grid_err * max(abs(a["energy"]), 1.0)


def test_grid_error_is_what_breaks_rotation():
    """The grid error grows with L at fixed resolution, and vanishes with a much finer grid."""
    assert s2_activation_rotation_error(4) < s2_activation_rotation_error(6)
    assert s2_activation_rotation_error(4, res=60) < 1e-3 * s2_activation_rotation_error(4)


@pytest.mark.parametrize("name", ["eqv2_tiny_l4m2", "eqv2_tiny_l3m3_oc22"])
def test_translation_and_cell_wrapping(name, structures):
    atoms = structures["Pt100_OH"]
    shifted = atoms.copy()
    shifted.positions += [0.37, -1.1, 2.3]
    wrapped = atoms.copy()
    wrapped.positions += atoms.cell.array[0] * 2 - atoms.cell.array[1]  # whole lattice vectors
    a = _predict(name, atoms)
    for other in (shifted, wrapped):
        b = _predict(name, other)
        assert abs(a["energy"] - b["energy"]) < 1e-9
        np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["eqv2_tiny_l4m2", "eqv2_tiny_l3m3_oc22"])
def test_permutation(name, structures):
    atoms = structures["PdNiGa111_CH3OH"]
    perm = np.random.default_rng(3).permutation(len(atoms))
    a, b = _predict(name, atoms), _predict(name, atoms[perm])
    assert abs(a["energy"] - b["energy"]) < 1e-9
    np.testing.assert_allclose(b["forces"], a["forces"][perm], atol=1e-9, rtol=0)


def test_deterministic_bit_identical(structures):
    calc = calculator("eqv2_tiny_l4m2")
    atoms = structures["Cu111_CO"]
    first = calc.predict_batch([atoms])[0]
    for _ in range(3):
        again = calc.predict_batch([atoms])[0]
        assert again["energy"] == first["energy"]
        assert np.array_equal(again["forces"], first["forces"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_alone_equals_in_batch(dtype, structures):
    calc = calculator("eqv2_tiny_l6m3", dtype)
    items = list(structures.values())
    together = calc.predict_batch(items + items[::-1])
    for i, atoms in enumerate(items):
        alone = calc.predict_batch([atoms])[0]
        for res in (together[i], together[2 * len(items) - 1 - i]):
            assert abs(res["energy"] - alone["energy"]) < 1e-5
            np.testing.assert_allclose(res["forces"], alone["forces"], atol=1e-5, rtol=0)


def test_float64_end_to_end(structures):
    calc = calculator("eqv2_tiny_l4m2", "float64")
    assert calc.potential.model.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in calc.potential.model.parameters())
    atoms = structures["Fe110_N"]
    r64, r32 = calc.predict_batch([atoms])[0], calculator("eqv2_tiny_l4m2").predict_batch([atoms])[0]
    assert r64["forces"].dtype == np.float64
    # float32 vs float64 differ by float32 round-off only
    assert abs(r64["energy"] - r32["energy"]) < 1e-5
    np.testing.assert_allclose(r64["forces"], r32["forces"], atol=1e-5, rtol=0)
    assert calc.metadata["dtype"] == "float64"

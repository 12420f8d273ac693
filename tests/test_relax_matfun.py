"""The batched small-matrix functions of the cell relaxation (eqv2_calc.relax.matfun) against
scipy.linalg (expm, logm, expm_frechet) and numpy.linalg (det, inv)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from eqv2_calc.relax import relax_batch
from eqv2_calc.relax.matfun import det3, expm, expm_frechet_adjoint, inv3, logm3

EXACT = 1e-14  # relative, ~50 ulp: the acceptance criterion against scipy for ‖a‖ <= 1


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest entry error relative to the largest entry, over a batch of matrices."""
    return float((np.abs(ours - ref).max(axis=(-2, -1)) / np.abs(ref).max(axis=(-2, -1))).max())


@pytest.mark.parametrize("n", [3, 6])
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.05, 0.2])
def test_expm_matches_scipy(n, scale):
    # entries ~ scale: 1-norms up to ~1 (0.2 × n); the cell coordinates X / c are ~0.01-0.1
    a = np.random.default_rng(int(scale * 1e4) + n).normal(scale=scale, size=(40, n, n))
    ref = np.stack([scipy.linalg.expm(m) for m in a])
    assert _rel(expm(torch.as_tensor(a)).numpy(), ref) < EXACT


def test_expm_of_large_norms_with_squaring():
    a = np.random.default_rng(3).normal(scale=2.0, size=(20, 3, 3))  # ‖a‖₁ up to ~10: 6 squarings
    ref = np.stack([scipy.linalg.expm(m) for m in a])
    # exp of a large-norm matrix is ill-conditioned: torch.linalg.matrix_exp differs from scipy as much
    assert _rel(expm(torch.as_tensor(a)).numpy(), ref) < 1e-12
    assert _rel(torch.linalg.matrix_exp(torch.as_tensor(a)).numpy(), ref) > 1e-14


def test_expm_is_per_matrix_and_keeps_batch_dimensions():
    rng = np.random.default_rng(4)
    small, large = rng.normal(scale=0.05, size=(3, 3)), rng.normal(scale=3.0, size=(3, 3))
    alone = expm(torch.as_tensor(small)[None])[0]
    mixed = expm(torch.as_tensor(np.stack([large, small, large])))[1]
    assert torch.equal(alone, mixed)  # a batch mate's scaling does not touch it, bitwise
    a = rng.normal(scale=0.1, size=(2, 4, 3, 3))
    np.testing.assert_allclose(expm(torch.as_tensor(a)).numpy(), scipy.linalg.expm(a), rtol=0, atol=EXACT)
    np.testing.assert_array_equal(expm(torch.zeros(2, 3, 3, dtype=torch.float64)).numpy(), np.tile(np.eye(3), (2, 1, 1)))
    with pytest.raises(ValueError, match="square"):
        expm(torch.zeros(2, 3, 4, dtype=torch.float64))


def _deformations(rng, n, strain, rotation):
    """Deformation gradients: I + random strain (entries ~strain) times a random rotation of
    angle up to ``rotation`` (rad); only those whose eigenvalues keep clear of the negative real
    axis (|arg| < 2.8), where the real principal logarithm exists."""
    out = []
    while len(out) < n:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = scipy.linalg.expm(rng.uniform(-rotation, rotation) * k)
        f = (np.eye(3) + rng.normal(scale=strain, size=(3, 3))) @ rot
        if np.abs(np.angle(np.linalg.eigvals(f))).max() < 2.8:
            out.append(f)
    return np.stack(out)


@pytest.mark.parametrize("strain,rotation", [(1e-4, 0.0), (0.02, 0.0), (0.05, 0.1), (0.1, 0.0), (0.15, 1.0), (0.3, 2.5)])
def test_logm3_matches_scipy_and_inverts_expm(strain, rotation):
    f = _deformations(np.random.default_rng(int(strain * 1e4)), 30, strain, rotation)
    ours = logm3(torch.as_tensor(f)).numpy()
    ref = np.stack([scipy.linalg.logm(m) for m in f])
    assert np.abs(ref.imag).max() < 1e-12
    # absolute: near I scipy's own logm is accurate to ~1e-16 absolute, not relative. Rotations
    # of ~2.5 rad take 4+ square roots, each error doubled back: 2e-14 there (scipy: 2e-15)
    tol = EXACT if rotation <= 1.0 else 1e-13
    np.testing.assert_allclose(ours, ref.real, rtol=0, atol=tol)
    np.testing.assert_allclose(scipy.linalg.expm(ours), f, rtol=0, atol=tol)


def test_logm3_of_far_from_identity_needs_square_roots():
    f = np.stack([3.0 * np.eye(3), np.diag([0.2, 1.0, 5.0]), _deformations(np.random.default_rng(7), 1, 0.4, 3.0)[0]])
    ours = logm3(torch.as_tensor(f)).numpy()
    np.testing.assert_allclose(ours, np.stack([scipy.linalg.logm(m).real for m in f]), rtol=0, atol=1e-13)
    np.testing.assert_allclose(ours[0], np.log(3.0) * np.eye(3), rtol=0, atol=EXACT)


def test_logm3_without_a_real_principal_logarithm_is_nan_alone():
    good = np.eye(3) + 0.01
    bad = [np.diag([-1.0, 2.0, 3.0]), np.full((3, 3), np.inf), np.zeros((3, 3))]
    out = logm3(torch.as_tensor(np.stack([good, *bad]))).numpy()
    assert np.isnan(out[1:]).all()
    np.testing.assert_allclose(out[0], scipy.linalg.logm(good).real, rtol=0, atol=EXACT)
    with pytest.raises(ValueError, match="3x3"):
        logm3(torch.zeros(1, 2, 2, dtype=torch.float64))


def test_det3_and_inv3_match_numpy():
    a = _deformations(np.random.default_rng(8), 50, 0.3, 3.0) * np.random.default_rng(9).uniform(0.5, 8.0, (50, 1, 1))
    t = torch.as_tensor(a)
    np.testing.assert_allclose(det3(t).numpy(), np.linalg.det(a), rtol=1e-14, atol=0)
    np.testing.assert_allclose(inv3(t).numpy(), np.linalg.inv(a), rtol=0, atol=1e-14)
    np.testing.assert_allclose((inv3(t) @ t).numpy(), np.tile(np.eye(3), (50, 1, 1)), rtol=0, atol=1e-14)


@pytest.mark.parametrize("g_scale", [1e-30, 1.0, 1e10])
def test_expm_frechet_adjoint_matches_scipy_at_any_gradient_scale(g_scale):
    rng = np.random.default_rng(10)
    a, g = rng.normal(scale=0.1, size=(5, 3, 3)), rng.normal(scale=g_scale, size=(5, 3, 3))
    g[0] = 0.0
    ours = expm_frechet_adjoint(torch.as_tensor(a), torch.as_tensor(g)).numpy()
    assert (ours[0] == 0).all()
    for s in range(1, 5):
        ref = np.array([[np.sum(scipy.linalg.expm_frechet(a[s], np.outer(np.eye(3)[i], np.eye(3)[j]),
                                                          compute_expm=False) * g[s])
                         for j in range(3)] for i in range(3)])
        np.testing.assert_allclose(ours[s], ref, rtol=0, atol=EXACT * np.abs(ref).max())


def test_cell_relaxation_never_calls_the_batched_torch_linalg_kernels(monkeypatch):
    """The cell maths stays off torch.linalg's batched LAPACK kernels (matrix_exp, inv, det,
    solve): on a CPU shared with another process each call waits ~5 ms for an OpenMP thread
    (benchmarks/cell_relax.py --contend)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a batched torch.linalg kernel was called")

    for name in ("matrix_exp", "inv", "det", "solve", "inv_ex", "solve_ex"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    crystals = [bulk("Cu", "fcc", a=3.7), bulk("Al", "fcc", a=4.2, cubic=True), bulk("Ni", "hcp", a=2.6, c=4.1)]
    for mask in (None, [1, 1, 1, 1, 0, 1]):  # the second one needs matrix logarithms
        results = relax_batch(crystals, EMT(), fmax=0.01, cell_filter="frechet", cell_mask=mask, progress=False)
        assert all(r.converged for r in results)

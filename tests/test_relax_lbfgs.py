"""Unit tests of the functional L-BFGS core (eqv2_calc.relax.lbfgs) on analytic energies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqv2_calc.errors import InputError
from eqv2_calc.relax.lbfgs import (
    HistoryBuffer,
    LBFGSParams,
    LBFGSState,
    lbfgs_init,
    lbfgs_set_results,
    lbfgs_step,
    system_fmax,
)


def _state(positions, natoms, free=None, history=None, h=5):
    pos = torch.as_tensor(positions, dtype=torch.float64)
    n, s = pos.shape[0], len(natoms)
    return lbfgs_init(
        pos, torch.ones(n, dtype=torch.long), torch.as_tensor(natoms), torch.eye(3).repeat(s, 1, 1) * 10,
        torch.zeros(s, 3, dtype=torch.bool),
        torch.ones(n, 3, dtype=torch.bool) if free is None else torch.as_tensor(free),
        history_size=None if history is not None else h, history=history,
    )


def _quadratic(state, k):
    """E = sum_i k_i/2 |x_i|^2 with per-atom stiffness k [N] (eV/Å^2): F = -k x."""
    x = state.positions
    e = torch.zeros(state.num_systems, dtype=torch.float64).index_add_(
        0, state.system_idx, 0.5 * k * (x**2).sum(1))
    return lbfgs_set_results(state, e, -k[:, None] * x)


def _numpy_ase_lbfgs(x0, k, steps, maxstep=0.2, alpha=70.0, memory=100):
    """Textbook ASE LBFGS (single system, flattened) on the quadratic, written from the ASE docs."""
    x = x0.copy().ravel()
    kk = np.repeat(k, 3)
    s_list, y_list, rho_list = [], [], []
    r0 = f0 = None
    path = [x.copy()]
    for it in range(steps):
        f = -kk * x
        if it > 0:
            s_list.append(x - r0)
            y_list.append(-(f - f0))
            rho_list.append(1.0 / np.dot(y_list[-1], s_list[-1]))
            if len(s_list) > memory:
                s_list.pop(0), y_list.pop(0), rho_list.pop(0)
        q = -f
        a = np.zeros(len(s_list))
        for i in range(len(s_list) - 1, -1, -1):
            a[i] = rho_list[i] * np.dot(s_list[i], q)
            q -= a[i] * y_list[i]
        z = q / alpha
        for i in range(len(s_list)):
            b = rho_list[i] * np.dot(y_list[i], z)
            z += s_list[i] * (a[i] - b)
        p = -z
        longest = np.linalg.norm(p.reshape(-1, 3), axis=1).max()
        if longest >= maxstep:
            p *= maxstep / longest
        r0, f0 = x.copy(), f.copy()
        x = x + p
        path.append(x.copy())
    return path


def test_matches_textbook_lbfgs_with_small_memory():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(4, 3))
    k = np.array([1.0, 5.0, 20.0, 60.0])
    ref = _numpy_ase_lbfgs(x0, k, 12, memory=3)
    st = _state(x0, [4], h=3)
    kt = torch.as_tensor(k)
    for it in range(12):
        _quadratic(st, kt)
        lbfgs_step(st, LBFGSParams(memory=3, curvature_guard="none"))
        np.testing.assert_allclose(st.positions.numpy().ravel(), ref[it + 1], atol=1e-12, rtol=0)


def test_step_is_in_place_and_systems_are_independent():
    rng = np.random.default_rng(1)
    xa, xb = rng.normal(size=(3, 3)), rng.normal(size=(5, 3))
    ka, kb = torch.tensor([2.0, 9.0, 30.0]), torch.tensor([1.0, 1.0, 4.0, 40.0, 70.0])
    buf = HistoryBuffer(10, 8)
    joint = LBFGSState.concat([_state(xa, [3], history=buf), _state(xb, [5], history=buf)])
    alone = _state(xb, [5], h=10)
    params = LBFGSParams(memory=10)
    for _ in range(8):
        _quadratic(joint, torch.cat([ka, kb]))
        _quadratic(alone, kb)
        out = lbfgs_step(joint, params)
        assert out is joint  # documented: in place
        lbfgs_step(alone, params)
        # system b's numbers do not depend on system a sharing the batch
        assert torch.equal(joint.positions[3:], alone.positions)
    assert buf.rows_in_use == 8
    sub = joint.select([1])
    assert torch.equal(sub.positions, alone.positions) and sub.history is buf


def _wavy(state, k):
    """Non-convex test energy: E = sum k/2 |x|^2 + 2 sum cos(3 x) -> occasional y.s <= 0."""
    x = state.positions
    e = torch.zeros(state.num_systems, dtype=torch.float64).index_add_(
        0, state.system_idx, (0.5 * k[:, None] * x**2 + 2.0 * torch.cos(3 * x)).sum(1))
    return lbfgs_set_results(state, e, -(k[:, None] * x - 6.0 * torch.sin(3 * x)))


@pytest.mark.parametrize("guard", ["skip", "reset", "none"])
def test_guard_on_a_nonconvex_energy_keeps_only_positive_curvature_pairs(guard):
    rng = np.random.default_rng(3)
    st = _state(rng.normal(size=(9, 3)) * 2, [2, 3, 4], h=6)
    k = torch.as_tensor(rng.uniform(0.5, 3.0, size=9))
    params = LBFGSParams(memory=6, curvature_guard=guard, maxstep=0.5)
    skipped = False
    for it in range(20):
        _wavy(st, k)
        lbfgs_step(st, params)
        skipped |= bool((st.count < min(6, it)).any())
        valid = torch.arange(6)[None, :] < st.count[:, None]
        stored_rho = st.rho[valid]  # ring slots are filled in order until it wraps
        if guard != "none" and it < 6:
            assert (stored_rho > 0).all()
    assert skipped == (guard != "none")  # the guard was exercised
    assert torch.isfinite(st.positions).all()


def test_fixed_components_never_move():
    x0 = np.random.default_rng(2).normal(size=(3, 3))
    free = np.ones((3, 3), dtype=bool)
    free[0] = False  # whole atom fixed
    free[2, 2] = False  # one Cartesian component fixed
    st = _state(x0, [3], free=free)
    for _ in range(5):
        _quadratic(st, torch.tensor([5.0, 5.0, 5.0]))
        lbfgs_step(st, LBFGSParams())
    assert torch.equal(st.positions[0], torch.as_tensor(x0[0]))
    assert st.positions[2, 2].item() == x0[2, 2]
    assert st.positions[1].ne(torch.as_tensor(x0[1])).all()


def test_maxstep_and_damping_limit_the_largest_displacement():
    st = _state([[5.0, 0, 0], [0, 0.01, 0]], [2])
    _quadratic(st, torch.tensor([70.0, 70.0]))
    x0 = st.positions.clone()
    lbfgs_step(st, LBFGSParams(maxstep=0.1, damping=0.5))
    d = torch.linalg.vector_norm(st.positions - x0, dim=1)
    assert d.max().item() == pytest.approx(0.05, abs=1e-15)
    # direction kept: both atoms scaled by the same factor (0.1/5 * 0.5)
    assert d[1].item() == pytest.approx(0.01 * 0.1 / 5.0 * 0.5, rel=1e-12)


def _concave(state):
    """E = -|x|^2/2: negative curvature, so y.s < 0 after any step."""
    x = state.positions
    e = torch.zeros(state.num_systems, dtype=torch.float64).index_add_(0, state.system_idx, -0.5 * (x**2).sum(1))
    return lbfgs_set_results(state, e, x.clone())


@pytest.mark.parametrize("guard, stored", [("none", 1), ("skip", 0), ("reset", 0)])
def test_curvature_guard(guard, stored):
    st = _state([[0.3, 0.1, 0.0]], [1])
    for _ in range(2):
        _concave(st)
        lbfgs_step(st, LBFGSParams(curvature_guard=guard))
    assert int(st.count[0]) == stored
    if guard == "none":
        assert st.rho[0, 0].item() < 0  # ASE keeps the negative-curvature pair
    else:
        # without a stored pair the step is the H0 = 1/alpha step again: along +x (uphill is -F)
        assert torch.isfinite(st.positions).all()


def test_fmax_per_system_ignores_fixed_atoms():
    st = _state([[0.0, 0, 0], [0, 0, 0], [0, 0, 0]], [2, 1], free=[[False] * 3, [True] * 3, [True] * 3])
    lbfgs_set_results(st, torch.zeros(2, dtype=torch.float64),
                      torch.tensor([[100.0, 0, 0], [0, 3.0, 4.0], [0, 0, 1.0]], dtype=torch.float64))
    assert system_fmax(st).tolist() == [5.0, 1.0]


def test_params_and_shapes_are_validated():
    with pytest.raises(InputError, match="maxstep"):
        LBFGSParams(maxstep=2.0)
    with pytest.raises(InputError, match="memory"):
        LBFGSParams(memory=0)
    with pytest.raises(InputError, match="curvature_guard"):
        LBFGSParams(curvature_guard="sometimes")
    st = _state([[0.0, 0, 0]], [1])
    with pytest.raises(InputError, match="expected"):
        lbfgs_set_results(st, torch.zeros(2), torch.zeros(1, 3))
    with pytest.raises(InputError, match="different history buffers"):
        LBFGSState.concat([_state([[0.0, 0, 0]], [1]), _state([[0.0, 0, 0]], [1])])

"""Batched cell relaxation (relax_batch(..., cell_filter="frechet")) against ASE's own
FrechetCellFilter + LBFGS (the independent reference, run here) with EMT, plus the stress
capability of the Potential interface."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import statistics

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms, FixCartesian
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import LBFGS

from eqv2_calc.errors import InputError
from eqv2_calc.graph import atoms_to_batch
from eqv2_calc.potential import ASEPotential, Potential
from eqv2_calc.relax import CellFilter, RelaxStats, relax_batch
from eqv2_calc.relax.cell import (
    cell_init,
    cell_set_coordinates,
    cell_set_results,
    cell_system_fmax,
    expm_frechet_adjoint,
)
from eqv2_calc.relax.testing import FaultyPotential

FMAX = 0.01  # eV/Å (and eV on the cell rows), both sides
STEPS = 300
ENERGY_TOL = 1e-3  # eV/atom, acceptance criterion vs ASE
LATTICE_TOL = 1e-3  # Å, acceptance criterion vs ASE (cell lengths)
ANGLE_TOL = 1e-2  # degrees


# ------------------------------------------------------------------ structures and references
def strained(atoms: Atoms, seed: int, amount: float = 0.03, rattle: float = 0.0, isotropic: bool = False) -> Atoms:
    """``atoms`` under a random symmetric strain with components in [-amount, amount] (or an
    isotropic one of ±amount) (cell and atoms scaled), optionally rattled (Å, seeded)."""
    rng = np.random.default_rng(seed)
    eps = rng.uniform(-amount, amount, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    if isotropic:
        eps = np.eye(3) * amount * rng.choice([-1.0, 1.0])
    out = atoms.copy()
    out.set_cell(out.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    if rattle:
        out.rattle(rattle, seed=seed)
    return out


def bulk_crystals() -> list[tuple[str, Atoms]]:
    """14 EMT crystals of 1..16 atoms: fcc (primitive, cubic, orthorhombic cells and supercells),
    bcc, hcp, L1_2 and L1_0 alloys; every one strained by up to ±3 %, half of them rattled.

    bcc is a saddle point of EMT's Bain path, so the bcc cells are strained isotropically and
    stay bcc by symmetry; a sheared one reaches a different stationary point depending on how
    the optimizer treats negative curvature (see
    :func:`test_sheared_bcc_saddle_point_and_the_curvature_guard`)."""
    l12 = bulk("Cu", "fcc", a=3.70, cubic=True)
    l12.symbols[0] = "Au"
    l10 = bulk("Cu", "fcc", a=3.80, cubic=True)
    l10.symbols = ["Cu", "Au", "Au", "Cu"]
    specs = [
        ("Cu fcc prim", bulk("Cu", "fcc", a=3.6), 0.0),
        ("Al fcc cubic", bulk("Al", "fcc", a=4.05, cubic=True), 0.05),
        ("Ni fcc prim 3x3x1", bulk("Ni", "fcc", a=3.52) * (3, 3, 1), 0.05),
        ("Pd fcc prim 2x2x2", bulk("Pd", "fcc", a=3.89) * (2, 2, 2), 0.03),
        ("Ag fcc prim 2x1x1", bulk("Ag", "fcc", a=4.09) * (2, 1, 1), 0.0),
        ("Au fcc cubic", bulk("Au", "fcc", a=4.08, cubic=True), 0.05),
        ("Pt fcc cubic 2x2x1", bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 1), 0.04),
        ("Ag fcc orth", bulk("Ag", "fcc", a=4.09, orthorhombic=True), 0.05),
        ("Cu bcc prim", bulk("Cu", "bcc", a=2.87), "isotropic"),
        ("Ni bcc cubic 2x2x1", bulk("Ni", "bcc", a=2.80, cubic=True) * (2, 2, 1), "isotropic"),
        ("Cu hcp", bulk("Cu", "hcp", a=2.55, c=4.16), 0.03),
        ("Pt hcp 2x2x1", bulk("Pt", "hcp", a=2.77, c=4.53) * (2, 2, 1), 0.0),
        ("Cu3Au L1_2", l12, 0.03),
        ("CuAu L1_0", l10, 0.03),
    ]
    return [(name, strained(a, seed=i, rattle=r if r != "isotropic" else 0.0, isotropic=r == "isotropic"))
            for i, (name, a, r) in enumerate(specs)]


class OnceFrechetCellFilter(FrechetCellFilter):
    """ASE's FrechetCellFilter computing ``get_forces()`` once per geometry: ASE's optimizer asks
    for them three times per step (log, convergence test, step), and each time costs a scipy
    logm and nine expm_frechet calls. The numbers are ASE's own."""

    def get_forces(self, **kwargs):
        key = (self.atoms.positions.tobytes(), self.atoms.cell.array.tobytes(), tuple(sorted(kwargs.items())))
        if getattr(self, "_key", None) != key:
            self._key, self._forces = key, super().get_forces(**kwargs)
        return self._forces.copy()


@contextlib.contextmanager
def single_threaded_scipy_blas():
    """Run scipy's bundled OpenBLAS on one thread inside the block (restored after), if it is
    the one loaded. ASE's filter makes a dozen scipy calls on 3×3 matrices per step (logm,
    expm_frechet); on 2 cores shared with other jobs OpenBLAS's thread hand-offs make them
    5-10× slower than the work itself. Speed only: 3×3 results do not depend on it."""
    import scipy

    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs",
                                  "libscipy_openblas*.so*"))
    try:
        lib = ctypes.CDLL(libs[0])
        get, set_ = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
    except (IndexError, OSError, AttributeError):
        yield
        return
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def ase_cell_relax(atoms: Atoms, fmax: float = FMAX, steps: int = STEPS, **filter_kw):
    """ASE's reference: FrechetCellFilter + ase.optimize.LBFGS with EMT on a copy; returns
    (relaxed atoms, nsteps, converged, cells along the path)."""
    a = atoms.copy()
    a.calc = EMT()
    opt = LBFGS(OnceFrechetCellFilter(a, **filter_kw), logfile=None)
    cells: list[np.ndarray] = []
    opt.attach(lambda: cells.append(a.cell.array.copy()))
    with single_threaded_scipy_blas():
        converged = opt.run(fmax=fmax, steps=steps)
    return a, opt.nsteps, converged, cells


def emt_stress(atoms: Atoms) -> np.ndarray:
    a = atoms.copy()
    a.calc = EMT()
    return a.get_stress(voigt=False)


@pytest.fixture(scope="module")
def crystals():
    return bulk_crystals()


@pytest.fixture(scope="module")
def ase_runs(crystals):
    return [ase_cell_relax(a) for _, a in crystals]


@pytest.fixture(scope="module")
def batch_run(crystals):
    stats = RelaxStats()
    pot = FaultyPotential(ASEPotential(EMT()))  # records the batch sizes
    # 16 atoms per call for 73 atoms in all: structures join and leave in flight
    results = relax_batch([a for _, a in crystals], pot, fmax=FMAX, steps=STEPS, max_atoms=16,
                          cell_filter="frechet", progress=False, stats=stats)
    return results, stats, pot


# ------------------------------------------------------------------ the acceptance comparison
@pytest.mark.slow
def test_cell_relaxation_matches_ase_frechet_lbfgs(crystals, ase_runs, batch_run):
    results, stats, pot = batch_run
    assert len(crystals) >= 12
    print(f"\n{'crystal':22s} {'atoms':>5s} {'steps':>5s} {'ASE':>5s} {'dE/atom (eV)':>12s} "
          f"{'d length (Å)':>12s} {'d angle (°)':>11s}")
    worst_e = worst_l = worst_a = 0.0
    for (name, atoms), r, (ref, n_ase, conv_ase, _) in zip(crystals, results, ase_runs):
        assert conv_ase, f"ASE did not converge {name}"
        assert r.converged and not r.failed, f"{name}: {r.reason}"
        assert r.fmax < FMAX
        de = abs(r.energy - ref.get_potential_energy()) / len(atoms)
        dpar = np.abs(r.atoms.cell.cellpar() - ref.cell.cellpar())
        print(f"{name:22s} {len(atoms):5d} {r.nsteps:5d} {n_ase:5d} {de:12.1e} {dpar[:3].max():12.1e} "
              f"{dpar[3:].max():11.1e}")
        assert de <= ENERGY_TOL, name
        assert dpar[:3].max() <= LATTICE_TOL, name
        assert dpar[3:].max() <= ANGLE_TOL, name
        # the relaxation did something: the cell really changed
        assert np.abs(r.atoms.cell.cellpar() - atoms.cell.cellpar())[:3].max() > 0.01, name
        worst_e, worst_l, worst_a = max(worst_e, de), max(worst_l, dpar[:3].max()), max(worst_a, dpar[3:].max())
    ours = statistics.median(r.nsteps for r in results)
    theirs = statistics.median(n for _, n, _, _ in ase_runs)
    print(f"median steps: ours {ours}, ASE {theirs}; max |dE| {worst_e:.1e} eV/atom, max |d length| "
          f"{worst_l:.1e} Å, max |d angle| {worst_a:.1e}°; {stats.potential_calls} potential calls for "
          f"{sum(r.force_calls for r in results)} structure evaluations, wall {stats.wall_time:.1f} s")
    assert ours <= theirs


@pytest.mark.slow
def test_without_curvature_guard_every_crystal_follows_ase_s_path(crystals, ase_runs):
    """curvature_guard="none" is ASE's LBFGS exactly: the same cells step by step."""
    results = relax_batch([a for _, a in crystals], EMT(), fmax=FMAX, steps=STEPS, max_atoms=16,
                          cell_filter="frechet", curvature_guard="none", save_every=1, progress=False)
    for (name, _), r, (_, n_ase, _, cells) in zip(crystals, results, ase_runs):
        assert r.nsteps == n_ase, name
        path = np.array([f.cell.array for f in r.trajectory])
        np.testing.assert_allclose(path, np.array(cells), atol=1e-8, err_msg=name)


def test_sheared_bcc_saddle_point_and_the_curvature_guard():
    """Sheared bcc Ni (EMT): ASE's LBFGS, and ours without the guard, stop at fmax < 0.01 near
    the bcc saddle point; with the default guard (pairs with y.s <= 0 skipped) the cell goes
    down the Bain path to a lower energy. A documented difference, not an accident."""
    atoms = strained(bulk("Ni", "bcc", a=2.80, cubic=True) * (2, 2, 1), seed=9)
    ref, n_ase, conv, _ = ase_cell_relax(atoms)
    exact, guarded = (relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", curvature_guard=g,
                                  progress=False)[0] for g in ("none", "skip"))
    assert conv and exact.converged and guarded.converged
    assert exact.nsteps == n_ase
    np.testing.assert_allclose(exact.atoms.cell.cellpar(), ref.cell.cellpar(), atol=1e-8)
    assert guarded.energy / len(atoms) < ref.get_potential_energy() / len(atoms) - 0.02  # eV/atom lower
    a, b, c = sorted(guarded.atoms.cell.lengths())
    assert c / a > 1.3  # no longer the near-cubic bcc cell: Bain-transformed


@pytest.mark.slow
def test_cell_relaxation_is_batched_in_flight(crystals, batch_run):
    results, stats, pot = batch_run
    evaluations = sum(r.force_calls for r in results)
    assert stats.utilization == 1.0 and stats.useful_evaluations == evaluations
    assert max(pot.batch_sizes) <= 16 or max(len(a) for _, a in crystals) > 16
    # several structures per call (batched), but never all of them at once (in flight)
    assert stats.potential_calls < evaluations
    assert stats.potential_calls > max(r.force_calls for r in results)
    assert len(set(pot.batch_sizes)) > 3


@pytest.mark.slow
def test_final_stress_is_symmetric_and_emt_s_own(crystals, batch_run):
    results, _, _ = batch_run
    for (name, atoms), r in zip(crystals, results):
        assert r.stress is not None and r.stress.shape == (3, 3)
        np.testing.assert_allclose(r.stress, r.stress.T, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(r.stress, emt_stress(r.atoms), atol=1e-12, err_msg=name)
        np.testing.assert_allclose(r.atoms.get_stress(voigt=False), r.stress, atol=0)  # carried by the frame
        # converged: the cell forces (virial / N, about |σ| V / N) are below fmax
        assert np.abs(r.stress).max() * r.atoms.get_volume() / len(atoms) < 2 * FMAX, name


# ------------------------------------------------------------------ the maths, against ASE and finite differences
def _state_at(atoms: Atoms, undeformed: np.ndarray, log_deform: np.ndarray, factor: float | None = None):
    """A one-system cell state with reference cell ``atoms.cell`` moved to the generalized
    coordinates (``undeformed``, ``c log F``)."""
    b = atoms_to_batch([atoms])
    st = cell_init(b.positions, b.numbers, b.natoms, b.cell, b.pbc, torch.ones(len(atoms), 3, dtype=torch.bool),
                   history_size=2, exp_cell_factor=factor)
    c = float(st.cell_factor[0])
    return cell_set_coordinates(st, torch.as_tensor(undeformed), torch.as_tensor(c * log_deform)[None])


def _evaluate(st, filt=CellFilter()):
    e, f, s = ASEPotential(factory=EMT)(st.as_atoms_batch(), stress=True)
    return cell_set_results(st, e, f, s, filt)


FILTER_CASES = [
    {},
    {"hydrostatic_strain": True},
    {"constant_volume": True},
    {"scalar_pressure": 0.01},
    {"exp_cell_factor": 3.0},
]


@pytest.mark.parametrize("kw", FILTER_CASES, ids=lambda kw: ",".join(kw) or "default")
def test_generalized_forces_match_ase_frechet_filter(kw):
    atoms = strained(bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1), seed=7, rattle=0.05)
    atoms.calc = EMT()
    filt = FrechetCellFilter(atoms, **kw)
    x = filt.get_positions()
    n = len(atoms)
    rng = np.random.default_rng(1)
    move = np.zeros_like(x)
    move[n:] = rng.normal(scale=0.05 * filt.exp_cell_factor, size=(3, 3))  # a deformed, rotated cell
    move[:n] = rng.normal(scale=0.02, size=(n, 3))
    filt.set_positions(x + move)
    ase_forces = filt.get_forces()
    base = atoms.copy()  # ASE moved `atoms`; the reference cell is the one the filter started from
    base.set_cell(filt.orig_cell, scale_atoms=False)
    c = filt.exp_cell_factor
    log_f = (x + move)[n:] / c - np.log(n) * np.eye(3)  # ASE's cell coordinates carry a constant c log(n) I
    st = _state_at(base, (x + move)[:n], log_f, factor=kw.get("exp_cell_factor"))
    np.testing.assert_allclose(st.cell.numpy()[0], atoms.cell.array, atol=1e-12)
    np.testing.assert_allclose(st.positions.numpy(), atoms.positions, atol=1e-12)
    _evaluate(st, CellFilter(**kw))
    ours = torch.cat([st.generalized_atom_forces(), st.cell_forces[0]]).numpy()
    np.testing.assert_allclose(ours, ase_forces, atol=1e-9, rtol=0)
    assert float(cell_system_fmax(st)[0]) == pytest.approx(np.linalg.norm(ase_forces, axis=1).max(), abs=1e-9)


def test_generalized_forces_are_the_negative_gradient_of_the_enthalpy():
    """Independent of ASE's filter: central differences of E + pV in the coordinates (x, X)."""
    atoms = strained(bulk("Pt", "fcc", a=3.92, cubic=True), seed=3, rattle=0.05)
    p = 0.005
    rng = np.random.default_rng(2)
    x = atoms.positions @ np.linalg.inv(np.eye(3) + 0.01 * rng.normal(size=(3, 3))).T
    log_f = 0.02 * rng.normal(size=(3, 3))
    filt = CellFilter(scalar_pressure=p)
    st = _evaluate(_state_at(atoms, x, log_f), filt)
    c = float(st.cell_factor[0])
    forces_x, forces_cell = st.generalized_atom_forces().numpy(), st.cell_forces[0].numpy()

    def enthalpy(dx, dcell):
        s = _evaluate(_state_at(atoms, x + dx, log_f + dcell / c), filt)
        return float(s.energy[0]) + p * abs(np.linalg.det(s.cell.numpy()[0]))

    h = 1e-5
    for i, j in [(0, 0), (0, 1), (1, 0), (2, 2), (1, 2)]:
        d = np.zeros((3, 3))
        d[i, j] = h
        num = -(enthalpy(0, d) - enthalpy(0, -d)) / (2 * h)
        assert forces_cell[i, j] == pytest.approx(num, abs=1e-7)
    for a, k in [(0, 0), (2, 1), (3, 2)]:
        d = np.zeros_like(x)
        d[a, k] = h
        num = -(enthalpy(d, 0) - enthalpy(-d, 0)) / (2 * h)
        assert forces_x[a, k] == pytest.approx(num, abs=1e-7)


def test_expm_frechet_adjoint_against_scipy():
    from scipy.linalg import expm_frechet

    rng = np.random.default_rng(0)
    a, g = rng.normal(size=(4, 3, 3)) * 0.3, rng.normal(size=(4, 3, 3)) * 50
    ours = expm_frechet_adjoint(torch.as_tensor(a), torch.as_tensor(g)).numpy()
    for s in range(4):
        ref = np.array([[np.sum(expm_frechet(a[s], np.eye(3)[[i]].T @ np.eye(3)[[j]], compute_expm=False) * g[s])
                         for j in range(3)] for i in range(3)])
        np.testing.assert_allclose(ours[s], ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ options
def _fcc_under_strain(seed=5):
    return strained(bulk("Cu", "fcc", a=3.55, cubic=True), seed=seed, amount=0.03, rattle=0.05)


def test_hydrostatic_strain_keeps_the_cell_shape_like_ase():
    atoms = _fcc_under_strain()
    r, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", hydrostatic_strain=True,
                     progress=False, save_every=1)
    ref, n_ase, _, _ = ase_cell_relax(atoms, hydrostatic_strain=True)
    assert r.converged
    c0 = atoms.cell.array
    for frame in r.trajectory:  # every cell along the path is a multiple of the input cell
        ratio = frame.cell.array[np.abs(c0) > 1e-9] / c0[np.abs(c0) > 1e-9]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    scale = (r.atoms.get_volume() / atoms.get_volume()) ** (1 / 3)
    assert abs(scale - 1) > 1e-3  # the volume did relax
    np.testing.assert_allclose(r.atoms.cell.cellpar(), ref.cell.cellpar(), atol=LATTICE_TOL)
    assert abs(r.energy - ref.get_potential_energy()) / len(atoms) < ENERGY_TOL
    assert abs(np.trace(r.stress)) / 3 * r.atoms.get_volume() / len(atoms) < FMAX  # no pressure left
    assert r.nsteps <= n_ase


def test_constant_volume_keeps_the_volume_like_ase():
    atoms = _fcc_under_strain()
    v0 = atoms.get_volume()
    r, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", constant_volume=True,
                     progress=False, save_every=1)
    ref, n_ase, _, _ = ase_cell_relax(atoms, constant_volume=True)
    assert r.converged and len(r.trajectory) == r.nsteps + 1
    for frame in r.trajectory:
        assert abs(frame.get_volume() / v0 - 1) < 1e-8
    assert np.abs(r.atoms.cell.cellpar() - atoms.cell.cellpar())[:3].max() > 0.01  # the shape did relax
    np.testing.assert_allclose(r.atoms.cell.cellpar(), ref.cell.cellpar(), atol=LATTICE_TOL)
    assert abs(r.energy - ref.get_potential_energy()) / len(atoms) < ENERGY_TOL
    deviatoric = r.stress - np.trace(r.stress) / 3 * np.eye(3)
    assert np.abs(deviatoric).max() * v0 / len(atoms) < 2 * FMAX
    assert r.nsteps <= n_ase


def test_scalar_pressure_compresses_like_ase():
    atoms = _fcc_under_strain(seed=9)
    p = 0.01  # eV/Å^3 = 1.6 GPa
    r, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", scalar_pressure=p, progress=False)
    ref, n_ase, _, _ = ase_cell_relax(atoms, scalar_pressure=p)
    assert r.converged and r.nsteps <= n_ase
    np.testing.assert_allclose(r.atoms.cell.cellpar(), ref.cell.cellpar(), atol=LATTICE_TOL)
    assert abs(r.energy - ref.get_potential_energy()) / len(atoms) < ENERGY_TOL  # E, without pV
    # at the minimum of E + pV the stress balances the pressure: σ ≈ -p I
    assert np.abs(r.stress + p * np.eye(3)).max() * r.atoms.get_volume() / len(atoms) < 2 * FMAX


def test_fixed_atoms_move_with_the_cell_like_ase():
    atoms = _fcc_under_strain()
    atoms.set_constraint(FixAtoms(indices=[0, 3]))  # 2 of 4 atoms
    r, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", progress=False)
    ref, n_ase, _, _ = ase_cell_relax(atoms)
    # fixed atoms keep their fractional coordinates (they move with the cell)
    np.testing.assert_allclose(r.atoms.get_scaled_positions(wrap=False)[[0, 3]],
                               atoms.get_scaled_positions(wrap=False)[[0, 3]], atol=1e-12)
    np.testing.assert_allclose(r.atoms.positions, ref.positions, atol=1e-6)
    np.testing.assert_allclose(r.atoms.cell.array, ref.cell.array, atol=1e-6)
    assert r.nsteps == n_ase


# ------------------------------------------------------------------ cell masks (ASE's mask=)
MASKS = {
    "no shear": [1, 1, 1, 0, 0, 0],
    "c axis only": [0, 0, 1, 0, 0, 0],
    "in plane": [1, 1, 0, 0, 0, 1],
    # free xy and yz shears make exp(X/c) grow an xz component that the mask removes:
    # the path where X is re-read as c log F (a matrix logarithm per step), as in ASE
    "xz kept": [1, 1, 1, 1, 0, 1],
    "3x3 array": np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]], dtype=bool),  # xx, zz, xz relax
}
MASKED_CRYSTALS = (1, 2, 4, 6, 7, 10, 12, 13)  # 2-16 atoms: cubic, 3x3x1, 2x1x1, orthorhombic, hcp, L1_2, L1_0


def _mask3(mask) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    return m if m.shape == (3, 3) else m[[[0, 5, 4], [5, 1, 3], [4, 3, 2]]]


@pytest.mark.slow
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masked_cell_relaxation_matches_ase_frechet_lbfgs(crystals, mask_name):
    mask = MASKS[mask_name]
    picked = [crystals[k] for k in MASKED_CRYSTALS]
    refs = [ase_cell_relax(a, mask=mask) for _, a in picked]
    results = relax_batch([a for _, a in picked], EMT(), fmax=FMAX, steps=STEPS, max_atoms=16,
                          cell_filter="frechet", cell_mask=mask, progress=False)
    kept = ~_mask3(mask)
    changed = 0.0
    for (name, atoms), r, (ref, n_ase, conv_ase, _) in zip(picked, results, refs):
        assert conv_ase, f"ASE did not converge {name}"
        assert r.converged and not r.failed and r.fmax < FMAX, f"{name}: {r.reason}"
        de = abs(r.energy - ref.get_potential_energy()) / len(atoms)
        dcell = np.abs(r.atoms.cell.array - ref.cell.array).max()
        print(f"{mask_name:12s} {name:22s} steps {r.nsteps:3d} (ASE {n_ase:3d}) dE/atom {de:.1e} eV, d cell {dcell:.1e} Å")
        assert de <= ENERGY_TOL, name
        assert dcell <= LATTICE_TOL, name
        # the kept components of the deformation C0^-1 C - I stay exactly where they were
        deformation = np.linalg.solve(atoms.cell.array, r.atoms.cell.array) - np.eye(3)
        assert np.abs(deformation[kept]).max(initial=0.0) < 1e-12, name
        changed = max(changed, np.abs(deformation[~kept]).max())
    assert changed > 0.01  # the free components did relax
    assert statistics.median(r.nsteps for r in results) <= statistics.median(n for _, n, _, _ in refs)


@pytest.mark.slow
def test_masked_relaxation_without_curvature_guard_follows_ase_s_path(crystals):
    """With curvature_guard="none" a masked relaxation is ASE's step for step, also where every
    step needs the matrix logarithm (the "xz kept" mask)."""
    mask = MASKS["xz kept"]
    picked = [crystals[k] for k in MASKED_CRYSTALS]
    results = relax_batch([a for _, a in picked], EMT(), fmax=FMAX, steps=STEPS, max_atoms=16, cell_filter="frechet",
                          cell_mask=mask, curvature_guard="none", save_every=1, progress=False)
    for (name, atoms), r in zip(picked, results):
        _, n_ase, _, cells = ase_cell_relax(atoms, mask=mask)
        assert r.nsteps == n_ase, name
        np.testing.assert_allclose(np.array([f.cell.array for f in r.trajectory]), np.array(cells), atol=1e-8,
                                   err_msg=name)


@pytest.mark.parametrize("kw", [{"constant_volume": True}, {"scalar_pressure": 0.01}], ids=["constant_volume", "pressure"])
def test_masked_options_match_ase(kw):
    atoms = _fcc_under_strain()
    mask = MASKS["no shear"]
    r, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", cell_mask=mask, progress=False,
                     save_every=1, **kw)
    ref, n_ase, conv, _ = ase_cell_relax(atoms, mask=mask, **kw)
    assert conv and r.converged and r.nsteps <= n_ase
    np.testing.assert_allclose(r.atoms.cell.array, ref.cell.array, atol=LATTICE_TOL)
    assert abs(r.energy - ref.get_potential_energy()) / len(atoms) < ENERGY_TOL
    off_diagonal = ~np.eye(3, dtype=bool)
    for frame in r.trajectory:
        assert np.abs(np.linalg.solve(atoms.cell.array, frame.cell.array)[off_diagonal]).max() < 1e-12
        if kw.get("constant_volume"):
            assert abs(frame.get_volume() / atoms.get_volume() - 1) < 1e-8


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masked_generalized_forces_and_step_geometry_match_ase_frechet_filter(mask_name):
    """One masked step as ASE's FrechetCellFilter(mask=...) takes it: set_positions() projects
    the deformation (cell and positions), get_positions() re-reads the cell coordinates, and
    get_forces() masks the virial."""
    mask = MASKS[mask_name]
    atoms = strained(bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1), seed=7, rattle=0.05)
    atoms.calc = EMT()
    base = atoms.copy()
    filt = FrechetCellFilter(atoms, mask=mask)
    x = filt.get_positions()
    n, c = len(atoms), filt.exp_cell_factor
    rng = np.random.default_rng(1)
    move = np.zeros_like(x)
    move[n:] = rng.normal(scale=0.05 * c, size=(3, 3))  # every component, the masked ones too
    move[:n] = rng.normal(scale=0.02, size=(n, 3))
    filt.set_positions(x + move)
    x_after = filt.get_positions()
    ase_forces = filt.get_forces()

    ours = CellFilter(mask=mask)
    st = _state_at(base, np.zeros((n, 3)), np.zeros((3, 3)))
    log_f = (x + move)[n:] / c - np.log(n) * np.eye(3)  # ASE's cell coordinates carry a constant c log(n) I
    cell_set_coordinates(st, torch.as_tensor((x + move)[:n]), torch.as_tensor(c * log_f)[None],
                         mask=ours.mask_tensor())
    np.testing.assert_allclose(st.cell.numpy()[0], atoms.cell.array, atol=1e-12)
    np.testing.assert_allclose(st.positions.numpy(), atoms.positions, atol=1e-12)
    np.testing.assert_allclose(st.cell_dof.numpy()[0], x_after[n:] - c * np.log(n) * np.eye(3), atol=1e-12)
    _evaluate(st, ours)
    got = torch.cat([st.generalized_atom_forces(), st.cell_forces[0]]).numpy()
    np.testing.assert_allclose(got, ase_forces, atol=1e-9, rtol=0)
    if mask_name != "xz kept":  # a mask closed under products: no force on the kept components
        assert np.abs(got[n:][~_mask3(mask)]).max(initial=0.0) < 1e-12


def test_cell_mask_forms_and_bad_masks():
    no_shear = ((True, False, False), (False, True, False), (False, False, True))
    assert CellFilter(mask=[1, 1, 1, 0, 0, 0]).mask == no_shear
    assert CellFilter(mask=np.eye(3, dtype=bool)).mask == no_shear
    assert CellFilter(mask=[True, False, False, True, False, False]).mask == (
        (True, False, False), (False, False, True), (False, True, False))  # xx and yz (Voigt order)
    assert CellFilter(mask=[1] * 6).mask is None and CellFilter(mask=np.ones((3, 3))).mask is None
    assert CellFilter(mask=[0] * 6).mask_tensor().sum() == 0  # every component kept: positions only
    bad = [
        ([1, 1, 1], r"shape \(3,\); expected 6 Voigt components \('xx', 'yy', 'zz', 'yz', 'xz', 'xy'\) or a 3×3"),
        ([[1, 1, 1], [1, 1, 1]], r"shape \(2, 3\)"),
        ([1] * 9, r"shape \(9,\)"),
        ("1,1,1,0,0,0", "not a string"),
        ([[1, 1, 1], [1, 1]], "not a rectangular array"),
        ([1, 1, 1, 0.5, 0.5, 0.5], r"True/1 \(relax\) or False/0 \(keep\)"),
        ([1, 1, 1, 1, 1, np.nan], "True/1"),
        ([2, 1, 1, 1, 1, 1], "True/1"),
        ([[1, 1, 0], [0, 1, 0], [0, 0, 1]], "must be symmetric"),
        ([1, 1, 1, 0, 0, 1j], "booleans"),
    ]
    for mask, message in bad:
        with pytest.raises(InputError, match=message):
            CellFilter(mask=mask)
    with pytest.raises(InputError, match=r"cell_mask keeps yz, xz, xy but hydrostatic_strain=True"):
        CellFilter(mask=[1, 1, 1, 0, 0, 0], hydrostatic_strain=True)
    with pytest.raises(InputError, match=r"normal strain\(s\) zz; with constant_volume=True"):
        CellFilter(mask=[1, 1, 0, 1, 1, 1], constant_volume=True)
    CellFilter(mask=[1, 1, 1, 0, 0, 0], constant_volume=True)  # shear kept at constant volume: fine
    crystal = bulk("Cu", "fcc", a=3.6)
    with pytest.raises(InputError, match=r"\['cell_mask'\] only apply to a cell relaxation"):
        relax_batch([crystal], EMT(), cell_mask=[1, 1, 1, 0, 0, 0], progress=False)
    with pytest.raises(InputError, match="inside the CellFilter"):
        relax_batch([crystal], EMT(), cell_filter=CellFilter(), cell_mask=[1, 1, 1, 0, 0, 0], progress=False)
    with pytest.raises(InputError, match="shape"):
        relax_batch([crystal], EMT(), cell_filter="frechet", cell_mask=[1, 0], progress=False)


def test_a_mask_that_keeps_nothing_is_no_mask():
    atoms = _fcc_under_strain()
    plain, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", progress=False)
    ones, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", cell_mask=[True] * 6, progress=False)
    assert ones.nsteps == plain.nsteps
    np.testing.assert_array_equal(ones.atoms.cell.array, plain.atoms.cell.array)
    np.testing.assert_array_equal(ones.atoms.positions, plain.atoms.positions)


# ------------------------------------------------------------------ in-flight machinery with a cell filter
def test_trajectory_frames_carry_cells_and_the_last_is_the_result(tmp_path):
    atoms = _fcc_under_strain()
    r, = relax_batch([atoms], EMT(), fmax=FMAX, cell_filter="frechet", trajectory_dir=tmp_path,
                     save_every=2, progress=False, names=["cu"])
    frames = read(tmp_path / "cu.traj", ":")
    assert len({round(f.get_volume(), 6) for f in frames}) > 2
    np.testing.assert_array_equal(frames[-1].cell.array, r.atoms.cell.array)
    np.testing.assert_array_equal(frames[-1].positions, r.atoms.positions)
    np.testing.assert_allclose(frames[-1].get_stress(voigt=False), r.stress, atol=0)
    np.testing.assert_array_equal(frames[0].cell.array, atoms.cell.array)
    np.testing.assert_array_equal(r.cell, r.atoms.cell.array)


def test_out_of_memory_and_nan_stop_only_what_they_hit():
    crystals = [a for k, (_, a) in enumerate(bulk_crystals()) if k in (0, 1, 4, 5, 7, 10)]  # 1-4 atoms, Al among them
    ref = relax_batch(crystals, ASEPotential(factory=EMT), fmax=0.02, max_atoms=8, cell_filter="frechet",
                      progress=False)
    stats = RelaxStats()
    pot = FaultyPotential(ASEPotential(factory=EMT), oom_when=lambda b, c: c == 4)
    out = relax_batch(crystals, pot, fmax=0.02, max_atoms=8, cell_filter="frechet", progress=False, stats=stats)
    assert stats.oom_events == 1
    for r0, r1 in zip(ref, out):  # continued from the suspended state: the same relaxation
        assert (r1.nsteps, r1.converged) == (r0.nsteps, r0.converged)
        np.testing.assert_allclose(r1.atoms.cell.array, r0.atoms.cell.array, atol=1e-10)
        np.testing.assert_allclose(r1.atoms.positions, r0.atoms.positions, atol=1e-10)

    def nan_for_al(batch, call):
        return torch.as_tensor([13 in batch.numbers[batch.system_idx == s].tolist()
                                for s in range(batch.num_systems)]) & (call >= 3)

    out = relax_batch(crystals, FaultyPotential(ASEPotential(factory=EMT), nan_when=nan_for_al), fmax=0.02,
                      max_atoms=8, cell_filter="frechet", progress=False)
    for a, r0, r1 in zip(crystals, ref, out):
        if 13 in a.numbers:
            assert r1.failed and r1.reason == "non_finite"
        else:
            assert (r1.nsteps, r1.converged, r1.failed) == (r0.nsteps, r0.converged, False)
            np.testing.assert_allclose(r1.atoms.cell.array, r0.atoms.cell.array, atol=1e-10)


def test_out_of_memory_alone_reports_the_last_evaluated_cell():
    crystals = [a for _, a in bulk_crystals()[:3]]
    big = len(crystals[2])
    pot = FaultyPotential(ASEPotential(EMT()), oom_when=lambda b, c: b.positions.shape[0] >= big and c >= 6)
    # the largest crystal (9 atoms) runs alone (budget 9) and runs out of memory at the 6th call
    results = relax_batch(crystals, pot, fmax=FMAX, max_atoms=big, cell_filter="frechet", progress=False)
    r = results[2]
    assert r.failed and r.reason == "out_of_memory" and r.nsteps > 0
    # the reported frame is a real evaluation: EMT there gives the stored energy and stress
    again = r.atoms.copy()
    again.calc = EMT()
    assert again.get_potential_energy() == pytest.approx(r.energy, abs=1e-10)
    np.testing.assert_allclose(again.get_stress(voigt=False), r.stress, atol=1e-12)
    assert results[0].converged and results[1].converged


# ------------------------------------------------------------------ the stress capability
@pytest.mark.parametrize("policy", ["share", "copy", "fresh"])
def test_ase_potential_stress_is_emt_s_own_and_follows_the_batch_cell(policy):
    crystals = [a for _, a in bulk_crystals()[:4]]
    pot = ASEPotential(EMT(), policy=policy)
    assert pot.provides_stress
    for key, a in enumerate(crystals):
        pot.attach(key, a)
    batch = atoms_to_batch(crystals)
    batch.cell = batch.cell * 1.01  # deform the batch: attached structures must follow it
    batch.positions = batch.positions * 1.01
    e, f, s = pot(batch, list(range(4)), stress=True)
    e2, f2 = pot(batch, list(range(4)))
    assert s.shape == (4, 3, 3) and s.dtype == torch.float64
    torch.testing.assert_close(e, e2, rtol=0, atol=0)
    for k, a in enumerate(crystals):
        b = a.copy()
        b.set_cell(a.cell.array * 1.01, scale_atoms=True)
        np.testing.assert_allclose(s[k].numpy(), emt_stress(b), atol=1e-12)
        np.testing.assert_allclose(s[k].numpy(), s[k].numpy().T, atol=1e-14)
        b.calc = EMT()
        assert float(e[k]) == pytest.approx(b.get_potential_energy(), abs=1e-10)


class EnergyForcesOnly(Calculator):
    """A calculator without stress (implemented_properties has no 'stress')."""

    implemented_properties = ("energy", "forces")

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


def test_a_potential_without_stress_is_refused_by_name():
    pot = ASEPotential(EnergyForcesOnly())
    assert not pot.provides_stress and not Potential.provides_stress
    crystal = bulk("Cu", "fcc", a=3.6)
    with pytest.raises(InputError, match=r"ASEPotential\(EnergyForcesOnly.*provides_stress=False"):
        relax_batch([crystal], pot, cell_filter="frechet", progress=False)
    with pytest.raises(InputError, match="stress"):
        pot(atoms_to_batch([crystal]), stress=True)

    class Plain(Potential):  # a third-party potential with the old signature, no stress
        def __call__(self, batch, keys=None):
            return ASEPotential(factory=EMT)(batch, keys)

    with pytest.raises(InputError, match=r"Plain does not provide it.*cell_filter=None"):
        relax_batch([crystal], Plain(), cell_filter="frechet", progress=False)


def test_non_periodic_systems_and_bad_options_are_refused():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)  # pbc = (True, True, False)
    crystal = bulk("Cu", "fcc", a=3.6)
    with pytest.raises(InputError, match=r"structure 1 is not periodic in all 3 directions.*without cell_filter"):
        relax_batch([crystal, slab], EMT(), cell_filter="frechet", progress=False)
    with pytest.raises(InputError, match="periodic in all 3 directions"):
        ASEPotential(EMT())(atoms_to_batch([slab]), stress=True)
    with pytest.raises(InputError, match="cell_filter='frechet'"):
        relax_batch([crystal], EMT(), hydrostatic_strain=True, progress=False)
    with pytest.raises(InputError, match="cell_filter"):
        relax_batch([crystal], EMT(), cell_filter="ucf", progress=False)
    with pytest.raises(InputError, match="exp_cell_factor"):
        CellFilter(exp_cell_factor=0.0)
    partial = crystal * (2, 1, 1)
    partial.set_constraint(FixCartesian(0, mask=(True, False, False)))
    with pytest.raises(InputError, match="whole atoms"):
        relax_batch([partial], EMT(), cell_filter="frechet", progress=False)


def test_without_cell_filter_nothing_changes():
    """A bulk crystal relaxed without cell_filter: the cell stays, no stress is asked for or
    reported, and the path is ASE's plain LBFGS."""
    atoms = _fcc_under_strain()
    calls = []

    class NoStressKeyword(Potential):  # the pre-stress signature still works for positions only
        def __init__(self):
            self.inner = ASEPotential(EMT())

        def attach(self, key, a):
            self.inner.attach(key, a)

        def __call__(self, batch, keys=None):
            calls.append(batch.num_systems)
            return self.inner(batch, keys)

    r, = relax_batch([atoms], NoStressKeyword(), fmax=0.02, progress=False, curvature_guard="none")
    ref = atoms.copy()
    ref.calc = EMT()
    opt = LBFGS(ref, logfile=None)
    opt.run(fmax=0.02, steps=300)
    assert r.converged and r.nsteps == opt.nsteps and len(calls) == r.force_calls
    np.testing.assert_array_equal(r.atoms.cell.array, atoms.cell.array)
    np.testing.assert_allclose(r.atoms.positions, ref.positions, atol=1e-6)
    assert r.stress is None and "stress" not in r.atoms.calc.results


# ------------------------------------------------------------------ CLI
def test_cli_relax_cell_and_resume(tmp_path, capsys):
    from eqv2_calc.cli import main

    crystals = [a for _, a in bulk_crystals()[:3]]
    inp, out = tmp_path / "in.extxyz", tmp_path / "out"
    write(inp, crystals, format="extxyz")
    args = ["relax", str(inp), "--calculator", "emt", "--out", str(out), "--no-progress", "--fmax", "0.02",
            "--relax-cell"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())["settings"]
    assert run["relax_cell"] is True and run["hydrostatic_strain"] is False and run["scalar_pressure"] == 0.0
    relaxed = read(out / "is2rs.extxyz", ":")
    direct = relax_batch(read(inp, ":"), EMT(), fmax=0.02, cell_filter="frechet", progress=False)
    for a, r in zip(relaxed, direct):
        np.testing.assert_allclose(a.cell.array, r.atoms.cell.array, atol=1e-7)
        np.testing.assert_allclose(a.get_stress(voigt=False), r.stress, atol=1e-7)
    capsys.readouterr()
    assert main(args) == 0  # resumes: everything is finished
    assert json.loads((out / "summary.json").read_text())["resumed"] == 3
    capsys.readouterr()
    assert main(args[:-1]) == 2  # positions only is another result: refused
    assert "relax_cell: true → false" in capsys.readouterr().err
    assert main([*args, "--hydrostatic-strain"]) == 2
    assert "hydrostatic_strain: false → true" in capsys.readouterr().err
    assert main([*args[:-1], "--constant-volume", "--out", str(tmp_path / "o2")]) == 2
    assert "add --relax-cell" in capsys.readouterr().err


def test_cli_cell_mask_and_resume(tmp_path, capsys):
    from eqv2_calc.cli import main

    crystals = [a for _, a in bulk_crystals()[:3]]
    inp, out = tmp_path / "in.extxyz", tmp_path / "out"
    write(inp, crystals, format="extxyz")
    base = ["relax", str(inp), "--calculator", "emt", "--no-progress", "--fmax", "0.02"]
    args = [*base, "--out", str(out), "--relax-cell", "--cell-mask", "0,0,1,0,0,0"]
    assert main(args) == 0
    recorded = json.loads((out / "run.json").read_text())["settings"]["cell_mask"]
    assert recorded == [False, False, True, False, False, False]
    relaxed = read(out / "is2rs.extxyz", ":")
    direct = relax_batch(read(inp, ":"), EMT(), fmax=0.02, cell_filter="frechet", cell_mask=[0, 0, 1, 0, 0, 0],
                         progress=False)
    zz_only = np.zeros((3, 3), dtype=bool)
    zz_only[2, 2] = True
    for a, r, a0 in zip(relaxed, direct, crystals):
        np.testing.assert_allclose(a.cell.array, r.atoms.cell.array, atol=1e-7)
        deformation = np.linalg.solve(a0.cell.array, a.cell.array) - np.eye(3)
        assert np.abs(deformation[~zz_only]).max() < 1e-7  # only zz relaxed
    capsys.readouterr()
    assert main([*args[:-1], "false,false,true,false,false,false"]) == 0  # the same mask, other spelling
    assert json.loads((out / "summary.json").read_text())["resumed"] == 3
    capsys.readouterr()
    assert main([*args[:-1], "1,1,1,0,0,0"]) == 2  # another mask is another result: refused
    assert ("cell_mask: [false, false, true, false, false, false] → [true, true, true, false, false, false]"
            in capsys.readouterr().err)
    assert main(args[:-2]) == 2  # without the mask: refused too
    assert "cell_mask: [false, false, true, false, false, false] → null" in capsys.readouterr().err
    o2 = tmp_path / "o2"
    assert main([*base, "--out", str(o2), "--relax-cell", "--cell-mask", "1,1,1,1,1,1"]) == 0
    assert json.loads((o2 / "run.json").read_text())["settings"]["cell_mask"] is None  # nothing kept = no mask
    capsys.readouterr()
    o3 = ["--out", str(tmp_path / "o3")]
    for extra, message in [(["--cell-mask", "1,1,1"], "six comma-separated 1/0 values for xx,yy,zz,yz,xz,xy"),
                           (["--cell-mask", "1,1,1,0,0,2"], "six comma-separated"),
                           (["--cell-mask", "1,1,1,0,0,0", "--hydrostatic-strain"],
                            "hydrostatic_strain=True allows only an isotropic deformation")]:
        assert main([*base, *o3, "--relax-cell", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main([*base, *o3, "--cell-mask", "1,1,1,0,0,0"]) == 2
    assert "--cell-mask only apply to a cell relaxation: add --relax-cell" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()  # refused before anything is written


def test_nan_from_the_cell_maths_is_non_finite_not_a_step_limit(monkeypatch):
    """Finite forces and stress but a NaN cell measure (a degenerate cell makes logm NaN) stop
    the system as non_finite at once instead of running it to the step limit."""
    import eqv2_calc.relax.readout as readout

    real, calls = readout.cell_system_fmax, []

    def nan_after_three(state):
        calls.append(1)
        out = real(state)
        return torch.full_like(out, float("nan")) if len(calls) > 3 else out

    monkeypatch.setattr(readout, "cell_system_fmax", nan_after_three)
    crystals = [a for _, a in bulk_crystals()[:3]]
    out = relax_batch(crystals, ASEPotential(factory=EMT), fmax=1e-6, steps=200, cell_filter="frechet", progress=False)
    assert all(r.failed and r.reason == "non_finite" and r.nsteps <= 3 for r in out), [(r.reason, r.nsteps) for r in out]

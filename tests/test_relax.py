"""Batched L-BFGS relaxer against ASE's own LBFGS (the independent reference) with EMT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms, FixBondLength, FixCartesian
from ase.io import read
from ase.optimize import LBFGS

from eqv2_calc.errors import InputError
from eqv2_calc.potential import ASEPotential, Potential
from eqv2_calc.relax import RelaxStats, relax_batch
from eqv2_calc.relax.testing import FaultyPotential, adsorbate_slab, slab_systems

FMAX = 0.05
STEPS = 300
N_SYSTEMS = 24
PATH_TOL = 1e-6  # Å; acceptance criterion for following ASE's path (float64 both sides)
ENERGY_TOL = 1e-3  # eV; acceptance criterion for final energies vs ASE


def ase_lbfgs(atoms: Atoms, fmax: float = FMAX, steps: int = STEPS, **kw):
    """Relax a copy with ase.optimize.LBFGS + EMT; return (atoms, nsteps, converged, positions per step)."""
    a = atoms.copy()
    a.calc = EMT()
    opt = LBFGS(a, logfile=None, **kw)
    frames: list[np.ndarray] = []
    opt.attach(lambda: frames.append(a.get_positions().copy()))
    converged = opt.run(fmax=fmax, steps=steps)
    return a, opt.nsteps, converged, frames


def emt_fmax(atoms: Atoms) -> float:
    a = atoms.copy()
    a.calc = EMT()
    return float(np.linalg.norm(a.get_forces(), axis=1).max())  # constraints applied by ASE


@pytest.fixture(scope="module")
def systems() -> list[Atoms]:
    return slab_systems(N_SYSTEMS, sizes=((2, 2, 3), (2, 2, 3), (3, 3, 3)), rattle=0.05)


@pytest.fixture(scope="module")
def ase_runs(systems):
    return [ase_lbfgs(s) for s in systems]


@pytest.fixture(scope="module")
def batch_run(systems):
    stats = RelaxStats()
    # capacity far below the set (~520 atoms): exercises in-flight refill
    results = relax_batch(systems, EMT(), fmax=FMAX, steps=STEPS, max_atoms=120,
                          progress=False, stats=stats)
    return results, stats


def test_final_energies_match_ase(systems, ase_runs, batch_run):
    results, _ = batch_run
    assert len(systems) >= 20
    de = np.array([abs(r.energy - a.get_potential_energy()) for r, (a, *_rest) in zip(results, ase_runs)])
    assert np.mean(de < ENERGY_TOL) >= 0.9, de
    assert all(r.converged for r in results)
    # where the default curvature guard leaves ASE's path, ASE got stuck or found another
    # minimum: never a worse result by more than a few meV
    worse = [r.energy - a.get_potential_energy() for r, (a, *_rest) in zip(results, ase_runs)]
    assert max(worse) < 5e-3, worse


def test_without_curvature_guard_every_system_follows_ase(systems, ase_runs):
    """curvature_guard='none' is ASE's algorithm exactly: same steps and energies for all."""
    results = relax_batch(systems, EMT(), fmax=FMAX, steps=STEPS, max_atoms=120,
                          progress=False, curvature_guard="none")
    for r, (a, n, conv, _) in zip(results, ase_runs):
        assert (r.nsteps, r.converged) == (n, conv)
        assert r.energy == pytest.approx(a.get_potential_energy(), abs=1e-6)


def test_median_steps_not_larger_than_ase(ase_runs, batch_run):
    results, _ = batch_run
    assert np.median([r.nsteps for r in results]) <= np.median([n for _, n, _, _ in ase_runs])


def test_results_are_consistent_with_an_independent_emt_evaluation(systems, batch_run):
    results, _ = batch_run
    for s, r in zip(systems, results):
        assert r.index == systems.index(s) and r.force_calls == r.nsteps + 1
        fresh = r.atoms.copy()
        fresh.calc = EMT()
        assert r.energy == pytest.approx(fresh.get_potential_energy(), abs=1e-9)
        assert r.fmax == pytest.approx(emt_fmax(r.atoms), abs=1e-9)
        assert r.converged == (r.fmax < FMAX) and r.converged and not r.failed
        assert r.reason == "converged"
        # raw forces in the calculator, constraints kept on the Atoms
        np.testing.assert_allclose(r.atoms.get_forces(apply_constraint=False),
                                   fresh.get_forces(apply_constraint=False), atol=1e-9)
        assert [type(c) for c in r.atoms.constraints] == [FixAtoms]


def test_fixed_atoms_move_exactly_zero(systems, batch_run):
    results, _ = batch_run
    for s, r in zip(systems, results):
        fixed = s.constraints[0].index
        assert len(fixed) > 0
        for frame in r.trajectory:
            assert np.array_equal(frame.positions[fixed], s.positions[fixed])
        assert not np.array_equal(r.atoms.positions, s.positions)  # free atoms did move


def test_inflight_batching_uses_every_evaluation(systems, batch_run):
    results, stats = batch_run
    assert stats.utilization == 1.0
    assert stats.useful_evaluations == sum(r.force_calls for r in results)
    assert stats.potential_calls < stats.useful_evaluations / 3  # systems really share calls
    assert stats.atoms_evaluated <= stats.potential_calls * 120


def test_batch_capacity_respected():
    systems = slab_systems(8)
    pot = FaultyPotential(ASEPotential(EMT()))
    relax_batch(systems, pot, max_atoms=30, progress=False)
    assert max(pot.batch_sizes) <= 30
    assert pot.batch_sizes[0] >= 26  # two 13-14 atom systems share the first call


def test_batch_of_one_follows_ase_path():
    atoms = adsorbate_slab("Pt", "111", "CO", (3, 3, 3), rattle=0.1, seed=3)
    fmax = 0.01
    _, n_ase, _, ase_frames = ase_lbfgs(atoms, fmax=fmax)
    assert n_ase > 10
    [res] = relax_batch([atoms], EMT(), fmax=fmax, save_every=1, progress=False)
    ours = [f.positions for f in res.trajectory]
    for k in range(11):  # initial frame + first 10 steps
        assert np.abs(ours[k] - ase_frames[k]).max() <= PATH_TOL, k
    assert res.nsteps == n_ase


@pytest.mark.parametrize("steps", [0, 1, 4])
def test_step_cap_like_ase(steps):
    atoms = adsorbate_slab("Cu", "100", "O", rattle=0.1, seed=1)
    a, n, conv, frames = ase_lbfgs(atoms, fmax=1e-4, steps=steps)
    [r] = relax_batch([atoms], EMT(), fmax=1e-4, steps=steps, progress=False)
    assert (r.nsteps, r.converged, n, conv) == (steps, False, steps, False)
    assert r.reason == "max_steps" and r.force_calls == steps + 1
    assert np.abs(r.atoms.positions - a.positions).max() <= PATH_TOL
    assert len(r.trajectory) == (1 if steps == 0 else 2)


def test_mixed_sizes_and_pbc_in_one_batch():
    slab_small = adsorbate_slab("Cu", "111", "O", (2, 2, 3), rattle=0.05, seed=1)
    slab_big = adsorbate_slab("Pd", "100", "OH", (3, 3, 3), rattle=0.05, seed=2)
    cu_bulk = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))  # pbc T T T
    cu_bulk.rattle(0.05, seed=4)
    cluster = Atoms("Au6", positions=np.array(
        [[0, 0, 0], [2.8, 0, 0], [0, 2.8, 0], [2.8, 2.8, 0], [1.4, 1.4, 2.0], [1.4, 1.4, -2.0]]) + 0.05)
    cluster.rattle(0.05, seed=5)  # pbc F F F, no cell
    systems = [slab_small, cu_bulk, cluster, slab_big]
    assert len({tuple(s.pbc) for s in systems}) == 3 and len({len(s) for s in systems}) == 4
    results = relax_batch(systems, EMT(), fmax=FMAX, progress=False)
    for s, r in zip(systems, results):
        a, n, conv, _ = ase_lbfgs(s)
        assert r.converged and conv
        assert r.energy == pytest.approx(a.get_potential_energy(), abs=1e-6)
        assert r.nsteps == n
        assert np.abs(r.atoms.positions - a.positions).max() <= 1e-5
        assert np.array_equal(r.atoms.pbc, s.pbc)


def test_fixcartesian_and_fix_tag0():
    atoms = adsorbate_slab("Ni", "111", "H", rattle=0.05, seed=6)
    atoms.set_constraint([FixAtoms(indices=[0, 1, 2, 3]), FixCartesian(12, mask=(True, True, False))])
    a, n, _, _ = ase_lbfgs(atoms)
    [r] = relax_batch([atoms], EMT(), progress=False)
    assert r.energy == pytest.approx(a.get_potential_energy(), abs=1e-6) and r.nsteps == n
    assert np.array_equal(r.atoms.positions[12, :2], atoms.positions[12, :2])
    assert r.atoms.positions[12, 2] != atoms.positions[12, 2]

    oc20 = adsorbate_slab("Cu", "111", "O", fixed_layers=0, rattle=0.05, seed=7)
    tags = np.array([0] * 8 + [1] * 4 + [2])  # OC20 tags: 0 subsurface, 1 surface, 2 adsorbate
    oc20.set_tags(tags)
    [r] = relax_batch([oc20], EMT(), fix_tag0=True, progress=False)
    assert np.array_equal(r.atoms.positions[tags == 0], oc20.positions[tags == 0])
    assert not np.array_equal(r.atoms.positions[tags > 0], oc20.positions[tags > 0])


def test_trajectory_files_last_frame_is_the_result(tmp_path):
    systems = slab_systems(4, rattle=0.05)
    results = relax_batch(systems, EMT(), trajectory_dir=tmp_path, save_every=3,
                          names=[f"s{i}" for i in range(4)], progress=False)
    for s, r in zip(systems, results):
        frames = read(tmp_path / f"{r.name}.traj", index=":")
        expected = 1 + r.nsteps // 3 + (1 if r.nsteps % 3 else 0)
        assert len(frames) == len(r.trajectory) == expected
        np.testing.assert_array_equal(frames[0].positions, s.positions)
        last = frames[-1]
        np.testing.assert_array_equal(last.positions, r.atoms.positions)
        assert last.get_potential_energy() == r.energy
        np.testing.assert_array_equal(last.get_forces(apply_constraint=False),
                                      r.atoms.get_forces(apply_constraint=False))
        np.testing.assert_array_equal(last.constraints[0].index, s.constraints[0].index)
        assert frames[0].get_potential_energy() == r.initial_energy


def _by_element(z: int):
    def has(batch, _call):
        has_z = torch.zeros(batch.num_systems, dtype=torch.bool)
        return has_z.index_put_((batch.system_idx[batch.numbers == z],), torch.tensor(True))
    return has


def test_nan_in_one_system_does_not_touch_the_others():
    systems = slab_systems(8, rattle=0.05)
    poisoned = [i for i, s in enumerate(systems) if {7, 78} <= set(s.numbers)]  # the Pt + N system
    assert len(poisoned) == 1
    ref = relax_batch(systems, FaultyPotential(ASEPotential(factory=EMT)), max_atoms=60, progress=False)
    pt, n = _by_element(78), _by_element(7)
    pot = FaultyPotential(ASEPotential(factory=EMT), nan_when=lambda b, c: pt(b, c) & n(b, c) & (c >= 4))
    out = relax_batch(systems, pot, max_atoms=60, progress=False)
    for i, (r0, r1) in enumerate(zip(ref, out)):
        if i in poisoned:
            assert r1.failed and r1.reason == "non_finite" and not r1.converged
            assert np.isnan(r1.energy) and np.isfinite(r1.atoms.positions).all()
        else:
            assert not r1.failed and r1.nsteps == r0.nsteps and r1.energy == r0.energy
            np.testing.assert_array_equal(r1.atoms.positions, r0.atoms.positions)


def test_exploding_forces_are_flagged():
    systems = slab_systems(3)

    class Exploding(FaultyPotential):
        def __call__(self, batch, keys=None):
            e, f = super().__call__(batch, keys)
            boom = _by_element(29)(batch, 0)[batch.system_idx][:, None]  # the Cu system
            return e, torch.where(boom, f * 1e7, f)

    results = relax_batch(systems, Exploding(ASEPotential(EMT())), progress=False)
    cu = [s.get_chemical_symbols()[0] == "Cu" for s in systems]
    for r, is_cu in zip(results, cu):
        assert r.failed == is_cu
        assert r.reason == ("force_explosion" if is_cu else "converged")


def test_out_of_memory_shrinks_batch_and_continues_from_state():
    systems = slab_systems(10, rattle=0.05)
    ref_stats = RelaxStats()
    ref = relax_batch(systems, FaultyPotential(ASEPotential(factory=EMT)), max_atoms=80,
                      progress=False, stats=ref_stats)
    pot = FaultyPotential(ASEPotential(factory=EMT), oom_when=lambda b, c: c == 5)
    stats = RelaxStats()
    out = relax_batch(systems, pot, max_atoms=80, progress=False, stats=stats)
    assert stats.oom_events == 1
    # no restart: every structure needed exactly the evaluations of the reference run
    assert stats.useful_evaluations == ref_stats.useful_evaluations
    assert stats.utilization < 1.0
    assert max(pot.batch_sizes[4:]) <= 40  # budget halved after the OOM
    for r0, r1 in zip(ref, out):
        assert (r1.nsteps, r1.converged, r1.energy) == (r0.nsteps, r0.converged, r0.energy)
        np.testing.assert_array_equal(r1.atoms.positions, r0.atoms.positions)


def test_out_of_memory_alone_fails_only_that_system():
    small = slab_systems(2)
    big = adsorbate_slab("Pt", "111", "O", (3, 3, 3))
    pot = FaultyPotential(ASEPotential(EMT()), oom_when=lambda b, c: b.positions.shape[0] > 20)
    results = relax_batch([small[0], big, small[1]], pot, progress=False)
    assert [r.failed for r in results] == [False, True, False]
    assert results[1].reason == "out_of_memory" and results[1].nsteps == 0
    assert results[0].converged and results[2].converged


def test_other_errors_propagate():
    class Broken(Potential):
        def __call__(self, batch, keys=None):
            raise RuntimeError("shape mismatch in layer 3")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        relax_batch(slab_systems(2), Broken(), progress=False)


def test_force_provider_forms():
    systems = slab_systems(2)

    class CalculatorLike:  # e.g. EquiformerV2Calculator exposing its batched potential
        potential = ASEPotential(EMT())

    e = [r.energy for r in relax_batch(systems, EMT(), progress=False)]
    assert [r.energy for r in relax_batch(systems, ASEPotential(EMT()), progress=False)] == pytest.approx(e, abs=1e-9)
    assert [r.energy for r in relax_batch(systems, CalculatorLike(), progress=False)] == pytest.approx(e, abs=1e-9)
    with pytest.raises(InputError, match="force provider"):
        relax_batch(systems, object(), progress=False)


def test_bad_input_is_rejected_clearly():
    s = slab_systems(1)[0]
    with pytest.raises(InputError, match="empty"):
        relax_batch([], EMT())
    with pytest.raises(InputError, match="structure 1 is a str"):
        relax_batch([s, "POSCAR"], EMT())
    with pytest.raises(InputError, match="single Atoms"):
        relax_batch(s, EMT())
    with pytest.raises(InputError, match="unknown optimizer option"):
        relax_batch([s], EMT(), name="lbfgs")
    with pytest.raises(InputError, match="maxstep"):
        relax_batch([s], EMT(), maxstep=1.5)
    with pytest.raises(InputError, match="steps"):
        relax_batch([s], EMT(), steps=-1)
    bonded = s.copy()
    bonded.set_constraint(FixBondLength(11, 12))
    with pytest.raises(InputError, match="unsupported constraint FixBondLength"):
        relax_batch([bonded], EMT())
    untagged = s.copy()
    untagged.set_tags(0)
    with pytest.raises(InputError, match="tag 0"):
        relax_batch([untagged], EMT(), fix_tag0=True)


def test_rejected_structure_fails_alone_with_reason():
    """A structure the potential rejects (atoms 0.05 Å apart) is flagged; the others relax as
    they would alone."""
    from ase import Atoms

    from eqv2_calc import EquiformerV2Calculator

    calc = EquiformerV2Calculator(Path(__file__).parent / "data" / "eqv2_tiny_l4m2.pt")
    good = slab_systems(2)
    bad = Atoms("CuCu", positions=[[0, 0, 0], [0.05, 0, 0]], cell=[8, 8, 8], pbc=True)
    results = relax_batch([good[0], bad, good[1]], calc, fmax=0.05, steps=3, progress=False)
    assert results[1].failed and results[1].reason.startswith("invalid_geometry")
    assert "0.0500 Å apart" in results[1].reason
    for i, atoms in zip((0, 2), good):
        alone = relax_batch([atoms], calc, fmax=0.05, steps=3, progress=False)[0]
        assert not results[i].failed
        assert results[i].energy == pytest.approx(alone.energy, abs=1e-5)
        np.testing.assert_allclose(results[i].atoms.positions, alone.atoms.positions, atol=1e-5)


def test_unsupported_element_is_reported_as_such():
    """An element outside the model's embedding fails that structure with reason
    unsupported_element (not invalid_geometry); the others relax."""
    from eqv2_calc import EquiformerV2Calculator

    calc = EquiformerV2Calculator(Path(__file__).parent / "data" / "eqv2_tiny_l4m2.pt")
    good = slab_systems(1)[0]
    bad = good.copy()
    bad.numbers[-1] = 92  # U: the tiny model has max_num_elements=90
    results = relax_batch([good, bad], calc, fmax=0.05, steps=2, progress=False)
    assert not results[0].failed
    assert results[1].failed
    assert results[1].reason.startswith("unsupported_element: ") and "92" in results[1].reason

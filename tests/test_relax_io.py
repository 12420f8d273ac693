"""Relaxer outputs (IS2RE/IS2RS files), metrics (OC20 definitions) and the ``eqv2 relax`` CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.optimize import LBFGS

from conftest import reference
from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import atoms_to_batch
from eqv2_calc.relax import adwt, distance_within_threshold, energy_mae, read_is2re, relax_batch
from eqv2_calc.relax import cli as relax_cli
from eqv2_calc.relax import write_is2re, write_is2rs
from eqv2_calc.potential import ASEPotential, Potential
from eqv2_calc.relax.testing import FaultyPotential, adsorbate_slab, slab_systems

DATA = Path(__file__).parent / "data"

# OC20 ADwT thresholds are 0.010, 0.011, ..., 0.499 Å: 490 values. A system with mean error d
# (not on the grid) is "within" for the thresholds above d; counted by hand below.
N_THRESHOLDS = 490


def _displaced(ref, free_shift, fixed_shift=np.zeros(3)):
    pred = ref.copy()
    fixed = np.zeros(len(ref), dtype=bool)
    fixed[ref.constraints[0].index] = True
    pos = pred.get_positions()
    pos[~fixed] += free_shift
    pos[fixed] += fixed_shift
    pred.set_positions(pos, apply_constraint=False)
    return pred


def test_adwt_matches_hand_count():
    ref = adsorbate_slab("Cu", "111", "O", (2, 2, 3))
    a1 = ref.cell[0]
    preds = [
        _displaced(ref, [0.1005, 0.0, 0.0]),  # d = 0.1005 -> within for 0.101..0.499: 399
        _displaced(ref, a1 + [0.0, 0.0205, 0.0]),  # a lattice vector + 0.0205 -> 0.021..0.499: 479
        _displaced(ref, [0.0, 0.0, 0.3005], fixed_shift=[5.0, 0, 0]),  # fixed atoms ignored: 199
    ]
    refs = [ref] * 3
    assert adwt(preds, refs) == pytest.approx((399 + 479 + 199) / (3 * N_THRESHOLDS), abs=1e-12)
    assert distance_within_threshold(preds, refs, 0.2) == pytest.approx(2 / 3)
    assert distance_within_threshold(preds, refs, 0.05) == pytest.approx(1 / 3)
    assert adwt(refs, refs) == 1.0
    # non-periodic direction (z for a slab) is not wrapped: a whole-cell z shift is an error
    z_shift = _displaced(ref, [0, 0, ref.cell[2, 2]])
    assert adwt([z_shift], [ref]) == 0.0
    with pytest.raises(InputError):
        adwt(preds[:2], refs)


def test_energy_mae():
    assert energy_mae([1.0, -2.0, 0.5], [1.5, -2.0, 0.0]) == pytest.approx(1.0 / 3)
    with pytest.raises(InputError):
        energy_mae([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def results():
    systems = slab_systems(5, rattle=0.05)
    systems[2].set_constraint()  # one without constraints
    return systems, relax_batch(systems, EMT(), progress=False)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_is2re_file(tmp_path, results, suffix):
    _, res = results
    path = tmp_path / f"is2re{suffix}"
    write_is2re(path, res)
    if suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        energies = [float(r["energy"]) for r in rows]
    else:
        energies = [r["energy"] for r in json.loads(path.read_text())]
    assert energies == [r.energy for r in res]  # repr round-trips floats exactly
    back = read_is2re(path)
    assert [b["nsteps"] for b in back] == [r.nsteps for r in res]
    assert all(b["converged"] for b in back)
    with pytest.raises(InputError, match=".csv or .json"):
        write_is2re(tmp_path / "x.txt", res)


def test_is2rs_file_readable_by_ase(tmp_path, results):
    systems, res = results
    path = tmp_path / "is2rs.extxyz"
    write_is2rs(path, res)
    frames = read(path, index=":")
    assert len(frames) == len(res)
    for s, r, f in zip(systems, res, frames):
        np.testing.assert_allclose(f.positions, r.atoms.positions, atol=1e-8)
        assert f.get_potential_energy() == pytest.approx(r.energy, abs=1e-10)
        np.testing.assert_allclose(f.get_forces(apply_constraint=False),
                                   r.atoms.get_forces(apply_constraint=False), atol=1e-8)
        assert f.info["relax_converged"] and f.info["relax_nsteps"] == r.nsteps
        # constraints survive (extxyz move_mask)
        assert _fixed_by_ase(f) == _fixed_by_ase(s)


def _fixed_by_ase(atoms) -> set[int]:
    """Atoms whose forces ASE's own constraint code zeroes completely."""
    probe = np.ones((len(atoms), 3))
    for c in atoms.constraints:
        c.adjust_forces(atoms, probe)
    return set(np.flatnonzero(~probe.any(axis=1)).tolist())


def _write_input(path: Path, n: int = 5):
    systems = slab_systems(n, rattle=0.05)
    write(path, systems, format="extxyz")
    return read(path, index=":")  # what the CLI will see


def test_cli_relax_emt_with_reference_metrics(tmp_path, capsys):
    inp = tmp_path / "in.extxyz"
    systems = _write_input(inp, 4)
    # independent reference: ASE's LBFGS, written with energies
    refs = []
    for s in systems:
        a = s.copy()
        a.calc = EMT()
        LBFGS(a, logfile=None).run(fmax=0.05, steps=300)
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces())
        refs.append(a)
    write(tmp_path / "ref.extxyz", refs, format="extxyz")
    out = tmp_path / "out"
    from eqv2_calc.cli import main

    rc = main(["relax", str(inp), "--calculator", "emt", "--out", str(out), "--no-progress",
               "--max-atoms", "30", "--save-every", "5", "--reference", str(tmp_path / "ref.extxyz")])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structures"] == 4 and summary["converged"] == 4
    assert summary["metrics"]["is2re_energy_mae_eV"] < 1e-6
    assert summary["metrics"]["is2rs_adwt"] == 1.0
    is2rs = read(out / "is2rs.extxyz", index=":")
    for ref, f in zip(refs, is2rs):
        assert f.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    traj = read(out / "trajectories" / "000003.traj", index=":")
    final = read(out / "structures" / "000003.traj")
    np.testing.assert_array_equal(traj[-1].positions, final.positions)
    assert traj[-1].get_potential_energy() == final.get_potential_energy()
    np.testing.assert_allclose(is2rs[3].positions, final.positions, atol=1e-8)  # extxyz: 8 decimals
    assert len(list((out / "structures").glob("*.traj"))) == 4


def test_cli_interrupt_keeps_results_and_resumes(tmp_path, monkeypatch, capsys):
    inp = tmp_path / "in.extxyz"
    _write_input(inp, 5)
    out = tmp_path / "out"
    from eqv2_calc.cli import main

    args = ["relax", str(inp), "--calculator", "emt", "--out", str(out), "--no-progress", "--max-atoms", "28"]

    def interrupting(_args):
        def stop(batch, call):
            if call == 25:
                raise KeyboardInterrupt
            return False
        return FaultyPotential(ASEPotential(factory=EMT), oom_when=stop)

    monkeypatch.setattr(relax_cli, "_make_potential", interrupting)
    assert main(args) == 130
    kept = sorted(p.name for p in (out / "structures").glob("*.traj"))
    assert 0 < len(kept) < 5
    assert not list((out / "structures").glob(".*tmp"))  # no half-written files
    for name in kept:  # every kept file is complete and readable
        assert read(out / "structures" / name).info["relax_converged"]
    assert not (out / "is2re.csv").exists()

    monkeypatch.undo()
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == len(kept) and summary["converged"] == 5
    resumed = read_is2re(out / "is2re.csv")

    fresh = tmp_path / "fresh"
    assert main([*args[:5], str(fresh), *args[6:]]) == 0
    direct = read_is2re(fresh / "is2re.csv")
    assert [r["energy"] for r in resumed] == pytest.approx([r["energy"] for r in direct], abs=1e-9)
    assert [r["nsteps"] for r in resumed] == [r["nsteps"] for r in direct]

    # the CLI turns errors into a message on stderr and exit status 2
    assert main([*args, "--fmax", "0.01"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_cli_with_checkpoint(tmp_path, structures):
    """`eqv2 relax --checkpoint` on the parity structures: its stored energies and forces are
    fairchem 1.10's (initial frames, tests/data/*.reference.json) and the calculator's (final
    frames), and the IS2RE table agrees with the structure files."""
    from eqv2_calc import EquiformerV2Calculator

    names = list(structures)
    inp = tmp_path / "in.extxyz"
    write(inp, list(structures.values()), format="extxyz")
    out = tmp_path / "out"
    from eqv2_calc.cli import main

    ckpt = DATA / "eqv2_tiny_l4m2.pt"
    rc = main(["relax", str(inp), "--checkpoint", str(ckpt), "--out", str(out),
               "--steps", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0
    rows = read_is2re(out / "is2re.csv")
    assert [r["index"] for r in rows] == list(range(len(names)))
    ref = reference("eqv2_tiny_l4m2")  # fairchem OCPCalculator, energies eV, raw forces eV/Å
    calc = EquiformerV2Calculator(ckpt, device="cpu")
    for row, sname in zip(rows, names):
        assert row["nsteps"] == 1 and not row["failed"], sname
        initial, final = read(out / "trajectories" / f"{row['name']}.traj", index=":")
        # the initial frame is the input, evaluated: fairchem's numbers (parity tolerance)
        np.testing.assert_array_equal(initial.positions, structures[sname].positions)
        assert row["initial_energy"] == pytest.approx(ref[sname]["energy"], abs=1e-4), sname
        assert initial.get_potential_energy() == pytest.approx(ref[sname]["energy"], abs=1e-4), sname
        np.testing.assert_allclose(initial.get_forces(apply_constraint=False), ref[sname]["forces"],
                                   rtol=0, atol=1e-4, err_msg=sname)
        # the relaxed structure: one step was taken, fixed atoms stayed, and the stored energy
        # and raw forces are the calculator's at the stored positions
        stored = read(out / "structures" / f"{row['name']}.traj")
        np.testing.assert_array_equal(stored.positions, final.positions)
        moved = np.linalg.norm(stored.positions - initial.positions, axis=1)
        fixed = sorted(_fixed_by_ase(structures[sname]))
        assert moved.max() > 1e-4 and np.all(moved[fixed] == 0.0), sname
        probe = stored.copy()
        probe.calc = calc
        assert stored.get_potential_energy() == pytest.approx(probe.get_potential_energy(), abs=1e-4), sname
        assert row["energy"] == stored.get_potential_energy()
        np.testing.assert_allclose(stored.get_forces(apply_constraint=False), probe.get_forces(apply_constraint=False),
                                   rtol=0, atol=1e-4, err_msg=sname)

    # the potential the CLI built is the documented public one
    from eqv2_calc.potential import load_potential

    pot = load_potential(ckpt, device="cpu")
    direct = relax_batch(read(inp, index=":"), pot, steps=1, progress=False)
    assert [r.energy for r in direct] == pytest.approx([r["energy"] for r in rows], abs=1e-6)
    # an EquiformerV2Calculator is used through its batched potential, with the same result
    via_calc = relax_batch(read(inp, index=":"), calc, steps=1, progress=False)
    assert [r.energy for r in via_calc] == pytest.approx([r.energy for r in direct], abs=1e-6)


def test_cli_rejects_missing_input(tmp_path, capsys):
    from eqv2_calc.cli import main

    assert main(["relax", str(tmp_path / "nope.xyz"), "--calculator", "emt", "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_relax_batch_edge_budget_requires_edge_counting():
    with pytest.raises(InputError, match="count edges"):
        relax_batch(slab_systems(1), EMT(), max_edges=1000, progress=False)


def test_edge_budget_with_eqv2_potential():
    from eqv2_calc.potential import load_potential

    pot = load_potential(DATA / "eqv2_tiny_l4m2.pt", device="cpu")
    systems = slab_systems(3)
    edges = [int(pot.count_edges(atoms_to_batch([s]))) for s in systems]
    sizes: list[int] = []

    class Spy(Potential):
        device = pot.device
        counts_edges = True

        def __call__(self, batch, keys=None):
            sizes.append(int(pot.count_edges(batch).sum()))
            return pot(batch)

        def count_edges(self, batch):
            return pot.count_edges(batch)

    budget = max(edges) + min(edges) - 1  # never room for two systems
    results = relax_batch(systems, Spy(), steps=1, max_edges=budget, progress=False)
    assert all(r.nsteps == 1 for r in results)
    assert len(sizes) == 6  # 3 systems x 2 evaluations, one system per call

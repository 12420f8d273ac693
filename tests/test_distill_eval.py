"""benchmarks/distill_eval.py: the adsorption-energy error at the teacher's geometries, checked
against a hand computation with a stand-in model whose energy errors are known per frame."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def distill_eval():
    spec = importlib.util.spec_from_file_location("distill_eval", ROOT / "benchmarks" / "distill_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frame(atoms: Atoms, system: str, frame: int, energy: float, kind: str = "path") -> Atoms:
    a = atoms.copy()
    a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((len(a), 3)))
    a.info.pop("adsorbate_info", None)  # ase.build's, not extxyz-serialisable
    a.info.update(system=system, kind=kind, frame=frame)
    return a


def _adslab(ads: str) -> Atoms:
    slab = fcc111("Cu", (2, 2, 3), vacuum=8.0)
    n = len(slab)
    add_adsorbate(slab, molecule(ads) if len(ads) > 1 else Atoms(ads), 1.8, "fcc")
    slab.set_tags([1] * n + [2] * (len(slab) - n))
    return slab


class OffsetModel:
    """predict_batch: the stored (teacher) energy plus a known error per (system, frame)."""

    def __init__(self, errors):
        self.errors = errors

    def predict_batch(self, frames, max_atoms=600):
        return [{"energy": a.get_potential_energy() + self.errors(a.info["system"], int(a.info["frame"]))}
                for a in frames]


def test_adsorption_energy_error_is_system_minus_slab_minus_gas_references(tmp_path, distill_eval):
    # model errors (eV) on the last path frames; earlier frames carry a large error that must not be used
    last_error = {"Cu-111-O": 0.30, "Cu-111-OH": -0.05, "Cu-111-clean": 0.05,
                  "gas-H2": 0.04, "gas-H2O": -0.10, "gas-CO": 0.5, "gas-N2": 0.7}
    last_frame = {"Cu-111-O": 2, "Cu-111-OH": 1, "Cu-111-clean": 3}
    model = OffsetModel(lambda s, i: last_error[s] if i == last_frame.get(s, 0) else 10.0)
    tests = [_frame(_adslab("O"), "Cu-111-O", i, -50.0 - i) for i in range(3)]
    tests += [_frame(_adslab("OH"), "Cu-111-OH", i, -55.0 - i) for i in (1, 0)]
    tests.append(_frame(_adslab("O"), "Cu-111-O", 0, -49.0, kind="initial"))
    clean = fcc111("Cu", (2, 2, 3), vacuum=8.0)
    train = [_frame(clean, "Cu-111-clean", i, -40.0 - i) for i in range(4)]
    train += [_frame(molecule(m), f"gas-{m}", 0, e) for m, e in (("H2", -6.8), ("H2O", -14.2), ("CO", -14.8), ("N2", -16.6))]
    write(tmp_path / "test_paths.extxyz", tests)
    write(tmp_path / "train.extxyz", train)

    out = distill_eval.adsorption_energy_errors(model, tmp_path)

    # by hand: eps_O = E(H2O) - E(H2), eps_H = E(H2) / 2  =>  gas error O: d(H2O) - d(H2); OH: d(H2O) - d(H2)/2
    d = last_error
    want = {"Cu-111-O": d["Cu-111-O"] - d["Cu-111-clean"] - (d["gas-H2O"] - d["gas-H2"]),
            "Cu-111-OH": d["Cu-111-OH"] - d["Cu-111-clean"] - (d["gas-H2O"] - 0.5 * d["gas-H2"])}
    got = {r["system"]: r["error"] for r in out["worst"]}
    assert got == pytest.approx(want)
    assert out["systems"] == 2 and out["mae"] == pytest.approx(np.mean(np.abs(list(want.values()))))
    assert out["within_0.1eV"] == 0.5  # O: 0.39 eV off, OH: 0.02 eV
    assert out["slab_part_mae"] == pytest.approx(0.05) and out["system_part_mae"] == pytest.approx(0.175)
    assert out["gas_molecule_errors"] == pytest.approx({m: d[f"gas-{m}"] for m in ("H2", "H2O", "CO", "N2")})

"""The `eqv2 info` / `eqv2 predict` commands."""

from __future__ import annotations

import json
import sys

import numpy as np
from ase.io import read

from conftest import DATA, reference
from eqv2_calc.cli import main


def test_info_prints_metadata(capsys):
    assert main(["info", str(DATA / "eqv2_tiny_l4m2.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cutoff"] == 12.0 and info["config"]["lmax"] == 4


def test_predict_writes_reference_energies(tmp_path):
    out = tmp_path / "pred.extxyz"
    main(["predict", str(DATA / "structures.extxyz"), "--checkpoint", str(DATA / "eqv2_tiny_l4m2.pt"),
          "--out", str(out), "--max-atoms", "30"])
    names = json.loads((DATA / "structure_names.json").read_text())
    ref = reference("eqv2_tiny_l4m2")
    for name, atoms in zip(names, read(out, ":")):
        assert abs(atoms.get_potential_energy() - ref[name]["energy"]) < 1e-4
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), ref[name]["forces"], atol=1e-4)


def test_bad_checkpoint_is_a_clean_exit(capsys):
    assert main(["info", "missing.pt"]) == 2
    assert "checkpoint file not found: missing.pt" in capsys.readouterr().err


def test_tune_allocator_is_idempotent_and_keeps_results(structures):
    """The allocator setting changes memory policy only, never numbers."""
    from conftest import calculator
    from eqv2_calc.runtime import tune_allocator

    atoms = structures["Pt100_OH"]
    before = calculator("eqv2_tiny_l4m2").predict_batch([atoms])[0]
    applied = tune_allocator()
    if sys.platform.startswith("linux"):  # glibc: the setting must actually be applied
        assert applied is True
    assert tune_allocator() is applied  # idempotent
    after = calculator("eqv2_tiny_l4m2").predict_batch([atoms])[0]
    assert after["energy"] == before["energy"]

"""Shared fixtures: the fairchem-made parity checkpoints and their structures (tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ase.io import read

DATA = Path(__file__).parent / "data"
PARITY_CHECKPOINTS = ["eqv2_tiny_l4m2", "eqv2_tiny_l6m3", "eqv2_tiny_l3m3_oc22"]


@pytest.fixture(scope="session")
def structures() -> dict:
    """Name → Atoms, the structures the reference energies/forces were computed for."""
    names = json.loads((DATA / "structure_names.json").read_text())
    return dict(zip(names, read(DATA / "structures.extxyz", ":")))


def reference(name: str) -> dict:
    """fairchem 1.10 OCPCalculator results for checkpoint ``name`` (energy eV, forces eV/Å)."""
    return json.loads((DATA / f"{name}.reference.json").read_text())


_CALCS: dict = {}


def calculator(name: str, dtype: str = "float32"):
    """Cached EquiformerV2Calculator for a parity checkpoint."""
    from eqv2_calc import EquiformerV2Calculator

    key = (name, dtype)
    if key not in _CALCS:
        _CALCS[key] = EquiformerV2Calculator(DATA / f"{name}.pt", device="cpu", dtype=dtype)
    return _CALCS[key]

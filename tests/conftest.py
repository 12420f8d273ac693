"""Shared fixtures: the fairchem-made parity checkpoints and their structures (tests/data)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

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


def markdown_table(text: str) -> list[dict[str, str]]:
    """The rows of the (first) Markdown table in ``text`` as {header: cell} dicts; every row
    must have as many cells as the header."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split("|")])
    header, rule, rows = block[0], block[1], block[2:]
    assert all(set(c) <= set("-:") and c for c in rule), f"no header rule: {rule}"
    for row in rows:
        assert len(row) == len(header), f"row {row} does not match header {header}"
    return [dict(zip(header, row)) for row in rows]


def rotation(axis, angle: float) -> np.ndarray:
    """3×3 rotation matrix about ``axis`` by ``angle`` (radians), Rodrigues' formula."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def rotated(atoms, rot: np.ndarray):
    """A copy of ``atoms`` with positions and cell rotated by ``rot``."""
    out = atoms.copy()
    out.positions = atoms.positions @ rot.T
    out.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    return out


def refvenv_python() -> Path:
    """The fairchem 1.10 reference venv's python; skips a ``reference`` test without it."""
    venv = Path(os.environ.get("EQV2_REFVENV", "/tmp/eqv2-refvenv"))
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no fairchem reference venv at {venv} (build it with ../shared/reference/setup_refvenv.sh "
                    "or set EQV2_REFVENV)")
    return python


def count_ml_rows(db: Path) -> int:
    """Finished ML relaxations committed to an AdsorbML store, read with plain sqlite (read-only,
    independent of ase.db, safe while another process writes); 0 before the tables exist."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM text_key_values WHERE key = 'stage' AND value = 'ml'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # tables not created yet
        return 0

"""Fast writer of ase.db rows (SQLite file format 9) for :mod:`adsorbml.store`.

:func:`insert_row` stores an :class:`~ase.Atoms` column for column as ``ase.db``'s own
``SQLite3Database.write`` does (``tests/test_adsorbml_store.py`` compares every column and
key table with rows written by ase.db), on an open connection and inside the caller's
transaction, without ase.db's per-row overheads: three calculator state checks with
``allclose``, an Atoms rebuild to get ``fmax``, ase's key-name check (a chemical-formula parse
per key), and a new connection per write. ``ase db`` and :mod:`ase.db` read the rows as usual.
"""

from __future__ import annotations

import numbers
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator, Calculator, all_properties
from ase.data import atomic_masses
from ase.db.core import check as _ase_check
from ase.db.core import now as _ase_now
from ase.db.core import object_to_bytes, str_represents
from ase.db.sqlite import SQLite3Database
from ase.io.jsonio import encode

__all__ = ["ASE_DB_VERSION", "delete_row", "insert_row", "key_value"]

ASE_DB_VERSION = 9  # the ase.db file format insert_row writes
_blob = SQLite3Database.blob
_USER = os.getenv("USER")

_CHECKED_KEYS: set[str] = set()
_CHECKED_STRINGS: set[str] = set()  # string values that do not read as bool/int/float (bounded cache)


def _check_kvp(kvp: Mapping[str, Any]) -> None:
    """ase.db's key-value check (:func:`ase.db.core.check`), with each key name checked once."""
    for key, value in kvp.items():
        if key not in _CHECKED_KEYS:
            _ase_check({key: 0})  # bad or reserved name -> ValueError
            _CHECKED_KEYS.add(key)
        if isinstance(value, str):
            if value in _CHECKED_STRINGS:
                continue
            for t in (bool, int, float):
                if str_represents(value, t):
                    raise ValueError(f"value {value!r} of {key!r} is a string but reads as {t.__name__}; "
                                     f"ase.db refuses it")
            if len(_CHECKED_STRINGS) < 100_000:
                _CHECKED_STRINGS.add(value)
        elif not isinstance(value, (numbers.Real, np.bool_)):
            raise ValueError(f"bad value for {key!r}: {value!r}")  # noqa: TRY004 - as ase.db


_STATE_ARRAYS = ("positions", "numbers", "initial_charges", "initial_magmoms")  # + cell, pbc: ase's all_changes


def _results_valid(calc: Any, atoms: Atoms) -> bool:
    """``not calc.check_state(atoms)`` (the calculator's results belong to these atoms), with a
    cheap exact comparison first: identical arrays are unchanged under any tolerance."""
    ca = getattr(calc, "atoms", None)
    method = getattr(type(calc), "check_state", None)
    plain = method is Calculator.check_state or (method is BaseCalculator.check_state and calc.use_cache)
    if plain and ca is not None and np.array_equal(ca.cell.array, atoms.cell.array) \
            and np.array_equal(ca.pbc, atoms.pbc):
        a1, a2 = ca.arrays, atoms.arrays
        if all((p in a1) == (p in a2) and (p not in a1 or np.array_equal(a1[p], a2[p])) for p in _STATE_ARRAYS):
            return True
    return not calc.check_state(atoms)


def _float_array(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=float)



def insert_row(con: sqlite3.Connection, atoms: Atoms, kvp: dict, data: Mapping[str, Any]) -> int:
    """Insert one ase.db row (``systems`` + ``species``/``keys``/``*_key_values``) through
    ``con``; returns its id. ``kvp`` holds plain bool/int/float/str values."""
    _check_kvp(kvp)
    calc = atoms.calc
    res: dict[str, Any] = {}
    cname = cparams = None
    if calc is not None:
        cname, cparams = calc.name.lower(), encode(calc.todict())
        if _results_valid(calc, atoms):
            res = {p: calc.results[p] for p in all_properties if calc.results.get(p) is not None}
    cell = atoms.cell.array
    constraints = atoms.constraints
    forces = _float_array(res.get("forces"))
    fmax = None
    if forces is not None and len(forces):
        f = forces.copy()
        for c in constraints:
            c.adjust_forces(atoms, f)
        fmax = float(np.sqrt((f ** 2).sum(1).max()))
    stress = _float_array(res.get("stress"))
    volume = abs(float(np.linalg.det(cell)))
    masses = atoms.get_masses() if atoms.has("masses") else None
    charges = atoms.get_initial_charges() if atoms.has("initial_charges") else None

    def arr(name: str, get: Any) -> Any:
        return _blob(None, get() if atoms.has(name) else None)

    def num(k: str) -> float | None:
        return None if res.get(k) is None else float(res[k])

    t = _ase_now()
    values = (
        uuid.uuid4().hex, t, t, _USER, _blob(None, atoms.numbers), _blob(None, np.asarray(atoms.positions, float)),
        _blob(None, np.asarray(cell, float)), int(np.dot(atoms.pbc, [1, 2, 4])),
        arr("initial_magmoms", atoms.get_initial_magnetic_moments), _blob(None, charges), _blob(None, masses),
        arr("tags", atoms.get_tags), arr("momenta", atoms.get_momenta),
        encode([c.todict() for c in constraints]) if constraints else None,
        cname, cparams, num("energy"), num("free_energy"), _blob(None, forces), _blob(None, stress),
        _blob(None, _float_array(res.get("dipole"))), _blob(None, _float_array(res.get("magmoms"))),
        num("magmom"), _blob(None, _float_array(res.get("charges"))),
        encode(kvp), object_to_bytes(dict(data)), len(atoms),
        fmax, None if stress is None else float(np.sqrt((stress ** 2).max())),
        volume if volume != 0.0 else None,
        float(masses.sum() if masses is not None else atomic_masses[atoms.numbers].sum()),
        float(charges.sum()) if charges is not None else 0.0,
    )
    cur = con.cursor()
    cur.execute(f"INSERT INTO systems VALUES (NULL, {', '.join('?' * len(values))})", values)
    rid = cur.lastrowid
    species = Counter(atoms.numbers.tolist())  # in order of first occurrence, as ase.db
    cur.executemany("INSERT INTO species VALUES (?, ?, ?)", [(z, n, rid) for z, n in species.items()])
    cur.executemany("INSERT INTO text_key_values VALUES (?, ?, ?)",
                    [(k, v, rid) for k, v in kvp.items() if isinstance(v, str)])
    cur.executemany("INSERT INTO number_key_values VALUES (?, ?, ?)",
                    [(k, float(v), rid) for k, v in kvp.items() if not isinstance(v, str)])
    cur.executemany("INSERT INTO keys VALUES (?, ?)", [(k, rid) for k in kvp])
    return rid


def delete_row(con: sqlite3.Connection, row_id: int) -> None:
    """Delete row ``row_id`` from every ase.db table (as ase.db's ``delete`` does), inside the
    caller's transaction."""
    for table in ("number_key_values", "text_key_values", "keys", "species", "systems"):
        con.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))


def key_value(v: Any) -> Any:
    """ase.db accepts bool/int/float/str key values; numpy scalars become Python ones."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, str):
        return v
    raise TypeError(f"key value {v!r} must be bool, int, float or str")

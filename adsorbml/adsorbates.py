"""Adsorbates: ASE ``Atoms`` plus the indices of the atoms that bind to the surface.

Built-in table (no downloads): the common OC20 adsorbates below, built here from textbook
bond lengths and angles (Å). Each molecule has its (first) binding atom at the origin and the
rest of the molecule pointing up (+z), so that "binding atom on the site, molecule above it"
is the zero-rotation orientation used by :mod:`adsorbml.placements`.

When fairchem-data-oc is installed, its 86-adsorbate OC20 table
(``fairchem/data/oc/databases/pkls/adsorbates.pkl``) is also available (``source="oc20"``,
or automatically for names that are not built in).

An unknown name raises :class:`~adsorbml.errors.UnknownAdsorbateError` listing the options;
an adsorbate is never chosen at random.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from ase import Atoms

from adsorbml.errors import InputError, UnknownAdsorbateError

__all__ = ["Adsorbate", "get_adsorbate", "adsorbate_from_atoms", "available_adsorbates", "BUILTIN_NAMES"]


@dataclass(frozen=True)
class Adsorbate:
    """An adsorbate.

    Attributes
    ----------
    name:
        OC20-style name, e.g. ``"*CO"``.
    atoms:
        The molecule (positions in Å, no cell, ``pbc=False``). Treat as read-only; use
        :meth:`copy_atoms` to get a modifiable copy.
    binding_indices:
        Indices into ``atoms`` of the atom(s) that bind to the surface (≥ 1).
    """

    name: str
    atoms: Atoms
    binding_indices: tuple[int, ...]

    def copy_atoms(self) -> Atoms:
        """A fresh copy of the molecule."""
        return self.atoms.copy()

    def __len__(self) -> int:
        return len(self.atoms)


def _sph(r: float, theta_deg: float, phi_deg: float = 0.0) -> tuple[float, float, float]:
    """Point at distance ``r`` (Å), polar angle ``theta`` from +z and azimuth ``phi``."""
    t, p = math.radians(theta_deg), math.radians(phi_deg)
    return (r * math.sin(t) * math.cos(p), r * math.sin(t) * math.sin(p), r * math.cos(t))


def _hydride(center: str, n_h: int, r: float) -> tuple[str, list[tuple[float, float, float]]]:
    """X + n H with the surface bond along −z and tetrahedral-like H directions above X."""
    if n_h == 0:
        return center, [(0.0, 0.0, 0.0)]
    if n_h == 1:
        return center + "H", [(0.0, 0.0, 0.0), (0.0, 0.0, r)]
    theta = 180.0 - 109.47  # H–X–(surface) angle tetrahedral: H at 70.5° from +z
    if n_h == 2:
        theta = 54.75  # H–X–H ≈ 109.5° in a plane, both above X
    pos = [(0.0, 0.0, 0.0)] + [_sph(r, theta, 360.0 * i / n_h) for i in range(n_h)]
    return center + "H" * n_h, pos


def _builtin_geometries() -> dict[str, tuple[str, list[tuple[float, float, float]]]]:
    g: dict[str, tuple[str, list[tuple[float, float, float]]]] = {}
    for name in ("H", "O", "C", "N"):
        g["*" + name] = (name, [(0.0, 0.0, 0.0)])
    g["*OH"] = ("OH", [(0.0, 0.0, 0.0), (0.0, 0.0, 0.97)])
    g["*OH2"] = ("OH2", [(0.0, 0.0, 0.0), _sph(0.96, 52.25, 0.0), _sph(0.96, 52.25, 180.0)])  # H–O–H 104.5°
    for n_h, name in ((1, "*CH"), (2, "*CH2"), (3, "*CH3")):
        g[name] = _hydride("C", n_h, 1.09)
    for n_h, name in ((1, "*NH"), (2, "*NH2"), (3, "*NH3")):
        g[name] = _hydride("N", n_h, 1.02)
    g["*CO"] = ("CO", [(0.0, 0.0, 0.0), (0.0, 0.0, 1.15)])
    g["*NO"] = ("NO", [(0.0, 0.0, 0.0), (0.0, 0.0, 1.17)])
    o = (0.0, 0.0, 1.33)  # C–O single-ish bond; C–O–H 110°
    h = tuple(a + b for a, b in zip(o, _sph(0.97, 70.0)))
    g["*COH"] = ("COH", [(0.0, 0.0, 0.0), o, h])
    g["*CHO"] = ("CHO", [(0.0, 0.0, 0.0), _sph(1.11, 60.0, 180.0), _sph(1.22, 60.0, 0.0)])  # sp2 C
    o2 = (0.0, 0.0, 1.45)  # O–O
    g["*OOH"] = ("OOH", [(0.0, 0.0, 0.0), o2, tuple(a + b for a, b in zip(o2, _sph(0.97, 75.0)))])
    return g


_BUILTIN = _builtin_geometries()
BUILTIN_NAMES: tuple[str, ...] = tuple(_BUILTIN)


def _normalize(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"adsorbate name must be a non-empty string, got {name!r}")
    name = name.strip()
    return name if name.startswith("*") else "*" + name


def _oc20_table_path() -> Path | None:
    try:
        spec = importlib.util.find_spec("fairchem.data.oc")  # imports parents only, not oc/__init__
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "databases" / "pkls" / "adsorbates.pkl"
        if p.exists():
            return p
    return None


@lru_cache(maxsize=1)
def _oc20_table() -> dict[str, Adsorbate]:
    """fairchem-data-oc's 86 adsorbates keyed by SMILES-like name; {} if not installed."""
    path = _oc20_table_path()
    if path is None:
        return {}
    with open(path, "rb") as f:
        raw = pickle.load(f)  # noqa: S301 — file shipped inside the installed wheel
    table = {}
    for entry in raw.values():
        atoms, smiles, binding = entry[0], entry[1], entry[2]
        a = Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions())
        table[str(smiles)] = Adsorbate(str(smiles), a, tuple(int(i) for i in np.atleast_1d(binding)))
    return table


def available_adsorbates(source: Literal["auto", "builtin", "oc20"] = "auto") -> list[str]:
    """Names accepted by :func:`get_adsorbate` for ``source``."""
    if source == "builtin":
        return list(BUILTIN_NAMES)
    if source == "oc20":
        return list(_oc20_table())
    if source == "auto":
        return list(BUILTIN_NAMES) + [n for n in _oc20_table() if n not in _BUILTIN]
    raise InputError(f"source must be 'auto', 'builtin' or 'oc20', got {source!r}")


def get_adsorbate(name: str, source: Literal["auto", "builtin", "oc20"] = "auto") -> Adsorbate:
    """Look an adsorbate up by name (``"*CO"``; the leading ``*`` is optional).

    ``source="auto"`` prefers the built-in table and falls back to fairchem-data-oc's table
    if installed; ``"oc20"`` uses only the latter.

    Raises
    ------
    UnknownAdsorbateError
        The name is in no available table; the message lists the valid names.
    """
    key = _normalize(name)
    if source in ("auto", "builtin") and key in _BUILTIN:
        symbols, pos = _BUILTIN[key]
        return Adsorbate(key, Atoms(symbols, positions=pos), (0,))
    if source in ("auto", "oc20"):
        table = _oc20_table()
        if key in table:
            a = table[key]
            return Adsorbate(a.name, a.atoms.copy(), a.binding_indices)
        if source == "oc20" and not table:
            raise UnknownAdsorbateError(
                "the OC20 adsorbate table needs fairchem-data-oc (pip install fairchem-data-oc); "
                f"built-in names: {', '.join(BUILTIN_NAMES)}"
            )
    names = available_adsorbates(source)
    hint = "" if _oc20_table() else " (install fairchem-data-oc for the 86-adsorbate OC20 table)"
    raise UnknownAdsorbateError(f"unknown adsorbate {name!r}; available: {', '.join(names)}{hint}")


def adsorbate_from_atoms(atoms: Atoms, binding_indices: Sequence[int], name: str | None = None) -> Adsorbate:
    """Wrap a user molecule. ``binding_indices`` is required (never guessed)."""
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise InputError("adsorbate must be a non-empty ase.Atoms")
    idx = tuple(int(i) for i in np.atleast_1d(binding_indices))
    if not idx:
        raise InputError("binding_indices must name at least one atom of the adsorbate")
    bad = [i for i in idx if not 0 <= i < len(atoms)]
    if bad:
        raise InputError(f"binding_indices {bad} out of range for an adsorbate of {len(atoms)} atoms")
    if not np.all(np.isfinite(atoms.positions)):
        raise InputError("adsorbate positions must be finite")
    a = Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions())
    return Adsorbate(name or "*" + atoms.get_chemical_formula(mode="hill"), a, idx)


def as_adsorbate(ads: "str | Adsorbate") -> Adsorbate:
    """Accept a name or an :class:`Adsorbate`."""
    if isinstance(ads, Adsorbate):
        return ads
    if isinstance(ads, str):
        return get_adsorbate(ads)
    raise InputError(
        f"adsorbate must be a name like '*CO' or an Adsorbate (adsorbate_from_atoms), got {type(ads).__name__}"
    )

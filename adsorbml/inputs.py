"""Slabs with the OC20 conventions, from a structure or from a bulk + Miller index.

OC20 conventions produced here:

* surface normal along +z (cell vectors a, b in the xy plane), adsorbates go on the top face;
* tags: 0 = subsurface (fixed), 1 = surface, 2 = adsorbate (set later by placements);
* ``FixAtoms`` on every tag-0 atom (any other constraint on the input is replaced);
* in-plane tiling so that |a| ≥ ``min_ab`` and |b| ≥ ``min_ab`` (8 Å): na = ⌈8/|a|⌉, nb = ⌈8/|b|⌉.

Tagging rule (OC20, fairchem-data-oc): tag 1 if the atom lies within ``surface_depth``
(2 Å) of the topmost atom along z; for slabs built from a bulk, also tag 1 if the atom is
above the slab's centre of mass and has fewer neighbours than the least-coordinated atom of
the same element in the bulk. (OC20 counts neighbours with a weighted Voronoi CN; here a
neighbour is any atom closer than 1.2 × (r_cov,i + r_cov,j) with ASE covalent radii, which
counts the first shell of close-packed metals exactly.)

Bulk → slab uses pymatgen (``pip install pymatgen``) with the OC20 settings:
conventional standard cell (``SpacegroupAnalyzer(symprec=0.1)``),
``SlabGenerator(min_slab_size=7, min_vacuum_size=20, lll_reduce=False, center_slab=True,
primitive=True, max_normal_search=1)``, ``get_slabs(tol=0.3, max_broken_bonds=0,
symmetrize=False)``. Only the top face of each termination is used (OC20 also adds the
flipped bottom face of slabs without a z-mirror).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms
from ase.data import covalent_radii
from ase.io import read

from adsorbml.errors import InputError

__all__ = [
    "SlabRecord",
    "prepare_slab",
    "load_slab",
    "slabs_from_bulk",
    "tag_slab",
    "tile_slab",
    "orient_slab",
    "MIN_AB",
    "SURFACE_DEPTH",
]

MIN_AB = 8.0  # Å, minimum in-plane cell length after tiling
SURFACE_DEPTH = 2.0  # Å, atoms this close to the top atom (along z) are surface atoms
CN_MULTIPLIER = 1.2  # neighbour if d < 1.2 (r_cov,i + r_cov,j)


@dataclass
class SlabRecord:
    """A prepared slab.

    Attributes
    ----------
    slab_id:
        Identifier, e.g. ``"Pt_111_0.167"`` (formula, Miller index, shift) or the file stem.
    atoms:
        The slab (tags 0/1, FixAtoms on tag 0, normal along +z, positions in Å).
    millers, shift:
        Miller index and pymatgen termination shift, when built from a bulk.
    info:
        Provenance (source file, bulk formula, tiling, ...), JSON-serialisable.
    """

    slab_id: str
    atoms: Atoms
    millers: tuple[int, int, int] | None = None
    shift: float | None = None
    info: dict = field(default_factory=dict)


def _check_geometry(atoms: Atoms) -> None:
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise InputError("slab must be a non-empty ase.Atoms")
    if not np.all(np.isfinite(atoms.positions)):
        raise InputError("slab positions must be finite")
    cell = np.asarray(atoms.cell)
    if abs(np.linalg.det(cell)) < 1e-6:
        raise InputError("slab needs a full 3-D cell (a, b in-plane, c across the vacuum)")
    if abs(cell[0, 2]) > 1e-4 or abs(cell[1, 2]) > 1e-4:
        raise InputError(
            "slab cell vectors a and b must lie in the xy plane (surface normal along z); "
            f"got a_z={cell[0, 2]:.4f}, b_z={cell[1, 2]:.4f} Å"
        )
    if not (atoms.pbc[0] and atoms.pbc[1]):
        raise InputError(f"slab must be periodic along a and b, got pbc={atoms.pbc.tolist()}")
    cz = cell[2, 2]
    z = atoms.positions[:, 2]
    vacuum = abs(cz) - (z.max() - z.min())
    if vacuum < 6.0:
        raise InputError(f"slab has only {vacuum:.1f} Å of vacuum along z; need at least 6 Å (OC20 uses 20)")


def _coordination(atoms: Atoms, multiplier: float = CN_MULTIPLIER) -> np.ndarray:
    from ase.neighborlist import neighbor_list

    radii = covalent_radii[atoms.numbers] * multiplier
    i, _ = neighbor_list("ij", atoms, radii.tolist(), self_interaction=False)
    return np.bincount(i, minlength=len(atoms))


def tag_slab(atoms: Atoms, surface_depth: float = SURFACE_DEPTH, bulk: Atoms | None = None) -> np.ndarray:
    """OC20 tags (0 subsurface / 1 surface) for a slab whose top face points along +z.

    Returns an int array of shape (n_atoms,). ``bulk`` enables the under-coordination rule.
    """
    z = atoms.positions[:, 2]
    tags = (z >= z.max() - surface_depth).astype(int)
    if bulk is not None:
        bulk_cn = _coordination(bulk)
        min_cn = {int(Z): int(bulk_cn[bulk.numbers == Z].min()) for Z in np.unique(bulk.numbers)}
        cn = _coordination(atoms)
        com_z = atoms.get_center_of_mass()[2]
        for i, Z in enumerate(atoms.numbers):
            if z[i] > com_z and int(Z) in min_cn and cn[i] < min_cn[int(Z)]:
                tags[i] = 1
    return tags


def tile_slab(atoms: Atoms, min_ab: float = MIN_AB) -> tuple[Atoms, tuple[int, int]]:
    """Repeat in-plane so that |a|, |b| ≥ ``min_ab`` Å. Returns (tiled atoms, (na, nb))."""
    la, lb = np.linalg.norm(atoms.cell[0]), np.linalg.norm(atoms.cell[1])
    na, nb = max(1, math.ceil(min_ab / la - 1e-9)), max(1, math.ceil(min_ab / lb - 1e-9))
    return (atoms.repeat((na, nb, 1)) if (na, nb) != (1, 1) else atoms.copy()), (na, nb)


def orient_slab(atoms: Atoms) -> Atoms:
    """Rotate a slab so that a ∥ x and a, b span the xy plane, with c ⟂ surface (along +z).

    c is replaced by its component along the surface normal (``c·n̂ n̂``), which keeps every
    atom's fractional c coordinate and the in-plane periodicity; the vacuum side of the
    original c stays at +z. Returns a new Atoms (positions wrapped in-plane).
    """
    cell = np.asarray(atoms.cell, dtype=float)
    a, b, c = cell
    n = np.cross(a, b)
    n /= np.linalg.norm(n)
    if np.dot(c, n) < 0:
        n = -n
    x = a / np.linalg.norm(a)
    y = np.cross(n, x)
    rot = np.stack([x, y, n])  # rows: new axes in old coordinates
    new = atoms.copy()
    new.positions = atoms.positions @ rot.T
    new.cell = np.stack([rot @ a, rot @ b, np.array([0.0, 0.0, float(np.dot(c, n))])])
    new.cell[0, 1:] = 0.0
    new.cell[1, 2] = 0.0
    new.wrap(pbc=[True, True, False])
    return new


def _looks_oc20(tags: np.ndarray) -> bool:
    s = set(np.unique(tags).tolist())
    return s <= {0, 1} and 1 in s


def prepare_slab(
    atoms: Atoms,
    slab_id: str = "slab",
    *,
    retag: bool | None = None,
    min_ab: float = MIN_AB,
    surface_depth: float = SURFACE_DEPTH,
    bulk: Atoms | None = None,
) -> SlabRecord:
    """Validate a slab and bring it to the OC20 conventions (tags, FixAtoms, tiling).

    Parameters
    ----------
    atoms:
        The clean slab, top face along +z (not modified).
    retag:
        ``None`` (default): keep the tags if they already are OC20 tags (only 0 and 1, with
        at least one 1), otherwise recompute them (e.g. ASE ``fcc111`` layer tags 1..N or
        all-zero tags from a file). ``True``: always recompute. ``False``: keep; error if
        they are not OC20 tags.
    min_ab:
        Tile in-plane to at least this length (Å); 0 disables tiling.
    """
    _check_geometry(atoms)
    tag_set = set(np.unique(atoms.get_tags()).tolist())
    if tag_set <= {0, 1, 2} and {0, 2} <= tag_set:  # OC20 adslab (ASE layer tags are 1..N)
        raise InputError("slab contains tag-2 (adsorbate) atoms; pass the clean slab")
    a = atoms.copy()
    a.calc = None
    a.info = {k: v for k, v in a.info.items() if np.isscalar(v)}  # e.g. ASE adsorbate_info breaks extxyz
    tags = a.get_tags()
    if retag is False and not _looks_oc20(tags):
        raise InputError(f"slab tags {sorted(set(tags.tolist()))} are not OC20 tags (0 = subsurface, 1 = surface)")
    if retag or not _looks_oc20(tags):
        tags = tag_slab(a, surface_depth, bulk)
    a.set_tags(tags)
    a.set_constraint(FixAtoms(mask=tags == 0))
    ntile = (1, 1)
    if min_ab > 0:
        a, ntile = tile_slab(a, min_ab)
    return SlabRecord(slab_id, a, info={"tiling": list(ntile)})


def load_slab(source: "str | os.PathLike | Atoms", slab_id: str | None = None, **kwargs) -> SlabRecord:
    """A slab from an ``Atoms`` or from any file ``ase.io.read`` understands (last frame)."""
    if isinstance(source, Atoms):
        return prepare_slab(source, slab_id or source.get_chemical_formula(), **kwargs)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such slab file: {path}")
    atoms = read(path, index=-1)
    rec = prepare_slab(atoms, slab_id or os.path.splitext(os.path.basename(path))[0], **kwargs)
    rec.info["source"] = path
    return rec


def slabs_from_bulk(
    bulk: "Atoms | str | os.PathLike",
    miller: Sequence[int],
    *,
    min_slab_size: float = 7.0,
    min_vacuum_size: float = 20.0,
    min_ab: float = MIN_AB,
    max_slabs: int | None = None,
) -> list[SlabRecord]:
    """All terminations of the ``miller`` surface of ``bulk`` with the OC20 settings.

    Parameters
    ----------
    bulk:
        Bulk crystal (Atoms or a file), periodic in 3-D.
    miller:
        Miller index (h, k, l) of the conventional standard cell, not all zero.
    min_slab_size, min_vacuum_size:
        Å (OC20: 7 and 20).
    max_slabs:
        Keep at most this many terminations (in pymatgen's order).

    Returns
    -------
    list[SlabRecord]
        ``slab_id`` = ``"<formula>_<hkl>_<shift>"``; each slab tagged, fixed and tiled.
    """
    try:
        from pymatgen.core.surface import SlabGenerator
        from pymatgen.io.ase import AseAtomsAdaptor
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("slabs_from_bulk needs pymatgen: pip install 'eqv2-calc[adsorbml]'") from e

    if not isinstance(bulk, Atoms):
        bulk = read(os.fspath(bulk), index=-1)
    if len(bulk) == 0 or not all(bulk.pbc) or abs(bulk.cell.volume) < 1e-6:
        raise InputError("bulk must be a non-empty, 3-D periodic ase.Atoms with a cell")
    try:
        hkl = tuple(int(x) for x in miller)
    except (TypeError, ValueError):
        raise InputError(f"miller index must be three integers, got {miller!r}") from None
    if len(hkl) != 3 or hkl == (0, 0, 0) or any(float(x) != int(x) for x in miller):
        raise InputError(f"miller index must be three integers, not all zero, got {miller!r}")

    structure = AseAtomsAdaptor.get_structure(bulk)
    conv = SpacegroupAnalyzer(structure, symprec=0.1).get_conventional_standard_structure()
    gen = SlabGenerator(
        conv, hkl, min_slab_size, min_vacuum_size,
        lll_reduce=False, center_slab=True, primitive=True, max_normal_search=1,
    )
    slabs = gen.get_slabs(tol=0.3, max_broken_bonds=0, symmetrize=False)
    if not slabs:
        raise InputError(f"pymatgen found no slab for Miller index {hkl} without breaking bonds")
    if max_slabs is not None:
        slabs = slabs[:max_slabs]
    conv_atoms = AseAtomsAdaptor.get_atoms(conv)
    formula = bulk.get_chemical_formula(mode="metal", empirical=True)
    records = []
    for s in slabs:
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms = orient_slab(Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True))
        sid = f"{formula}_{''.join(str(x) for x in hkl)}_{float(s.shift):.3f}"
        rec = prepare_slab(atoms, sid, retag=True, min_ab=min_ab, bulk=conv_atoms)
        rec.millers, rec.shift = hkl, float(s.shift)
        rec.info.update({"bulk_formula": formula, "millers": list(hkl), "shift": float(s.shift)})
        records.append(rec)
    return records

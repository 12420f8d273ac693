"""Adsorbate placements on a slab: sites, orientations and a closed-form height, seeded.

Conventions: the slab's top face points along +z with a, b in the xy plane (as produced by
:mod:`adsorbml.inputs`); slab atoms keep their tags (0/1) and ``FixAtoms``; adsorbate atoms
are appended with tag 2. Lengths in Å.

Sites
    * **heuristic** (config ids ``heur0, heur1, ...``): pymatgen ``AdsorbateSiteFinder`` ontop,
      bridge and hollow sites of the tag-1 atoms, symmetry-reduced
      (``find_adsorption_sites(distance=0, symm_reduce=0.01, near_reduce=0.01,
      no_obtuse_hollow=True)``), every site used ``augmentations`` times with different
      orientations.
    * **random** (``rand0, rand1, ...``): points uniform *in area* over the surface: (u, v)
      uniform in the in-plane unit cell, height interpolated on the Delaunay triangulation of
      the tag-1 atoms (periodically tiled). (fairchem-data-oc draws the same number of points
      per triangle, which over-samples small triangles.)

Orientation (``rotation="tilt"``, the OC20 heuristic mode): a rotation about z by
U(0°, 360°) about the binding atom, then a tilt of the molecule's +z axis to a direction
uniform on the spherical cap within ``max_tilt`` (20°) of +z. ``rotation="full"``: uniform
random rotation (Haar measure on SO(3): a normalised Gaussian quaternion). Both are built
with ``scipy.spatial.transform.Rotation`` (rotation vectors; ``from_quat``, scalar-last).
Single atoms are not rotated. For multidentate adsorbates the anchoring binding atom is
drawn uniformly from the binding indices.

Height (closed form): with the binding atom at (x_site, y_site, h) and adsorbate atom a at
offset u_a from it, slab atom s (any in-plane periodic image) is at least
R_as = r_cov,a + r_cov,s + gap away iff

    d_xy² + (z_s − h − u_a,z)² ≥ R_as²,

which for d_xy < R_as means h ≥ z_s − u_a,z + √(R_as² − d_xy²). The smallest such h over all
pairs is used (the placement touches the slab at exactly R_as), so no adsorbate atom is
closer than the covalent radii sum + gap to any slab atom. If no pair constrains h, the
binding atom is put at the site's height. Covalent radii: ``ase.data.covalent_radii``.

Determinism: every random choice comes from a ``numpy.random.Generator`` seeded from
``seed`` (never the global RNG), so equal inputs and seed give identical placements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from ase import Atoms
from ase.data import covalent_radii

from adsorbml.adsorbates import Adsorbate, as_adsorbate
from adsorbml.errors import InputError, PlacementError
from adsorbml.inputs import SlabRecord

__all__ = [
    "Placement",
    "generate_placements",
    "heuristic_sites",
    "random_sites",
    "random_rotation",
    "solve_height",
    "place_adsorbate",
    "DEFAULT_GAP",
    "MAX_TILT_DEG",
]

DEFAULT_GAP = 0.1  # Å, interstitial gap added to the covalent radii sum (fairchem-data-oc default)
MAX_TILT_DEG = 20.0  # degrees, cone of the "tilt" orientation mode (π/9 in fairchem-data-oc)

_IMAGES = np.array([(i, j, 0) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=float)  # [9, 3]


@dataclass
class Placement:
    """One initial adsorbate+slab structure.

    Attributes
    ----------
    config_id:
        ``"heur<i>"`` or ``"rand<i>"`` (OC20-Dense naming).
    atoms:
        Adslab: slab atoms first (tags 0/1, FixAtoms kept), adsorbate atoms last (tag 2).
    site:
        Cartesian site (Å), shape (3,); the binding atom sits at (site_x, site_y, h).
    site_kind:
        ``"ontop"``, ``"bridge"``, ``"hollow"`` or ``"random"``.
    binding_index:
        Index in ``atoms`` of the anchoring binding atom.
    rotation:
        3×3 rotation applied to the adsorbate (row-vector convention: ``x_new = x @ R.T``).
    """

    config_id: str
    atoms: Atoms
    site: np.ndarray
    site_kind: str
    binding_index: int
    rotation: np.ndarray = field(repr=False)

    def metadata(self) -> dict:
        """JSON-serialisable description (for stores and files)."""
        return {
            "config_id": self.config_id,
            "site": [float(x) for x in self.site],
            "site_kind": self.site_kind,
            "binding_index": int(self.binding_index),
            "rotation": np.asarray(self.rotation, dtype=float).round(12).tolist(),
        }


# --------------------------------------------------------------------------- sites


def _check_slab(slab: Atoms) -> np.ndarray:
    if not isinstance(slab, Atoms) or len(slab) == 0:
        raise InputError("slab must be a non-empty ase.Atoms (see adsorbml.inputs.prepare_slab)")
    cell = np.asarray(slab.cell)
    if abs(cell[0, 2]) > 1e-4 or abs(cell[1, 2]) > 1e-4 or abs(np.linalg.det(cell)) < 1e-9:
        raise InputError("slab cell vectors a, b must lie in the xy plane (use adsorbml.inputs.prepare_slab)")
    surf = np.flatnonzero(slab.get_tags() == 1)
    if surf.size == 0:
        raise PlacementError("slab has no tag-1 (surface) atoms; prepare it with adsorbml.inputs.prepare_slab")
    return surf


def _untile(slab: Atoms, tiling: tuple[int, int]) -> Atoms:
    """The repeat unit of a slab made by ``slab.repeat((na, nb, 1))``."""
    na, nb = tiling
    if (na, nb) == (1, 1):
        return slab
    cell = np.asarray(slab.cell).copy()
    frac = slab.get_scaled_positions(wrap=True)
    # tile index of each atom; the 1e-6 tolerance puts atoms at frac = 1/na − ε (rounding in
    # pymatgen-made slabs) into the next tile, so every tile gets the same count
    tile_a = np.floor(frac[:, 0] * na + 1e-6).astype(int) % na
    tile_b = np.floor(frac[:, 1] * nb + 1e-6).astype(int) % nb
    keep = (tile_a == 0) & (tile_b == 0)
    if keep.sum() * na * nb != len(slab):
        raise InputError(f"slab is not a {na}×{nb} in-plane repetition; pass tiling=(1, 1)")
    unit = slab[keep]
    cell[0] /= na
    cell[1] /= nb
    unit.set_cell(cell)
    return unit


def heuristic_sites(
    slab: Atoms, symm_reduce: float = 1e-2, near_reduce: float = 1e-2, tiling: tuple[int, int] = (1, 1)
) -> list[tuple[str, np.ndarray]]:
    """Symmetry-distinct ontop/bridge/hollow sites of the tag-1 atoms (pymatgen).

    ``tiling`` = (na, nb) when ``slab`` is a repetition of a smaller cell (as recorded by
    :func:`adsorbml.inputs.prepare_slab` in ``info["tiling"]``): sites are then searched in
    the repeat unit, which gives the same distinct sites much faster.

    Returns ``[(kind, xyz[3]), ...]`` in the order ontop, bridge, hollow.
    """
    _check_slab(slab)
    slab = _untile(slab, tuple(tiling))
    surf = _check_slab(slab)
    try:
        from pymatgen.core.adsorption import AdsorbateSiteFinder
        from pymatgen.io.ase import AseAtomsAdaptor
    except ImportError as e:  # pragma: no cover
        raise ImportError("heuristic sites need pymatgen: pip install 'eqv2-calc[adsorbml]'") from e
    plain = Atoms(numbers=slab.numbers, positions=slab.positions, cell=slab.cell, pbc=True)
    structure = AseAtomsAdaptor.get_structure(plain)
    is_surf = np.zeros(len(slab), bool)
    is_surf[surf] = True
    structure.add_site_property("surface_properties", ["surface" if s else "subsurface" for s in is_surf])
    finder = AdsorbateSiteFinder(structure, mi_vec=[0.0, 0.0, 1.0])
    found = finder.find_adsorption_sites(
        distance=0.0, put_inside=True, symm_reduce=symm_reduce, near_reduce=near_reduce,
        positions=("ontop", "bridge", "hollow"), no_obtuse_hollow=True,
    )
    return [(kind, np.asarray(xyz, dtype=float)) for kind in ("ontop", "bridge", "hollow") for xyz in found.get(kind, [])]


def random_sites(slab: Atoms, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sites uniform in area over the periodic surface; shape (n, 3), Å.

    z is interpolated linearly on the Delaunay triangulation of the tag-1 atoms' xy positions
    (tiled 3×3 so that the triangulation covers the cell periodically).
    """
    from scipy.spatial import Delaunay

    surf = _check_slab(slab)
    if n < 0:
        raise InputError(f"number of random sites must be >= 0, got {n}")
    cell = np.asarray(slab.cell)
    uv = rng.random((n, 2))
    xy = uv @ cell[:2, :2]  # [n, 2]
    pts = slab.positions[surf]  # [M, 3]
    tiled = (pts[None, :, :] + (_IMAGES @ cell)[:, None, :]).reshape(-1, 3)  # [9M, 3]
    if len(surf) == 1 or np.linalg.matrix_rank(tiled[:, :2] - tiled[0, :2]) < 2:
        return np.column_stack([xy, np.full(n, pts[:, 2].max())])
    tri = Delaunay(tiled[:, :2])
    corners = tiled[tri.simplices]  # [T, 3, 3]
    # barycentric coordinates of every site in every triangle (scipy's find_simplex is very
    # slow on the degenerate, co-circular triangulations of perfect lattices)
    v0 = corners[:, 1, :2] - corners[:, 0, :2]  # [T, 2]
    v1 = corners[:, 2, :2] - corners[:, 0, :2]
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]  # [T]
    good = np.abs(det) > 1e-12
    d = xy[:, None, :] - corners[None, :, 0, :2]  # [n, T, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        l1 = (d[..., 0] * v1[:, 1] - d[..., 1] * v1[:, 0]) / det  # [n, T]
        l2 = (v0[:, 0] * d[..., 1] - v0[:, 1] * d[..., 0]) / det
    l0 = 1.0 - l1 - l2
    inside = good & (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)  # [n, T]
    t = np.argmax(inside, axis=1)  # first containing triangle
    rows = np.arange(n)
    z = l0[rows, t] * corners[t, 0, 2] + l1[rows, t] * corners[t, 1, 2] + l2[rows, t] * corners[t, 2, 2]
    missing = ~inside[rows, t]
    for i in np.flatnonzero(missing):  # numerically outside every triangle: nearest atom's height
        z[i] = tiled[np.argmin(np.linalg.norm(tiled[:, :2] - xy[i], axis=1)), 2]
    return np.column_stack([xy, z])


# --------------------------------------------------------------------------- orientation


def random_rotation(
    rng: np.random.Generator, mode: Literal["tilt", "full"] = "tilt", max_tilt_deg: float = MAX_TILT_DEG
) -> np.ndarray:
    """A random 3×3 rotation matrix (column-vector convention: ``v_new = R @ v``).

    ``"tilt"``: R = T·Rz(φ), φ ~ U(0, 2π), T moves +z to a direction uniform on the cap of
    half-angle ``max_tilt_deg`` (cos θ ~ U(cos θ_max, 1), azimuth ~ U(0, 2π)).
    ``"full"``: uniform on SO(3).
    """
    from scipy.spatial.transform import Rotation

    if mode == "full":
        w, x, y, z = rng.standard_normal(4)  # drawn as (w, x, y, z); scipy wants scalar-last
        return Rotation.from_quat([x, y, z, w]).as_matrix()  # from_quat normalises
    if mode != "tilt":
        raise InputError(f"rotation mode must be 'tilt' or 'full', got {mode!r}")
    if not 0 <= max_tilt_deg <= 180:
        raise InputError(f"max_tilt_deg must be in [0, 180], got {max_tilt_deg}")
    phi = rng.uniform(0.0, 2 * math.pi)
    cos_t = rng.uniform(math.cos(math.radians(max_tilt_deg)), 1.0)
    az = rng.uniform(0.0, 2 * math.pi)
    theta = math.acos(min(1.0, cos_t))
    axis = np.array([-math.sin(az), math.cos(az), 0.0])  # unit vector z × target direction
    tilt = Rotation.from_rotvec(theta * axis)
    return (tilt * Rotation.from_rotvec([0.0, 0.0, phi])).as_matrix()  # Rz(φ) first, then T


# --------------------------------------------------------------------------- height


def solve_height(
    slab: Atoms, offsets: np.ndarray, numbers: np.ndarray, site_xy: np.ndarray, gap: float = DEFAULT_GAP
) -> float | None:
    """Lowest z of the binding atom so that every adsorbate atom keeps its distance.

    Parameters
    ----------
    slab:
        The slab (periodic in-plane).
    offsets:
        Adsorbate atom positions relative to the binding atom, shape (n, 3), Å.
    numbers:
        Adsorbate atomic numbers, shape (n,).
    site_xy:
        In-plane position of the binding atom, shape (2,), Å.
    gap:
        Extra clearance added to r_cov,a + r_cov,s (Å, ≥ 0).

    Returns
    -------
    float or None
        The height (absolute z, Å), or None if no slab atom constrains it.
    """
    cell = np.asarray(slab.cell)
    ab = cell[:2, :2]  # in-plane lattice, rows a, b
    inv = np.linalg.inv(ab)
    slab_pos = slab.positions.copy()
    slab_pos[:, :2] = ((slab_pos[:, :2] @ inv) % 1.0) @ ab  # wrap into the cell
    images = (slab_pos[None, :, :] + (_IMAGES @ cell)[:, None, :]).reshape(-1, 3)  # [9N, 3]
    r_slab = np.tile(covalent_radii[slab.numbers], len(_IMAGES))  # [9N]
    ads_xy = site_xy[None, :] + offsets[:, :2]  # [n, 2]
    ads_xy = ((ads_xy @ inv) % 1.0) @ ab  # each atom wrapped; images of the slab cover its neighbours
    R = covalent_radii[numbers][:, None] + r_slab[None, :] + gap  # [n, 9N]
    dxy2 = ((ads_xy[:, None, :] - images[None, :, :2]) ** 2).sum(-1)  # [n, 9N]
    mask = dxy2 < R**2
    if not mask.any():
        return None
    h = images[None, :, 2] - offsets[:, 2:3] + np.sqrt(np.where(mask, R**2 - dxy2, 0.0))
    return float(h[mask].max())


def place_adsorbate(
    slab: Atoms,
    adsorbate: Adsorbate,
    site: np.ndarray,
    rotation: np.ndarray,
    binding: int,
    gap: float = DEFAULT_GAP,
) -> Atoms:
    """Adslab with ``adsorbate`` rotated by ``rotation`` about atom ``binding`` on ``site``.

    Returns slab atoms followed by the adsorbate (tag 2); slab constraints are kept.
    """
    ads = adsorbate.atoms
    offsets = (ads.positions - ads.positions[binding]) @ np.asarray(rotation).T  # [n, 3]
    site = np.asarray(site, dtype=float)
    h = solve_height(slab, offsets, ads.numbers, site[:2], gap)
    if h is None:
        h = float(site[2])
    pos = offsets + np.array([site[0], site[1], h])
    adslab = slab.copy()
    adslab.calc = None
    mol = Atoms(numbers=ads.numbers, positions=pos, tags=np.full(len(ads), 2), cell=slab.cell, pbc=slab.pbc)
    adslab.extend(mol)
    return adslab


# --------------------------------------------------------------------------- driver


def generate_placements(
    slab: "Atoms | SlabRecord",
    adsorbate: "str | Adsorbate",
    *,
    num_random: int = 100,
    heuristic: bool = True,
    augmentations: int = 1,
    rotation: Literal["tilt", "full"] = "tilt",
    max_tilt_deg: float = MAX_TILT_DEG,
    gap: float = DEFAULT_GAP,
    seed: int = 0,
) -> list[Placement]:
    """All placements of one adsorbate on one slab (heuristic sites first, then random).

    Parameters
    ----------
    slab:
        Clean slab with OC20 tags (tag-1 atoms define the surface), normal along +z, or a
        :class:`~adsorbml.inputs.SlabRecord` (its tiling speeds up the site search).
    adsorbate:
        A name (``"*CO"``) or an :class:`~adsorbml.adsorbates.Adsorbate`.
    num_random:
        Number of random-site placements (OC20-Dense: 100).
    heuristic:
        Also place on every symmetry-distinct ontop/bridge/hollow site (needs pymatgen).
    augmentations:
        Orientations per heuristic site.
    rotation, max_tilt_deg:
        Orientation sampling (see module docstring).
    gap:
        Clearance (Å) added to the covalent radii sum, 0 ≤ gap < 5.
    seed:
        Seed of the ``numpy.random.Generator``; heuristic and random placements use
        independent streams, so changing ``num_random`` does not change heuristic placements.

    Returns
    -------
    list[Placement]
        About ``num_random + augmentations × #sites`` placements.
    """
    ads = as_adsorbate(adsorbate)
    tiling = (1, 1)
    if isinstance(slab, SlabRecord):
        tiling = tuple(slab.info.get("tiling", (1, 1)))
        slab = slab.atoms
    _check_slab(slab)
    if not 0 <= gap < 5:
        raise InputError(f"gap must be in [0, 5) Å, got {gap}")
    if augmentations < 1:
        raise InputError(f"augmentations must be >= 1, got {augmentations}")
    if not heuristic and num_random <= 0:
        raise InputError("nothing to place: heuristic=False and num_random=0")
    single = len(ads) == 1
    out: list[Placement] = []

    def make(cid: str, kind: str, site: np.ndarray, rng: np.random.Generator) -> Placement:
        b = int(ads.binding_indices[0] if len(ads.binding_indices) == 1 else rng.choice(ads.binding_indices))
        R = np.eye(3) if single else random_rotation(rng, rotation, max_tilt_deg)
        atoms = place_adsorbate(slab, ads, site, R, b, gap)
        return Placement(cid, atoms, np.asarray(site, float), kind, len(slab) + b, R)

    if heuristic:
        rng = np.random.default_rng([seed, 0])
        sites = heuristic_sites(slab, tiling=tiling)
        i = 0
        for kind, xyz in sites:
            for _ in range(augmentations):
                out.append(make(f"heur{i}", kind, xyz, rng))
                i += 1
    if num_random > 0:
        rng = np.random.default_rng([seed, 1])
        sites_xyz = random_sites(slab, num_random, rng)
        for i, xyz in enumerate(sites_xyz):
            out.append(make(f"rand{i}", "random", xyz, rng))
    return out

"""Anomaly detection for relaxed adsorbate+slab structures (AdsorbML definitions).

Bond criterion (written out; identical to fairchem-data-oc's ``DetectTrajAnomaly``, which
uses ``natural_cutoffs(mult=m)`` with ASE's ``NeighborList`` and its default 0.3 Å skin added
to *each* atom's radius):

    atoms i and j are bonded  ⇔  d_ij < m · (r_cov,i + r_cov,j) + 2 · skin,   skin = 0.3 Å

with ASE covalent radii (``ase.data.covalent_radii``), minimum-image distances over the
periodic directions of the structure, and multiplier m per test:

=====================  ==========================================================  ========
flag                   anomalous when                                              m
=====================  ==========================================================  ========
``dissociated``        the bond graph of the adsorbate (tag 2) differs between     1.0
                       the initial and final structure (a bond broken *or* formed)
``desorbed``           no adsorbate atom is bonded to any slab atom (tag ≠ 2)      1.5
``surface_changed``    (a) a slab–slab bond present in the final slab at m = 1 is  1.0/1.5
                       absent from the reference slab at m = 1.5, or (b) a bond
                       present in the reference slab at m = 1 is absent from the
                       final slab at m = 1.5
``intercalated``       an adsorbate atom is bonded to a subsurface (tag-0) atom    1.0
=====================  ==========================================================  ========

Effective cutoffs, e.g. C–O 2.02 Å (m = 1), C–Pt 3.78 Å (m = 1.5), Pt–Pt 3.32/4.68 Å.

The **reference slab** for ``surface_changed`` must be the clean slab relaxed at the same
level of theory (the ML-relaxed clean slab for ML relaxations); comparing with the unrelaxed
slab gives false positives. Its atoms must be in the same order as the adslab's slab atoms.

The AdsorbML paper used dissociation, desorption and surface change; the AdsorbML
walkthrough and fairchem 2.x also use intercalation. :data:`DEFAULT_CHECKS` has all four.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

from adsorbml.errors import InputError

__all__ = [
    "BOND_SKIN",
    "ALL_CHECKS",
    "DEFAULT_CHECKS",
    "PAPER_CHECKS",
    "AnomalyReport",
    "connectivity",
    "bond_cutoff",
    "is_dissociated",
    "is_desorbed",
    "has_surface_changed",
    "is_intercalated",
    "detect_anomalies",
]

BOND_SKIN = 0.3  # Å added to each atom's radius (ASE NeighborList default, as in fairchem-data-oc)
DISSOCIATION_MULT = 1.0
DESORPTION_MULT = 1.5
SURFACE_MULT_SMALL = 1.0
SURFACE_MULT_LARGE = 1.5
INTERCALATION_MULT = 1.0

ALL_CHECKS = ("dissociated", "desorbed", "surface_changed", "intercalated")
PAPER_CHECKS = ("dissociated", "desorbed", "surface_changed")
DEFAULT_CHECKS = ALL_CHECKS


def bond_cutoff(z_i: int, z_j: int, multiplier: float, skin: float = BOND_SKIN) -> float:
    """Bond cutoff (Å) between elements ``z_i`` and ``z_j``: m (r_i + r_j) + 2 skin."""
    return multiplier * (covalent_radii[z_i] + covalent_radii[z_j]) + 2.0 * skin


def connectivity(atoms: Atoms, multiplier: float, skin: float = BOND_SKIN) -> np.ndarray:
    """Boolean bond matrix, shape (N, N), symmetric, False on the diagonal.

    ``[i, j]`` is True iff some periodic image of j is closer to i than
    ``multiplier · (r_i + r_j) + 2 · skin``.
    """
    n = len(atoms)
    mat = np.zeros((n, n), dtype=bool)
    if n == 0:
        return mat
    radii = (multiplier * covalent_radii[atoms.numbers] + skin).tolist()
    i, j = neighbor_list("ij", atoms, radii, self_interaction=False)
    mat[i, j] = True
    mat[j, i] = True
    return mat


def _tags(atoms: Atoms) -> np.ndarray:
    tags = atoms.get_tags()
    if not np.any(tags == 2):
        raise InputError("structure has no adsorbate atoms (tag 2)")
    return tags


def is_dissociated(initial: Atoms, final: Atoms, multiplier: float = DISSOCIATION_MULT, skin: float = BOND_SKIN) -> bool:
    """The adsorbate's bond graph changed between ``initial`` and ``final``."""
    ti, tf = _tags(initial), _tags(final)
    if len(initial) != len(final) or not np.array_equal(ti, tf):
        raise InputError("initial and final structures must have the same atoms and tags in the same order")
    ads = np.flatnonzero(tf == 2)
    c0 = connectivity(initial[ads], multiplier, skin)
    c1 = connectivity(final[ads], multiplier, skin)
    return not np.array_equal(c0, c1)


def is_desorbed(final: Atoms, multiplier: float = DESORPTION_MULT, skin: float = BOND_SKIN) -> bool:
    """No adsorbate atom is bonded to any slab atom."""
    tags = _tags(final)
    c = connectivity(final, multiplier, skin)
    return not c[np.ix_(tags == 2, tags != 2)].any()


def has_surface_changed(
    final: Atoms,
    reference_slab: Atoms,
    small: float = SURFACE_MULT_SMALL,
    large: float = SURFACE_MULT_LARGE,
    skin: float = BOND_SKIN,
) -> bool:
    """A slab bond formed or broken relative to the relaxed clean ``reference_slab``."""
    tags = _tags(final)
    slab = final[np.flatnonzero(tags != 2)]
    if len(slab) != len(reference_slab) or not np.array_equal(slab.numbers, reference_slab.numbers):
        raise InputError(
            f"reference slab ({len(reference_slab)} atoms) does not match the adslab's slab atoms "
            f"({len(slab)} atoms) element by element, in order"
        )
    formed = connectivity(slab, small, skin) & ~connectivity(reference_slab, large, skin)
    broken = connectivity(reference_slab, small, skin) & ~connectivity(slab, large, skin)
    return bool(formed.any() or broken.any())


def is_intercalated(final: Atoms, multiplier: float = INTERCALATION_MULT, skin: float = BOND_SKIN) -> bool:
    """An adsorbate atom is bonded to a subsurface (tag-0) atom."""
    tags = _tags(final)
    c = connectivity(final, multiplier, skin)
    return bool(c[np.ix_(tags == 2, tags == 0)].any())


@dataclass
class AnomalyReport:
    """Result of :func:`detect_anomalies` for one placement.

    ``flags`` maps each check that was run to True (anomalous) / False. ``reasons`` lists the
    anomalous checks in :data:`ALL_CHECKS` order (empty for a valid placement).
    """

    flags: dict[str, bool] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return [k for k in ALL_CHECKS if self.flags.get(k)]

    @property
    def is_anomalous(self) -> bool:
        return any(self.flags.values())

    @property
    def reason(self) -> str:
        """``"ok"`` or the anomalous checks joined by ``","``."""
        return ",".join(self.reasons) or "ok"


def detect_anomalies(
    initial: Atoms,
    final: Atoms,
    reference_slab: Atoms | None = None,
    checks: Iterable[str] = DEFAULT_CHECKS,
    skin: float = BOND_SKIN,
) -> AnomalyReport:
    """Run the selected checks on one relaxed placement.

    Parameters
    ----------
    initial, final:
        The placement before and after relaxation (same atoms, tags 0/1/2).
    reference_slab:
        Clean slab relaxed at the same level of theory; required for ``"surface_changed"``.
    checks:
        Subset of :data:`ALL_CHECKS`.
    """
    checks = tuple(checks)
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise InputError(f"unknown anomaly checks {sorted(unknown)}; valid: {list(ALL_CHECKS)}")
    flags: dict[str, bool] = {}
    if "dissociated" in checks:
        flags["dissociated"] = is_dissociated(initial, final, skin=skin)
    if "desorbed" in checks:
        flags["desorbed"] = is_desorbed(final, skin=skin)
    if "surface_changed" in checks:
        if reference_slab is None:
            raise InputError("the surface_changed check needs reference_slab (the relaxed clean slab)")
        flags["surface_changed"] = has_surface_changed(final, reference_slab, skin=skin)
    if "intercalated" in checks:
        flags["intercalated"] = is_intercalated(final, skin=skin)
    return AnomalyReport(flags)


def reasons_from_string(reason: str) -> Sequence[str]:
    """Inverse of :attr:`AnomalyReport.reason`."""
    return [] if reason in ("", "ok") else reason.split(",")

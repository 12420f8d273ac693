"""Which atoms (Cartesian components) a relaxation may move.

ASE ``FixAtoms`` (whole atoms) and ``FixCartesian`` (single components; this is also what
extxyz's ``move_mask`` column is read back as) are supported. Any other ASE constraint
(bond lengths, Hookean springs, filters, ...) is rejected with :class:`InputError`, because
ignoring it silently would give a different answer than ASE's optimizer.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms, FixCartesian

from eqv2_calc.errors import InputError

SUPPORTED_CONSTRAINTS: tuple[str, ...] = ("FixAtoms", "FixCartesian")


def free_mask(atoms: Atoms, *, fix_tag0: bool = False, index: int | str | None = None) -> np.ndarray:
    """Return a [n_atoms, 3] bool array, False where a Cartesian component is fixed.

    Parameters
    ----------
    atoms:
        The structure; its ``FixAtoms``/``FixCartesian`` constraints are honoured.
    fix_tag0:
        Also fix every atom whose tag is 0 (the OC20 convention: 0 = subsurface,
        1 = surface, 2 = adsorbate). Raises if *all* atoms carry tag 0, which usually
        means the structure has no OC20 tags at all.
    index:
        Position of the structure in the caller's list (only used in error messages).
    """
    where = "" if index is None else f" (structure {index})"
    free = np.ones((len(atoms), 3), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, (FixAtoms, FixCartesian)):
            # ask ASE itself which components the constraint zeroes (robust to the meaning of
            # FixCartesian.mask changing between ASE versions)
            probe = np.ones((len(atoms), 3))
            c.adjust_forces(atoms, probe)
            free &= probe != 0.0
        else:
            raise InputError(
                f"unsupported constraint {type(c).__name__}{where}; the relaxer supports "
                f"{', '.join(SUPPORTED_CONSTRAINTS)} only (remove it or use an ASE optimizer)"
            )
    if fix_tag0:
        tags = atoms.get_tags()
        if len(atoms) and np.all(tags == 0):
            raise InputError(
                f"fix_tag0=True but every atom has tag 0{where}: the structure carries no OC20 "
                "tags (0 subsurface, 1 surface, 2 adsorbate), so all atoms would be fixed"
            )
        free[tags == 0] = False
    return free


def fixed_atoms(atoms: Atoms, *, index: int | str | None = None) -> np.ndarray:
    """[n_atoms] bool: atoms with at least one fixed Cartesian component (see :func:`free_mask`).

    The OC20 force loss and metrics run over the other atoms only."""
    return ~free_mask(atoms, index=index).all(axis=1)

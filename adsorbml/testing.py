"""Test helpers for the AdsorbML workflow (not for production use).

:class:`ReferencedEMT` stands in for an OC20-style *referenced* model (one that predicts
adsorption-energy-like energies, as OC20/ODAC EquiformerV2 checkpoints do) using nothing but
ASE's EMT, so tests can check that referenced and total-energy models give the same E_ads:

    E_referenced = E_EMT(atoms) − E_EMT(relaxed clean slab) − Σ_{tag-2 atoms} ε_X

with ε from :meth:`adsorbml.references.GasReferences.computed` on EMT. Forces are EMT's,
unchanged (the offset does not depend on positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from adsorbml.references import GasReferences, adsorbate_composition

__all__ = ["RaisingEMT", "ReferencedEMT", "relax_emt"]


def relax_emt(atoms: Atoms, fmax: float = 0.01, steps: int = 500) -> float:
    """Relax a copy of ``atoms`` (constraints kept) with EMT and LBFGS; returns its energy (eV)."""
    from ase.optimize import LBFGS

    a = atoms.copy()
    a.calc = EMT()
    LBFGS(a, logfile=None).run(fmax=fmax, steps=steps)
    return float(a.get_potential_energy())


class ReferencedEMT(Calculator):
    """EMT with OC20-style referencing: a stand-in for a referenced ML model (test helper).

    Parameters
    ----------
    slab_energy:
        E_EMT of the relaxed clean slab (eV) that the adslabs to be evaluated belong to.
    refs:
        Gas references subtracted per tag-2 atom; default ``GasReferences.computed(EMT())``.

    Results: ``energy`` / ``free_energy`` (eV, referenced), ``forces`` ((n, 3), eV/Å, EMT's).
    Structures without tag-2 atoms (the clean slab) get E_EMT − ``slab_energy``.
    ``metadata["energy_convention"]`` starts with ``"referenced"``, as for OC20 checkpoints.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]

    def __init__(self, slab_energy: float, refs: GasReferences | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slab_energy = float(slab_energy)
        self.refs = refs if refs is not None else GasReferences.computed(EMT())
        self._emt = EMT()

    @classmethod
    def for_slab(cls, slab: Atoms, refs: GasReferences | None = None, fmax: float = 0.01) -> ReferencedEMT:
        """A stand-in for ``slab`` (relaxed here with EMT/LBFGS to ``fmax`` eV/Å)."""
        return cls(relax_emt(slab, fmax=fmax), refs)

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "energy_convention": "referenced energy (test stand-in: EMT − E_EMT(relaxed clean slab) − Σ gas references)",
            "slab_energy": self.slab_energy,
            "gas_references": self.refs.to_dict(),
        }

    def offset(self, atoms: Atoms) -> float:
        """E_EMT − E_referenced for ``atoms`` (eV): slab energy + Σ ε over its tag-2 atoms."""
        if not (atoms.get_tags() == 2).any():
            return self.slab_energy
        comp = adsorbate_composition(atoms)
        return self.slab_energy + sum(n * self.refs.epsilon[s] for s, n in comp.items())

    def calculate(
        self, atoms: Atoms | None = None, properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        Calculator.calculate(self, atoms, properties or ["energy"], system_changes)
        work = self.atoms.copy()
        work.set_constraint()
        work.calc = self._emt
        e = float(work.get_potential_energy()) - self.offset(self.atoms)
        self.results = {"energy": e, "free_energy": e, "forces": np.array(work.get_forces())}


class RaisingEMT(EMT):
    """EMT that raises ``RuntimeError("stand-in DFT failure: ...")`` for every structure with
    tag-2 (adsorbate) atoms: a DFT calculator failing on adslabs (test helper; the clean slab and
    gas molecules still work). Usable as ``--dft-calculator adsorbml.testing:RaisingEMT``."""

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] | None = None,
                  system_changes: Sequence[str] = all_changes) -> None:
        if atoms is not None and (atoms.get_tags() == 2).any():
            raise RuntimeError(f"stand-in DFT failure: SCF did not converge for {atoms.get_chemical_formula()}")
        super().calculate(atoms, properties or ["energy"], system_changes)

"""Adsorption energies of an AdsorbML run: which references, which convention, which offsets.

A run has two levels of theory, the ML model and the "DFT" (single points, ground truth).
Their energies become adsorption energies (eV) per system (one slab, one adsorbate) by

    E_ads = E − offset,   offset = 0                                 (referenced energies)
                          offset = E(clean slab) + Σ_X n_X ε_X      (total energies)

(:func:`adsorbml.references.reference_offset`). Per side:

* **ML**: the convention is ``RunConfig.ml_energy_convention`` or, if unset,
  :func:`adsorbml.references.convention_of` of the ML calculator. Referenced models (OC20/ODAC
  checkpoints) are used as they are. Total-energy models (the shipped model, EMT, OC22, any ASE
  calculator) subtract their own relaxed clean slab (the ``slab_ml`` stage) and gas references.
* **DFT**: always total energies. The clean slab is the ground-truth DFT relaxation
  (``slab_gt``) when the run has ground truth, else a DFT single point on the ML-relaxed clean
  slab (a ``dft_sp`` row with ``system_id = slab_id``, ``config_id = "slab"``); which one is
  recorded in every output (``dft_slab_reference``).

Gas references (``RunConfig.references``):

* ``"oc20"`` — the published RPBE/VASP constants on both sides (right for VASP single points
  and for models of VASP/RPBE totals);
* ``"computed"`` — H2, H2O, CO, N2 relaxed with each side's own calculator: the DFT side with the
  DFT calculator, the ML side with the ML model (only for a total-energy model: a referenced model
  has no molecules' total energies to offer, so references are never computed with it). A model
  that cannot describe isolated molecules (the shipped toy model, trained on EMT slabs with
  adsorbates, collapses H2) fails here with a message pointing to ``"dft"``;
* ``"dft"`` — the molecules relaxed with the DFT calculator, used on both sides (a total-energy
  model trained on that DFT is referenced like the DFT it reproduces, as OC20's constants serve
  models of VASP totals).

Default (:func:`default_references`): ``"dft"`` when the DFT is an in-process ASE calculator other
than VASP (EMT, ...: the OC20 constants are not on its scale, and it works for every ML model);
``"oc20"`` when the DFT is VASP (``--dft-calculator none``, then ``adsorbml export`` /
``adsorbml import``, or an ASE Vasp calculator).

:class:`EnergyScheme` holds the resolved choice and the reference sets; it is stored in the run
config (``config["energy_scheme"]``) so that ``adsorbml import`` recomputes the same E_ads
without rebuilding any calculator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adsorbml.errors import InputError
from adsorbml.references import (
    AdsorbateSpec,
    GasReferences,
    convention_of,
    parse_convention,
    reference_offset,
)

__all__ = [
    "DFT_SLAB_GROUND_TRUTH",
    "DFT_SLAB_SINGLE_POINT",
    "REFERENCE_CHOICES",
    "EnergyScheme",
    "SystemOffsets",
    "build_scheme",
    "default_references",
    "is_vasp_calculator",
    "resolve_ml_convention",
    "system_offsets",
]

REFERENCE_CHOICES: tuple[str, ...] = ("oc20", "computed", "dft")
DFT_SLAB_GROUND_TRUTH = "ground-truth DFT relaxation of the clean slab (slab_gt)"
DFT_SLAB_SINGLE_POINT = "DFT single point on the ML-relaxed clean slab"
_SCHEMA = "adsorbml-energy-scheme"


def is_vasp_calculator(calc: Any) -> bool:
    """Whether ``calc`` is ASE's VASP calculator (its totals are on the OC20 RPBE/VASP scale)."""
    return calc is not None and type(calc).__module__.startswith("ase.calculators.vasp")


def default_references(dft_spec: str, dft_calc: Any | None) -> str:
    """``"oc20"`` if the DFT is VASP (no in-process DFT: ``adsorbml export``/``import``; or ASE's
    Vasp calculator), else ``"dft"`` (molecules relaxed with EMT or whichever ASE calculator is the DFT)."""
    if dft_calc is None or is_vasp_calculator(dft_calc) or str(dft_spec).strip().lower() == "none":
        return "oc20"
    return "dft"


def _check_choice(references: str) -> str:
    r = str(references).strip().lower()
    if r not in REFERENCE_CHOICES:
        raise InputError(f"references={references!r}; expected one of {list(REFERENCE_CHOICES)}")
    return r


@dataclass(frozen=True)
class EnergyScheme:
    """How a run turns energies into adsorption energies (see the module docstring).

    ``ml_refs`` is None for a referenced ML model; ``dft_refs`` None without any DFT.
    """

    references: str
    ml_convention: str
    ml_refs: GasReferences | None
    dft_refs: GasReferences | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": _SCHEMA, "version": 1, "references": self.references, "ml_convention": self.ml_convention,
            "ml_gas_references": None if self.ml_refs is None else self.ml_refs.to_dict(),
            "dft_gas_references": None if self.dft_refs is None else self.dft_refs.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnergyScheme:
        if d.get("schema") != _SCHEMA:
            raise InputError(f"not an energy-scheme record (schema={d.get('schema')!r})")
        ml, dft = d.get("ml_gas_references"), d.get("dft_gas_references")
        return cls(str(d["references"]), parse_convention(d["ml_convention"]),
                   None if ml is None else GasReferences.from_dict(ml),
                   None if dft is None else GasReferences.from_dict(dft))


def _computed(calc: Any, what: str) -> GasReferences:
    try:
        return GasReferences.computed(calc, description=f"{what}: {type(calc).__name__}")
    except Exception as exc:  # noqa: BLE001 - any failure of the model on a molecule: say what to do
        if what != "ML":
            raise
        raise InputError(
            f"references 'computed': relaxing the gas molecules (H2, H2O, CO, N2) with the ML model "
            f"{type(calc).__name__} failed ({type(exc).__name__}: {exc}); a model trained without isolated "
            "molecules cannot give them: use references 'dft' (the molecules relaxed with the DFT "
            "calculator, for both sides) or 'oc20'") from exc


def build_scheme(
    references: str,
    ml_convention: str,
    ml_calc: Any,
    dft_calc: Any | None,
    previous: Mapping[str, Any] | None = None,
) -> EnergyScheme:
    """The :class:`EnergyScheme` of a run with the resolved ``references`` and ``ml_convention``.

    ``"computed"`` relaxes the four molecules with the DFT calculator and, for a total-energy ML
    model, with the ML calculator; ``"dft"`` with the DFT calculator only, used on both sides; a
    stored scheme ``previous`` with the same choices is reused instead (a resumed run keeps the
    references it started with).
    """
    references = _check_choice(references)
    ml_convention = parse_convention(ml_convention)
    if previous:
        try:
            old = EnergyScheme.from_dict(previous)
        except (InputError, KeyError):
            old = None
        if old is not None and old.references == references and old.ml_convention == ml_convention:
            return old
    if references == "oc20":
        refs = GasReferences.oc20()
        # DFT side: in-process DFT, or VASP single points read back by `adsorbml import`
        return EnergyScheme(references, ml_convention, None if ml_convention == "referenced" else refs, refs)
    if dft_calc is None:
        raise InputError(
            f"references '{references}' needs a DFT calculator for the DFT-side gas references; VASP single "
            "points (--dft-calculator none, adsorbml export/import) use references 'oc20'")
    if is_vasp_calculator(dft_calc):
        raise InputError(f"references '{references}' would relax the gas molecules with VASP in-process; "
                         "use references 'oc20' (the OC20 RPBE/VASP constants)")
    dft_refs = _computed(dft_calc, "DFT")
    if ml_convention == "referenced":  # E_ads-like energies: molecules relaxed with it give no total energies
        ml_refs = None
    elif references == "dft":
        ml_refs = dft_refs
    else:
        ml_refs = _computed(ml_calc, "ML")
    return EnergyScheme(references, ml_convention, ml_refs, dft_refs)


def resolve_ml_convention(override: str | None, ml_calc: Any) -> str:
    """``override`` (checked) or the ML calculator's own convention (:func:`convention_of`)."""
    return convention_of(ml_calc, override)


@dataclass(frozen=True)
class SystemOffsets:
    """What to subtract from each side's energies of one system to get E_ads (eV; None: unknown).

    ``ml_slab_energy`` / ``dft_slab_energy`` are the clean-slab energies used (eV, None if not
    needed or not available), ``dft_slab_reference`` says which DFT clean slab it is.
    """

    ml: float | None
    dft: float | None
    ml_slab_energy: float | None
    dft_slab_energy: float | None
    dft_slab_reference: str | None

    def ml_ads(self, e: float | None) -> float | None:
        return _sub(e, self.ml)

    def dft_ads(self, e: float | None) -> float | None:
        return _sub(e, self.dft)


def _sub(e: float | None, off: float | None) -> float | None:
    if e is None or off is None:
        return None
    e = float(e)
    return e - off if math.isfinite(e) else None


def system_offsets(
    scheme: EnergyScheme,
    adsorbate: AdsorbateSpec,
    ml_slab_energy: float | None,
    dft_slab_energy: float | None,
    dft_slab_reference: str | None,
) -> SystemOffsets:
    """The E_ads offsets of one system (``adsorbate``: its composition, see
    :func:`adsorbml.references.adsorbate_composition`). A total-energy side whose clean-slab
    energy is unknown (not finished, or failed) gets offset None."""
    if scheme.ml_convention == "referenced":
        ml_off, ml_slab = 0.0, None
    elif ml_slab_energy is None or not math.isfinite(ml_slab_energy):
        ml_off, ml_slab = None, None
    else:
        ml_off = reference_offset("total", ml_slab_energy, adsorbate, scheme.ml_refs)
        ml_slab = float(ml_slab_energy)
    if scheme.dft_refs is None or dft_slab_energy is None or not math.isfinite(dft_slab_energy):
        dft_off, dft_slab = None, None
    else:
        dft_off = reference_offset("total", dft_slab_energy, adsorbate, scheme.dft_refs)
        dft_slab = float(dft_slab_energy)
    return SystemOffsets(ml_off, dft_off, ml_slab, dft_slab, dft_slab_reference if dft_slab is not None else None)

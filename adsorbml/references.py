"""Adsorption energies in the OC20 scheme: gas-phase references and energy conventions.

The adsorption energy of an adsorbate on a slab (all energies in eV) is

    E_ads = E(adslab) − E(clean slab) − Σ_X n_X ε_X

where the clean slab is relaxed at the same level of theory as the adslab, n_X counts the
adsorbate atoms of element X (OC20: the atoms with tag 2) and ε_X are per-atom gas-phase
references from the formation reaction

    x CO + (x + y/2 − z) H2 + (z − x) H2O + w/2 N2 → CxHyOzNw*

that is ε_H = ½ E(H2), ε_O = E(H2O) − E(H2), ε_C = E(CO) − ε_O, ε_N = ½ E(N2).
Only H, C, N and O can be referenced this way.

Reference sets are :class:`GasReferences`: the published OC20 constants
(:meth:`GasReferences.oc20`, RPBE/VASP — right for VASP single points and for energies on the
OC20 scale) or molecules relaxed with any ASE calculator (:meth:`GasReferences.computed`).
Both serialise to a JSON dict for the run store.

Models come in two energy conventions (:data:`EnergyConvention`):

* ``"referenced"``: the model already predicts E_ads-like energies (OC20 and ODAC
  checkpoints: E − E_slab − Σ gas references); they are used as they are;
* ``"total"``: total energies (OC22 checkpoints, the shipped model, EMT, DFT, any ASE
  calculator); E_ads needs the same model's relaxed clean-slab energy and gas references.

:func:`convention_of` reads the convention from ``calc.metadata["energy_convention"]``
(EquiformerV2Calculator), :func:`adsorption_energy` / :func:`adsorption_energies` apply it.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.data import atomic_numbers, chemical_symbols
from ase.formula import Formula

from adsorbml.errors import AdsorbMLError, InputError

__all__ = [
    "CONVENTIONS",
    "OC20_EPSILON",
    "REFERENCE_MOLECULES",
    "SUPPORTED_ELEMENTS",
    "AdsorbateSpec",
    "EnergyConvention",
    "GasReferences",
    "adsorbate_composition",
    "adsorption_energies",
    "adsorption_energy",
    "convention_of",
    "gas_reference_energy",
    "parse_convention",
    "reference_offset",
]

EnergyConvention = Literal["referenced", "total"]
CONVENTIONS: tuple[str, ...] = ("referenced", "total")
SUPPORTED_ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O")
REFERENCE_MOLECULES: tuple[str, ...] = ("H2", "H2O", "CO", "N2")
#: OC20 per-atom gas-phase references (eV/atom; RPBE, VASP), from the OC20 SI.
OC20_EPSILON: Mapping[str, float] = {"H": -3.477, "O": -7.204, "C": -7.282, "N": -8.083}
_SCHEMA = "oc20-gas-references"
_SCHEMA_VERSION = 1

#: What identifies the adsorbate: an adslab (its tag-2 atoms), a composition {symbol: count},
#: a sequence of atomic numbers or symbols, or a formula string ("CO", "OH", "CH2O").
AdsorbateSpec = Atoms | Mapping[str, int] | Sequence[int | str] | str


def _epsilon_from_molecules(e: Mapping[str, float]) -> dict[str, float]:
    """The OC20 formulas: per-atom ε (eV) from the energies (eV) of H2, H2O, CO and N2."""
    eps_h = 0.5 * e["H2"]
    eps_o = e["H2O"] - e["H2"]
    return {"H": eps_h, "C": e["CO"] - eps_o, "N": 0.5 * e["N2"], "O": eps_o}


@dataclass(frozen=True)
class GasReferences:
    """Per-atom gas-phase reference energies ε_X (eV/atom) for X in H, C, N, O, with provenance.

    Attributes
    ----------
    epsilon:
        {"H", "C", "N", "O"} → ε in eV/atom (read-only by convention; a private copy).
    name:
        ``"oc20"`` for the published constants, ``"computed"`` (or the caller's name) otherwise.
    calculator:
        Description of the level of theory (``"RPBE/VASP (OC20)"``, ``"EMT"``, ...).
    molecule_energies:
        {"H2", "H2O", "CO", "N2"} → relaxed molecule energy (eV), if the set was computed.
    details:
        Further provenance (relaxation settings, steps taken, ...); JSON-serialisable.
    """

    epsilon: Mapping[str, float]
    name: str
    calculator: str
    molecule_energies: Mapping[str, float] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        eps = dict(self.epsilon)
        if set(eps) != set(SUPPORTED_ELEMENTS):
            raise InputError(f"gas references need exactly the elements {list(SUPPORTED_ELEMENTS)}, got {sorted(eps)}")
        for k, v in eps.items():
            try:
                eps[k] = float(v)
            except (TypeError, ValueError):
                eps[k] = math.nan
            if isinstance(v, bool) or not math.isfinite(eps[k]):
                raise InputError(f"gas reference for {k} must be a finite number (eV), got {v!r}")
        object.__setattr__(self, "epsilon", {k: eps[k] for k in SUPPORTED_ELEMENTS})
        if self.molecule_energies is not None:
            mol = {k: float(v) for k, v in self.molecule_energies.items()}
            object.__setattr__(self, "molecule_energies", mol)
        object.__setattr__(self, "details", dict(self.details))

    __hash__ = None  # type: ignore[assignment]  # unhashable: holds dicts (equality still works)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def oc20(cls) -> GasReferences:
        """The published OC20 constants (H −3.477, O −7.204, C −7.282, N −8.083 eV; RPBE/VASP)."""
        return cls(dict(OC20_EPSILON), name="oc20", calculator="RPBE/VASP (OC20 SI constants)")

    @classmethod
    def from_molecule_energies(
        cls, energies: Mapping[str, float], *, name: str = "computed", calculator: str = "unknown",
        details: Mapping[str, Any] | None = None,
    ) -> GasReferences:
        """References from relaxed energies (eV) of the molecules H2, H2O, CO and N2 (e.g. DFT)."""
        missing = [m for m in REFERENCE_MOLECULES if m not in energies]
        if missing:
            raise InputError(f"molecule energies missing for {missing}; need {list(REFERENCE_MOLECULES)}")
        mol = {m: float(energies[m]) for m in REFERENCE_MOLECULES}
        bad = [m for m, v in mol.items() if not math.isfinite(v)]
        if bad:
            raise InputError(f"molecule energies are not finite for {bad}")
        return cls(_epsilon_from_molecules(mol), name=name, calculator=calculator,
                   molecule_energies=mol, details=dict(details or {}))

    @classmethod
    def computed(
        cls,
        calc: BaseCalculator | Callable[[], BaseCalculator],
        *,
        fmax: float = 0.01,
        steps: int = 1000,
        box: float = 20.0,
        optimizer: Literal["BFGS", "LBFGS"] = "BFGS",
        name: str = "computed",
        description: str | None = None,
    ) -> GasReferences:
        """Relax H2, H2O, CO and N2 with ``calc`` and apply the OC20 formulas.

        Each molecule (``ase.build.molecule``) sits centred in a cubic ``box`` (Å) without
        periodic boundaries and is relaxed with ``optimizer`` to ``fmax`` (eV/Å) within
        ``steps``. ``calc`` is an ASE calculator or a zero-argument factory of one; ASE's
        in-memory calculators (EMT, ...) are deep-copied per molecule, others are shared.
        Only meaningful for total-energy calculators. Raises :class:`AdsorbMLError` if a
        molecule does not converge or its energy is not finite.
        """
        from ase.build import molecule
        from ase.optimize import BFGS, LBFGS

        from eqv2_calc.potential import is_ase_in_memory  # the copy-or-share rule of ASEPotential

        opt_cls = {"BFGS": BFGS, "LBFGS": LBFGS}.get(optimizer)
        if opt_cls is None:
            raise InputError(f"optimizer={optimizer!r}; expected 'BFGS' or 'LBFGS'")
        if isinstance(calc, BaseCalculator):
            template = calc
            new_calc = (lambda: copy.deepcopy(template)) if is_ase_in_memory(template) else (lambda: template)
        elif callable(calc):
            template, new_calc = None, calc
        else:
            raise InputError(f"calc must be an ASE calculator or a factory of one, got {type(calc).__name__}")
        energies: dict[str, float] = {}
        nsteps: dict[str, int] = {}
        for m in REFERENCE_MOLECULES:
            atoms = molecule(m)
            atoms.set_cell([box, box, box])
            atoms.center()
            atoms.pbc = False
            atoms.calc = new_calc()
            opt = opt_cls(atoms, logfile=None)
            if not opt.run(fmax=fmax, steps=steps):
                raise AdsorbMLError(f"gas reference {m} did not relax to fmax {fmax} eV/Å within {steps} steps")
            e = float(atoms.get_potential_energy())
            if not math.isfinite(e):
                raise AdsorbMLError(f"gas reference {m}: calculator returned a non-finite energy ({e})")
            energies[m], nsteps[m] = e, int(opt.nsteps)
        desc = description or type(template if template is not None else atoms.calc).__name__
        details = {"optimizer": optimizer, "fmax": fmax, "box": box, "pbc": False, "steps": nsteps}
        return cls.from_molecule_energies(energies, name=name, calculator=desc, details=details)

    # ------------------------------------------------------------------ use
    def __getitem__(self, symbol: str) -> float:
        """ε (eV/atom) of ``symbol``; unsupported elements raise :class:`InputError`."""
        _check_supported({symbol: 1})
        return self.epsilon[symbol]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (energies in eV) that :meth:`from_dict` reads back."""
        return {
            "schema": _SCHEMA, "version": _SCHEMA_VERSION, "name": self.name, "calculator": self.calculator,
            "epsilon_eV": dict(self.epsilon),
            "molecule_energies_eV": None if self.molecule_energies is None else dict(self.molecule_energies),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GasReferences:
        """Inverse of :meth:`to_dict`; raises :class:`InputError` on another schema or version."""
        if data.get("schema") != _SCHEMA or data.get("version") != _SCHEMA_VERSION:
            raise InputError(
                f"not a gas-reference record (schema={data.get('schema')!r}, version={data.get('version')!r}); "
                f"expected schema {_SCHEMA!r} version {_SCHEMA_VERSION}")
        try:
            return cls(data["epsilon_eV"], name=data["name"], calculator=data["calculator"],
                       molecule_energies=data.get("molecule_energies_eV"), details=data.get("details") or {})
        except KeyError as exc:
            raise InputError(f"gas-reference record lacks the key {exc.args[0]!r}") from None


# ---------------------------------------------------------------------- adsorbate composition


def _check_supported(comp: Mapping[str, int]) -> None:
    bad = sorted(s for s in comp if s not in SUPPORTED_ELEMENTS)
    if bad:
        raise InputError(
            f"adsorbate element(s) {', '.join(bad)} have no OC20 gas reference; "
            f"supported: {', '.join(SUPPORTED_ELEMENTS)}")


def _symbol(z: int | str) -> str:
    """The element symbol of an atomic number or symbol; InputError if there is no such element."""
    if isinstance(z, str):
        if z not in atomic_numbers:
            raise InputError(f"unknown element symbol {z!r} in adsorbate")
        return z
    if int(z) != z or not 0 < int(z) < len(chemical_symbols):
        raise InputError(f"invalid atomic number {z!r} in adsorbate")
    return chemical_symbols[int(z)]


def adsorbate_composition(adsorbate: AdsorbateSpec) -> dict[str, int]:
    """{symbol: count} of the adsorbate, checked against H, C, N, O.

    ``adsorbate`` may be an adslab ``Atoms`` (its tag-2 atoms, OC20 convention; an error if
    it has none), a mapping {symbol: count}, a sequence of atomic numbers or symbols, or a
    formula string (``"CO"``, ``"OH"``, ``"CH2O"``).
    """
    if isinstance(adsorbate, Atoms):
        mask = adsorbate.get_tags() == 2
        if not mask.any():
            raise InputError(
                f"{adsorbate.get_chemical_formula()}: no atom has tag 2 (OC20 adsorbate tag); "
                "tag the adsorbate or pass its composition explicitly")
        comp = dict(Counter(np.asarray(adsorbate.get_chemical_symbols())[mask].tolist()))
    elif isinstance(adsorbate, str):
        try:
            comp = dict(Formula(adsorbate).count())
        except ValueError as exc:
            raise InputError(f"cannot read adsorbate formula {adsorbate!r}: {exc}") from None
    elif isinstance(adsorbate, Mapping):
        comp = {}
        for sym, n in adsorbate.items():
            if int(n) != n or n < 0:
                raise InputError(f"adsorbate count of {sym} must be a non-negative integer, got {n!r}")
            if n:
                comp[_symbol(sym)] = int(n)
    else:
        comp = dict(Counter(_symbol(z) for z in adsorbate))
    if not comp:
        raise InputError("the adsorbate has no atoms")
    _check_supported(comp)
    return comp


def gas_reference_energy(adsorbate: AdsorbateSpec, refs: GasReferences) -> float:
    """Σ_X n_X ε_X (eV) over the adsorbate's atoms (see :func:`adsorbate_composition`)."""
    comp = adsorbate_composition(adsorbate)
    return float(sum(n * refs.epsilon[s] for s, n in comp.items()))


# ---------------------------------------------------------------------- conventions


def parse_convention(value: str) -> EnergyConvention:
    """``"referenced"`` or ``"total"`` from a convention string that starts with either word
    (case-insensitive; e.g. the checkpoint metadata string); anything else raises InputError."""
    if isinstance(value, str):
        s = value.strip().lower()
        for c in CONVENTIONS:
            if s.startswith(c):
                return c  # type: ignore[return-value]
    raise InputError(f"unknown energy convention {value!r}: expected a string starting with 'referenced' or 'total'")


def convention_of(calc: Any, override: str | None = None) -> EnergyConvention:
    """The energy convention of ``calc``: ``override`` if given, else
    ``calc.metadata["energy_convention"]`` (EquiformerV2Calculator: "referenced energy (OC20 ...)"
    or "total energy (...)"), else ``"total"`` (EMT and any other ASE calculator)."""
    if override is not None:
        return parse_convention(override)
    meta = getattr(calc, "metadata", None)
    if isinstance(meta, Mapping) and meta.get("energy_convention") is not None:
        try:
            return parse_convention(meta["energy_convention"])
        except InputError as exc:
            raise InputError(f"{type(calc).__name__}.metadata['energy_convention']: {exc}; "
                             "pass an explicit convention override") from None
    return "total"


# ---------------------------------------------------------------------- adsorption energies


def reference_offset(
    convention: EnergyConvention | str,
    slab_energy: float | None = None,
    adsorbate: AdsorbateSpec | None = None,
    refs: GasReferences | None = None,
) -> float:
    """What to subtract from a model energy to get E_ads (eV): 0 for ``"referenced"``;
    E(clean slab) + Σ n ε for ``"total"`` (OC20-Dense's ``ref_energies``). For ``"total"``
    all of ``slab_energy`` (eV), ``adsorbate`` and ``refs`` are required; for ``"referenced"``
    they are ignored."""
    conv = parse_convention(convention)
    if conv == "referenced":
        return 0.0
    missing = [n for n, v in (("slab_energy", slab_energy), ("adsorbate", adsorbate), ("refs", refs)) if v is None]
    if missing:
        raise InputError(
            f"total-energy convention needs {', '.join(missing)}: E_ads = E(adslab) − E(clean slab, "
            "relaxed with the same calculator) − Σ n ε (gas references)")
    es = float(slab_energy)  # type: ignore[arg-type]
    if not math.isfinite(es):
        raise InputError(f"clean-slab energy must be finite, got {es}")
    return es + gas_reference_energy(adsorbate, refs)  # type: ignore[arg-type]


def adsorption_energy(
    energy: float,
    convention: EnergyConvention | str,
    slab_energy: float | None = None,
    adsorbate: AdsorbateSpec | None = None,
    refs: GasReferences | None = None,
) -> float:
    """E_ads (eV) of one adslab energy ``energy`` (eV) given in ``convention``.

    ``"referenced"``: ``energy`` as it is. ``"total"``: ``energy − slab_energy − Σ n ε`` with
    the clean slab relaxed at the same level of theory, the adsorbate composition from
    ``adsorbate`` (see :func:`adsorbate_composition`) and ε from ``refs``. A non-finite
    ``energy`` (a failed calculation) gives NaN.
    """
    off = reference_offset(convention, slab_energy, adsorbate, refs)
    e = float(energy)
    return e - off if math.isfinite(e) else math.nan


def adsorption_energies(
    energies: Sequence[float] | np.ndarray,
    convention: EnergyConvention | str,
    slab_energy: float | None = None,
    adsorbate: AdsorbateSpec | None = None,
    refs: GasReferences | None = None,
) -> np.ndarray:
    """E_ads (eV, float64 array [P]) of the energies [P] of P placements of one system (one slab,
    one adsorbate); None or non-finite entries (failed placements) give NaN."""
    off = reference_offset(convention, slab_energy, adsorbate, refs)
    e = np.array([np.nan if v is None else v for v in energies], dtype=np.float64)
    if e.ndim != 1:
        raise InputError(f"energies must be one-dimensional, got shape {e.shape}")
    return np.where(np.isfinite(e), e - off, np.nan)

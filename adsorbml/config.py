"""Settings of an AdsorbML run: :class:`RunConfig` (what ``adsorbml run`` and its config file
set), :class:`SlabSpec` (one slab source) and :func:`load_config` (JSON / YAML files).

``RunConfig.RESULT_FIELDS`` are the settings that determine the results (recorded in the store
and compared when resuming, see :mod:`eqv2_calc.resume`); ``EXECUTION_FIELDS`` only change how
the work runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from ase import Atoms

from adsorbml.adsorbates import as_adsorbate
from adsorbml.anomalies import ALL_CHECKS, DEFAULT_CHECKS
from adsorbml.calculators import _parse_calculator
from adsorbml.errors import InputError
from adsorbml.inputs import SlabRecord

__all__ = ["RunConfig", "SlabSpec", "load_config"]


@dataclass
class SlabSpec:
    """One slab source: a structure ``file`` (any format ase.io reads), **or** a ``bulk``
    (element symbol for ``ase.build.bulk``, or a file) with a ``miller`` index, **or** an
    in-memory prepared slab ``record`` (Python API only, see :meth:`of`).

    ``slab_id`` names a file slab (default: file stem); ``max_slabs`` limits the number of
    terminations taken from a bulk (default 1, the first in pymatgen's order).
    """

    file: str | None = None
    bulk: str | None = None
    miller: tuple[int, int, int] | None = None
    slab_id: str | None = None
    max_slabs: int = 1
    record: SlabRecord | None = None
    structure_sha256: str | None = None  # of an in-memory slab (set from ``record``; read back from a store)

    def __post_init__(self) -> None:
        if self.record is not None:
            self.structure_sha256 = structure_hash(self.record.atoms)

    @classmethod
    def of(cls, record: SlabRecord) -> "SlabSpec":
        """A prepared slab (:func:`adsorbml.inputs.prepare_slab`) as a slab source. The run
        records its id and a hash of its structure, so resuming with another slab is refused."""
        if not isinstance(record, SlabRecord):
            raise InputError(f"expected an adsorbml.inputs.SlabRecord (see prepare_slab), got {type(record).__name__}")
        return cls(slab_id=record.slab_id, record=record)

    @classmethod
    def parse(cls, spec: "str | Mapping[str, Any] | SlabSpec") -> "SlabSpec":
        """From a dict (config file), a ``"BULK:HKL"`` string (``"Pt:111"``, ``"bulk.cif:1,0,0"``)
        or an existing SlabSpec."""
        if isinstance(spec, SlabSpec):
            return spec
        if isinstance(spec, str):
            if ":" not in spec:
                raise InputError(f"surface {spec!r} must look like BULK:HKL, e.g. Pt:111 or bulk.cif:1,-1,0")
            bulk, hkl = spec.rsplit(":", 1)
            return cls(bulk=bulk, miller=_parse_miller(hkl))
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"file", "bulk", "miller", "slab_id", "id", "max_slabs", "structure_sha256"}
            if unknown:
                raise InputError(f"unknown slab keys {sorted(unknown)}; use file | bulk + miller, slab_id, max_slabs")
            out = cls(
                file=spec.get("file"), bulk=spec.get("bulk"),
                miller=None if spec.get("miller") is None else _parse_miller(spec["miller"]),
                slab_id=spec.get("slab_id", spec.get("id")), max_slabs=int(spec.get("max_slabs", 1)),
                structure_sha256=spec.get("structure_sha256"),
            )
            out.check()
            return out
        raise InputError(f"slab spec must be a string BULK:HKL or a dict, got {type(spec).__name__}")

    def check(self) -> None:
        if sum(x is not None for x in (self.file, self.bulk, self.structure_sha256)) != 1:
            raise InputError("a slab needs exactly one of 'file' or 'bulk' (+ 'miller'), or an in-memory slab (SlabSpec.of)")
        if self.bulk is not None and self.miller is None:
            raise InputError(f"bulk {self.bulk!r} needs a Miller index")
        if self.max_slabs < 1:
            raise InputError(f"max_slabs must be >= 1, got {self.max_slabs}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "record"}
        d = {k: v for k, v in d.items() if v is not None}
        if self.miller is not None:
            d["miller"] = list(self.miller)
        return d


def structure_hash(atoms: Atoms) -> str:
    """sha256 of numbers, positions (rounded to 1e-8 Å), cell, pbc and tags of ``atoms``."""
    import hashlib

    h = hashlib.sha256()
    for arr in (atoms.numbers, np.round(atoms.positions, 8), np.round(np.asarray(atoms.cell), 8), atoms.pbc,
                atoms.get_tags()):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _parse_miller(hkl: Any) -> tuple[int, int, int]:
    try:
        if isinstance(hkl, str):
            s = hkl.strip().strip("()[]")
            vals = [int(x) for x in s.split(",")] if "," in s else [int(c) for c in s]
        else:
            vals = [int(x) for x in hkl]
    except (TypeError, ValueError):
        raise InputError(f"Miller index {hkl!r} must be three integers ('111', '1,-1,0' or [1, 1, 1])") from None
    if len(vals) != 3 or vals == [0, 0, 0]:
        raise InputError(f"Miller index {hkl!r} must be three integers, not all zero")
    return (vals[0], vals[1], vals[2])


@dataclass
class RunConfig:
    """Settings of one AdsorbML run (units: eV, Å).

    Attributes
    ----------
    slabs, adsorbates:
        Every slab is combined with every adsorbate (names from the built-in/OC20 table).
    num_random, heuristic, seed:
        Random placements per system, whether to add the heuristic sites, RNG seed.
    fmax, steps:
        ML relaxation settings (AdsorbML: 0.02 eV/Å, 300 steps).
    k:
        DFT single points on the k lowest-energy valid placements.
    ml_calculator:
        ``"shipped"`` (``checkpoints/eqv2-emt-small.pt``), a checkpoint path, an official model
        name, a built-in ASE calculator (``"emt"``, ``"lj"``, ``"morse"``) or ``"module:Class"``
        (any ASE calculator), the last two optionally with JSON keyword arguments
        (``'module:Class{"key": 1}'``); parsed by :func:`eqv2_calc.calcspec.parse_calculator_spec`.
    dft_calculator:
        ``"none"``, a built-in ASE calculator or ``"module:Class"`` (same syntax).
    ground_truth:
        Also relax every placement with the DFT calculator (targets + compute files).
    gt_fmax, gt_steps:
        Ground-truth relaxation settings.
    checks:
        Anomaly checks (:data:`adsorbml.anomalies.ALL_CHECKS`).
    max_atoms:
        Atom budget of one batched relaxation call (None: relaxer default). Does not change
        results, only how many structures relax at once.
    references:
        Gas references of the adsorption energies (:mod:`adsorbml.energies`): ``"oc20"``
        (published RPBE/VASP constants), ``"computed"`` (H2, H2O, CO, N2 relaxed with each side's
        calculator) or ``"dft"`` (relaxed with the DFT calculator, used for both sides). None:
        ``"oc20"`` when the DFT is VASP (``dft_calculator "none"`` + export/import, or ASE's Vasp),
        ``"dft"`` otherwise (EMT or another ASE calculator as the DFT), see
        :func:`adsorbml.energies.default_references`. Resolved when the run starts.
    ml_energy_convention:
        ``"referenced"`` or ``"total"``; None: the ML calculator's own
        (``metadata["energy_convention"]``, else ``"total"``). Resolved when the run starts.
    """

    slabs: list[SlabSpec] = field(default_factory=list)
    adsorbates: list[str] = field(default_factory=list)
    num_random: int = 100
    heuristic: bool = True
    seed: int = 0
    fmax: float = 0.02
    steps: int = 300
    k: int = 5
    ml_calculator: str = "shipped"
    dft_calculator: str = "emt"
    ground_truth: bool = False
    gt_fmax: float = 0.02
    gt_steps: int = 300
    checks: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS))
    max_atoms: int | None = None
    references: str | None = None
    ml_energy_convention: str | None = None

    # The fields that determine the results (allow-list, see eqv2_calc.resume): recorded in
    # the store and compared when resuming. EXECUTION_FIELDS only change how the work runs.
    RESULT_FIELDS = (
        "slabs", "adsorbates", "num_random", "heuristic", "seed", "fmax", "steps", "k",
        "ml_calculator", "dft_calculator", "ground_truth", "gt_fmax", "gt_steps", "checks",
        "references", "ml_energy_convention",
    )
    EXECUTION_FIELDS = ("max_atoms",)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown config keys {sorted(unknown)}; valid: {', '.join(sorted(names))}")
        kw = dict(d)
        kw["slabs"] = [SlabSpec.parse(s) for s in d.get("slabs", [])]
        kw["adsorbates"] = [str(a) for a in d.get("adsorbates", [])]
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise :class:`InputError` for unusable settings."""
        if not self.slabs:
            raise InputError("no slabs: give --slab FILE or --surface BULK:HKL (or 'slabs' in the config)")
        if not self.adsorbates:
            raise InputError("no adsorbates: give --adsorbate NAME (e.g. *CO) or 'adsorbates' in the config")
        for s in self.slabs:
            s.check()
        for a in self.adsorbates:
            as_adsorbate(a)  # unknown names fail here, with the list of valid ones
        if self.num_random < 0 or (self.num_random == 0 and not self.heuristic):
            raise InputError("need placements: num_random >= 1 or heuristic sites")
        if not (self.fmax > 0 and self.gt_fmax > 0):
            raise InputError("fmax and gt_fmax must be > 0 eV/Å")
        if self.steps < 0 or self.gt_steps < 0 or self.k < 1:
            raise InputError("steps must be >= 0 and k >= 1")
        bad = set(self.checks) - set(ALL_CHECKS)
        if bad:
            raise InputError(f"unknown anomaly checks {sorted(bad)}; valid: {list(ALL_CHECKS)}")
        dft = _parse_calculator(self.dft_calculator, ("ase", "none"), "DFT calculator")
        if self.ground_truth and dft.kind == "none":
            raise InputError("ground_truth needs a DFT calculator (e.g. --dft-calculator emt)")
        from adsorbml.energies import REFERENCE_CHOICES
        from adsorbml.references import adsorbate_composition, parse_convention

        if self.references is not None and self.references not in REFERENCE_CHOICES:
            raise InputError(f"references={self.references!r}; expected one of {list(REFERENCE_CHOICES)}")
        if self.references in ("computed", "dft") and dft.kind == "none":
            raise InputError(f"references '{self.references}' needs a DFT calculator for the DFT-side gas references; "
                             "VASP single points (--dft-calculator none, then adsorbml export/import) use 'oc20'")
        if self.ml_energy_convention is not None:
            self.ml_energy_convention = parse_convention(self.ml_energy_convention)
        for a in self.adsorbates:
            adsorbate_composition(as_adsorbate(a).atoms.get_chemical_symbols())  # elements outside H, C, N, O have no gas reference

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["slabs"] = [s.to_dict() for s in self.slabs]
        d["checks"] = list(self.checks)
        return d

    def fingerprint(self) -> dict:
        """The settings that determine the results (:attr:`RESULT_FIELDS`, compared when resuming)."""
        from eqv2_calc.resume import select_settings

        return select_settings(self.to_dict(), self.RESULT_FIELDS)


def load_config(path: str | os.PathLike) -> dict:
    """Read a run config file: JSON, or YAML (``.yaml``/``.yml``, needs PyYAML)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such config file: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{p} is YAML but PyYAML is not installed (pip install pyyaml), or use JSON") from None
        d = yaml.safe_load(text)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise InputError(f"{p} must contain a mapping of settings")
    return d

"""The resumable AdsorbML run behind ``adsorbml run`` / ``adsorbml demo``.

:func:`run_workflow` takes a :class:`RunConfig` (slabs × adsorbates, placement and relaxation
settings, calculators) and an output directory, and runs every stage through the ase.db store
of :mod:`adsorbml.store`:

1. slabs (files, or bulk + Miller index via pymatgen) → ``slab`` rows;
2. placements per system (seeded, so regenerating gives the same structures; they are also
   stored, in one transaction per system) → ``placement`` rows;
3. ML relaxation of each clean slab (the anomaly reference) → ``slab_ml``;
4. ML relaxation of every placement with the batched relaxer; each result is written with
   its anomaly verdict from the ``on_result`` callback as soon as it finishes → ``ml``;
5. DFT single points (any ASE calculator) on the top k valid placements → ``dft_sp``;
6. optional ground truth: DFT relaxation of the clean slab and of *every* placement
   (``slab_gt``, ``gt``), as for the OC20-Dense targets; cost = force calls.

Before any of these, the gas references of the run are fixed (:mod:`adsorbml.energies`:
``references`` "oc20" or "computed", the ML model's energy convention) and recorded in the
store's run config (``energy_scheme``). Without ground truth, step 5 also runs a DFT single
point on each ML-relaxed clean slab (``dft_sp`` row ``(slab_id, "slab")``): the DFT clean-slab
energy of E_ads(ML+DFT). A DFT calculator that raises is recorded with its message (``dft_sp``
row ``dft_error``, ``events.jsonl``) and stops the DFT work unless ``continue_on_dft_error``.

Run again with the same settings and it resumes: finished rows are skipped, never redone.
Outputs are rewritten from the store at the end of each run by :mod:`adsorbml.outputs`; all
energies in them are adsorption energies (eV)::

    adsorbml.db       the store            events.jsonl   started/finished work (audit log)
    results.json      OC20-Dense results   anomalies.json {system_id: {config_id: reason}}
    targets.json      OC20-Dense targets   compute.json   ground-truth cost (ground truth only)
    summary.json/.csv the lowest E_ads per system (placement, site, anomaly-free)
    energies.json     which energies the files carry (references, conventions, offsets)
    metrics.md        success/speedup table (ground truth only)
    plots/<system_id>.png
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import Atoms

from adsorbml.adsorbates import as_adsorbate
from adsorbml.anomalies import ALL_CHECKS, DEFAULT_CHECKS, detect_anomalies
from adsorbml.errors import InputError
from adsorbml.export import MLResult, export_top_k, rank_valid, write_vasp_inputs
from adsorbml.inputs import SlabRecord, load_slab, slabs_from_bulk
from adsorbml.outputs import collect_outputs, ml_result, plot_system
from adsorbml.placements import Placement, generate_placements
from adsorbml.single_points import single_point
from adsorbml.store import RunStore
from eqv2_calc.io import atomic_write_text

__all__ = [
    "SlabSpec",
    "RunConfig",
    "RunSummary",
    "load_config",
    "make_ml_calculator",
    "make_dft_calculator",
    "shipped_model_available",
    "run_workflow",
    "export_run",
    "collect_outputs",
    "plot_system",
]

Log = Callable[[str], None]


# --------------------------------------------------------------------------- configuration


@dataclass
class SlabSpec:
    """One slab source: a structure ``file`` (any format ase.io reads) **or** a ``bulk``
    (element symbol for ``ase.build.bulk``, or a file) with a ``miller`` index.

    ``slab_id`` names a file slab (default: file stem); ``max_slabs`` limits the number of
    terminations taken from a bulk (default 1, the first in pymatgen's order).
    """

    file: str | None = None
    bulk: str | None = None
    miller: tuple[int, int, int] | None = None
    slab_id: str | None = None
    max_slabs: int = 1

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
            unknown = set(spec) - {"file", "bulk", "miller", "slab_id", "id", "max_slabs"}
            if unknown:
                raise InputError(f"unknown slab keys {sorted(unknown)}; use file | bulk + miller, slab_id, max_slabs")
            out = cls(
                file=spec.get("file"), bulk=spec.get("bulk"),
                miller=None if spec.get("miller") is None else _parse_miller(spec["miller"]),
                slab_id=spec.get("slab_id", spec.get("id")), max_slabs=int(spec.get("max_slabs", 1)),
            )
            out.check()
            return out
        raise InputError(f"slab spec must be a string BULK:HKL or a dict, got {type(spec).__name__}")

    def check(self) -> None:
        if (self.file is None) == (self.bulk is None):
            raise InputError("a slab needs exactly one of 'file' or 'bulk' (+ 'miller')")
        if self.bulk is not None and self.miller is None:
            raise InputError(f"bulk {self.bulk!r} needs a Miller index")
        if self.max_slabs < 1:
            raise InputError(f"max_slabs must be >= 1, got {self.max_slabs}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.miller is not None:
            d["miller"] = list(self.miller)
        return d


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
        Gas references of the adsorption energies: ``"oc20"`` (published RPBE/VASP constants)
        or ``"computed"`` (H2, H2O, CO, N2 relaxed with each side's calculator). None: ``"oc20"``
        when the DFT is VASP (``dft_calculator "none"`` + export/import, or ASE's Vasp),
        ``"computed"`` otherwise (EMT or another ASE calculator as the DFT), see
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
        if self.references == "computed" and dft.kind == "none":
            raise InputError("references 'computed' needs a DFT calculator for the DFT-side gas references; "
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


# --------------------------------------------------------------------------- calculators


def shipped_model_available() -> bool:
    """Whether this installation contains the shipped model (``eqv2-emt-small.pt``, found by
    :func:`eqv2_calc.checkpoint.registry.shipped_checkpoint`)."""
    from eqv2_calc.checkpoint.registry import shipped_checkpoint
    from eqv2_calc.errors import CheckpointError

    try:
        shipped_checkpoint()
        return True
    except CheckpointError:
        return False


def _parse_calculator(spec: str, allow: tuple[str, ...], what: str):
    """:func:`eqv2_calc.calcspec.parse_calculator_spec` (its errors are :class:`InputError`)."""
    from eqv2_calc.calcspec import parse_calculator_spec

    return parse_calculator_spec(spec, allow=allow, what=what)


def _build_calculator(spec: str, allow: tuple[str, ...], what: str, **eqv2_options: Any) -> Any:
    from eqv2_calc.errors import CheckpointError

    parsed = _parse_calculator(spec, allow, what)
    try:
        return parsed.build(**eqv2_options)
    except CheckpointError as e:
        raise InputError(f"{what} {spec!r}: {e} (or use --ml-calculator emt)") from None


def make_ml_calculator(spec: str, trust_checkpoint: bool = False) -> Any:
    """The ML force field named by ``spec`` (see :attr:`RunConfig.ml_calculator`).

    ``trust_checkpoint``: load an EquiformerV2 checkpoint even if its pickle holds objects beyond
    the safe allow-list (see :func:`eqv2_calc.checkpoint.load_model`); only for trusted files."""
    options = {"trust_checkpoint": True} if trust_checkpoint else {}
    return _build_calculator(spec, ("ase", "eqv2"), "ML calculator", **options)


def make_dft_calculator(spec: str) -> Any | None:
    """The DFT (stand-in) calculator: ``"none"`` (→ None), a built-in ASE calculator (``"emt"``,
    ...) or ``"module:Class"`` (see :attr:`RunConfig.dft_calculator`)."""
    return _build_calculator(spec, ("ase", "none"), "DFT calculator")


# --------------------------------------------------------------------------- systems


@dataclass
class _System:
    system_id: str
    slab_id: str
    adsorbate: str
    placements: list[Placement]


def system_id_for(slab_id: str, adsorbate: str) -> str:
    """``<slab_id>_<adsorbate without *>``, e.g. ``Pt_111_0.167_CO``."""
    return f"{slab_id}_{adsorbate.lstrip('*')}"


def _build_slabs(cfg: RunConfig) -> list[SlabRecord]:
    from ase.build import bulk as ase_bulk

    out: list[SlabRecord] = []
    for spec in cfg.slabs:
        if spec.file is not None:
            out.append(load_slab(spec.file, spec.slab_id))
        else:
            src = spec.bulk
            if not os.path.exists(src):
                try:
                    src = ase_bulk(spec.bulk)
                except (KeyError, ValueError, RuntimeError) as e:
                    raise InputError(f"bulk {spec.bulk!r} is neither a file nor an element ase.build.bulk knows: {e}") from None
            out.extend(slabs_from_bulk(src, spec.miller, max_slabs=spec.max_slabs))
    ids = [s.slab_id for s in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"duplicate slab ids {dup}; give distinct 'slab_id's")
    return out


def _slab_from_row(row: Any) -> SlabRecord:
    info = dict(row.data.get("info", {}))
    millers = info.get("millers")
    return SlabRecord(row.system_id, row.toatoms(), tuple(millers) if millers else None, info.get("shift"), info)


def _placement_from_row(row: Any) -> Placement:
    d = row.data
    return Placement(row.config_id, row.toatoms(), np.asarray(d["site"], float), str(d["site_kind"]),
                     int(d["binding_index"]), np.asarray(d["rotation"], float))


# --------------------------------------------------------------------------- the run


@dataclass
class RunSummary:
    """What a run produced (counts refer to this invocation unless stated)."""

    out_dir: Path
    run_id: int
    systems: list[str]
    n_placements: int
    ml_relaxed_now: int
    ml_skipped: int
    dft_now: int
    gt_relaxed_now: int
    ml_seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    table: str | None = None
    answers: list = field(default_factory=list)  # adsorbml.summary.SystemAnswer per system
    dft_errors: dict[str, str] = field(default_factory=dict)  # "<system_id>/<config_id>" → message
    dft_stopped: bool = False  # DFT work stopped at the first error (no continue_on_dft_error)


def _verdict(systems: Sequence[Any], slab_refs: dict, checks: Any, energy_key: str) -> Callable[[str, str, Any], dict]:
    """Row values for a finished relaxation: its energy (eV) under ``energy_key`` and the
    anomaly verdict against the relaxed clean slab of its system (same level of theory)."""
    initial = {(s.system_id, p.config_id): p.atoms for s in systems for p in s.placements}
    slab_of = {s.system_id: s.slab_id for s in systems}

    def verdict(sid: str, cid: str, r: Any) -> dict:
        e = float(r.energy)
        if r.failed or not math.isfinite(e):
            anomaly = f"relaxation_{r.reason}" if r.failed else "relaxation_non_finite"
        else:
            anomaly = detect_anomalies(initial[(sid, cid)], r.atoms, slab_refs[slab_of[sid]], checks).reason
        return {energy_key: e if math.isfinite(e) else None, "anomaly": anomaly}

    return verdict


def _relax_into_store(
    store: RunStore, run_id: int, stage: str, items: list[tuple[str, str, Atoms]], calc: Any, *,
    fmax: float, steps: int, max_atoms: int | None, progress: bool,
    verdict: Callable[[str, str, Any], dict] | None = None,
) -> float:
    """Relax ``items`` [(system_id, config_id, atoms)] with relax_batch, writing each result to
    ``stage`` the moment it finishes. Returns the wall time (s)."""
    from eqv2_calc.relax import relax_batch

    if not items:
        return 0.0
    store.log_event(event="start", stage=stage, run_id=run_id, items=[[s, c] for s, c, _ in items])

    def on_result(r: Any) -> None:
        sid, cid, _ = items[r.index]
        e = float(r.energy)
        kvp: dict[str, Any] = {
            "run_id": run_id, "converged": bool(r.converged), "nsteps": int(r.nsteps),
            "force_calls": int(r.nsteps) + 1, "final_fmax": float(r.fmax) if math.isfinite(r.fmax) else None,
            "relax_reason": r.reason, "failed": bool(r.failed),
        }
        if verdict is not None:
            kvp.update(verdict(sid, cid, r))
        else:
            kvp["energy_ok"] = math.isfinite(e)
        _, written = store.write(stage, sid, cid, r.atoms, kvp, {"initial_energy": float(r.initial_energy)})
        store.log_event(event="finish", stage=stage, run_id=run_id, system_id=sid, config_id=cid, written=written)

    t0 = time.perf_counter()
    relax_batch([a for _, _, a in items], calc, fmax=fmax, steps=steps, max_atoms=max_atoms,
                progress=progress, on_result=on_result)
    return time.perf_counter() - t0


def resolve_energy_settings(cfg: RunConfig, ml_calc: Any, dft_calc: Any | None) -> RunConfig:
    """``cfg`` with ``references`` and ``ml_energy_convention`` resolved (see :class:`RunConfig`)."""
    import dataclasses

    from adsorbml.energies import default_references, resolve_ml_convention

    refs = cfg.references or default_references(cfg.dft_calculator, dft_calc)
    conv = resolve_ml_convention(cfg.ml_energy_convention, ml_calc)
    return dataclasses.replace(cfg, references=refs, ml_energy_convention=conv)


def _dft_single_points(
    store: RunStore, run_id: int, todo: list[tuple[str, str, Atoms]], dft_calc: Any, *,
    continue_on_error: bool, progress: bool, log: Log,
) -> tuple[int, bool]:
    """Single points on ``todo`` [(system_id, config_id, atoms)], each written to ``dft_sp`` as it
    finishes (a failure with its message as ``dft_error``, also in events.jsonl). Returns (number
    run, whether it stopped at an error)."""
    from tqdm.auto import tqdm

    n = 0
    for sid, cid, atoms in tqdm(todo, desc="DFT single points", unit="sp", disable=not progress):
        d = single_point(atoms, dft_calc)
        store.write("dft_sp", sid, cid, d.atoms if d.atoms is not None else atoms,
                    {"run_id": run_id, "dft_energy": d.energy, "dft_ok": d.energy is not None,
                     "scf_steps": d.scf_steps, "ionic_steps": d.ionic_steps, "dft_error": d.error}, {})
        n += 1
        if d.error is not None:
            store.log_event(event="dft_error", stage="dft_sp", run_id=run_id, system_id=sid, config_id=cid,
                            error=d.error)
            log(f"DFT single point {sid}/{cid} failed: {d.error}")
            if not continue_on_error:
                return n, True
    return n, False


def dft_errors(store: RunStore) -> dict[str, str]:
    """Every failed DFT single point in the store: ``"<system_id>/<config_id>"`` → message."""
    return {f"{r.system_id}/{r.config_id}": r.get("dft_error") or "failed (no message recorded)"
            for r in store.rows("dft_sp") if not r.get("dft_ok", r.get("dft_energy") is not None)}


def run_workflow(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    ml_calculator: Any | None = None,
    dft_calculator: Any | None = None,
    plots: bool = True,
    progress: bool = True,
    log: Log = print,
    continue_on_dft_error: bool = False,
) -> RunSummary:
    """Run (or resume) the AdsorbML workflow for ``cfg`` in ``out_dir``.

    ``ml_calculator`` / ``dft_calculator`` override the calculators named in ``cfg`` (e.g. an
    already loaded model); the names in ``cfg`` still label the run and guard resuming.
    A DFT single point that raises stops the DFT work (single points and ground truth) unless
    ``continue_on_dft_error``; the failures are in :attr:`RunSummary.dft_errors` either way.
    """
    from tqdm.auto import tqdm

    from adsorbml.energies import build_scheme

    cfg.check()
    # build the calculators first: a bad model or calculator fails before any work is done
    ml_calc = ml_calculator if ml_calculator is not None else make_ml_calculator(cfg.ml_calculator)
    dft_calc = dft_calculator if dft_calculator is not None else make_dft_calculator(cfg.dft_calculator)
    cfg = resolve_energy_settings(cfg, ml_calc, dft_calc)
    store = RunStore(out_dir)
    # the gas references (a resumed run keeps its stored ones), recorded with the run config
    previous = (store.config or {}).get("energy_scheme")
    scheme = build_scheme(cfg.references, cfg.ml_energy_convention, ml_calc, dft_calc, previous)
    run_id = store.begin_run(dict(cfg.to_dict(), energy_scheme=scheme.to_dict()), cfg.fingerprint())
    out = store.directory
    if run_id > 1:
        log(f"resuming {out} (run {run_id}): finished work in {store.path.name} is kept")

    # 1. slabs (stored rows win, so a resumed run uses exactly the same structures)
    slabs: dict[str, SlabRecord] = {}
    new_rows = []
    for rec in _build_slabs(cfg):
        row = store.get("slab", rec.slab_id, "slab")
        if row is None:
            new_rows.append(("slab", rec.slab_id, "slab", rec.atoms, {"run_id": run_id},
                             {"info": json.loads(json.dumps(rec.info))}))
            slabs[rec.slab_id] = rec
        else:
            slabs[rec.slab_id] = _slab_from_row(row)
    store.write_many(new_rows)

    # 2. placements, one transaction per system
    systems: list[_System] = []
    pairs = [(sid, a) for sid in slabs for a in cfg.adsorbates]
    for slab_id, ads in tqdm(pairs, desc="placements", unit="system", disable=not progress):
        name = as_adsorbate(ads).name
        sid = system_id_for(slab_id, name)
        if store.count("placement", system_id=sid):
            pl = [_placement_from_row(r) for r in store.rows("placement", sid)]
        else:
            pl = generate_placements(slabs[slab_id], name, num_random=cfg.num_random, heuristic=cfg.heuristic,
                                     seed=cfg.seed)
            store.write_many([
                ("placement", sid, p.config_id, p.atoms, {"run_id": run_id, "site_kind": p.site_kind,
                                                          "slab_id": slab_id, "adsorbate": name},
                 p.metadata()) for p in pl
            ])
        systems.append(_System(sid, slab_id, name, pl))
    if len({s.system_id for s in systems}) != len(systems):
        raise InputError("two systems share an id; use distinct slab ids / adsorbates")
    n_placements = sum(len(s.placements) for s in systems)

    # 3.-4. ML relaxations: clean slabs, then every placement
    ml_done = store.done("ml")
    pending = [(s.system_id, p.config_id, p.atoms) for s in systems for p in s.placements
               if (s.system_id, p.config_id) not in ml_done]
    slab_pending = [(i, "slab", slabs[i].atoms) for i in slabs if store.get("slab_ml", i, "slab") is None]
    ml_seconds = 0.0
    if pending or slab_pending:
        _relax_into_store(store, run_id, "slab_ml", slab_pending, ml_calc, fmax=cfg.fmax, steps=cfg.steps,
                          max_atoms=cfg.max_atoms, progress=False, verdict=_slab_energy("ml_energy"))
    if pending:
        ref = {i: store.get("slab_ml", i, "slab").toatoms() for i in slabs}
        ml_verdict = _verdict(systems, ref, cfg.checks, "ml_energy")
        log(f"ML relaxations: {len(pending)} to run, {len(ml_done)} already in the store")
        ml_seconds = _relax_into_store(store, run_id, "ml", pending, ml_calc, fmax=cfg.fmax, steps=cfg.steps,
                                       max_atoms=cfg.max_atoms, progress=progress, verdict=ml_verdict)
        store.update_run(run_id, ml_seconds=ml_seconds, ml_relaxations=len(pending))

    # 5. DFT single points: the ML-relaxed clean slabs (E_ads reference without ground truth),
    #    then the top k of every system
    dft_now, stopped = 0, False
    if dft_calc is not None:
        dft_done = store.done("dft_sp")
        todo: list[tuple[str, str, Atoms]] = []
        if not cfg.ground_truth:
            todo += [(i, "slab", store.get("slab_ml", i, "slab").toatoms()) for i in slabs
                     if (i, "slab") not in dft_done]
        for s in systems:
            ranked = rank_valid([ml_result(r) for r in store.rows("ml", s.system_id)], cfg.k)
            todo += [(s.system_id, r.config_id, r.atoms) for r in ranked if (s.system_id, r.config_id) not in dft_done]
        dft_now, stopped = _dft_single_points(store, run_id, todo, dft_calc, continue_on_error=continue_on_dft_error,
                                              progress=progress, log=log)

    # 6. ground truth: DFT relaxations of the clean slabs and of every placement
    gt_now = 0
    if cfg.ground_truth and not stopped:
        gt_done = store.done("gt")
        gt_pending = [(s.system_id, p.config_id, p.atoms) for s in systems for p in s.placements
                      if (s.system_id, p.config_id) not in gt_done]
        slab_gt_pending = [(i, "slab", slabs[i].atoms) for i in slabs if store.get("slab_gt", i, "slab") is None]
        if gt_pending or slab_gt_pending:
            _relax_into_store(store, run_id, "slab_gt", slab_gt_pending, dft_calc, fmax=cfg.gt_fmax,
                              steps=cfg.gt_steps, max_atoms=cfg.max_atoms, progress=False,
                              verdict=_slab_energy("gt_energy"))
        if gt_pending:
            gref = {i: store.get("slab_gt", i, "slab").toatoms() for i in slabs}
            gt_verdict = _verdict(systems, gref, cfg.checks, "gt_energy")
            log(f"ground-truth (DFT) relaxations: {len(gt_pending)} to run")
            _relax_into_store(store, run_id, "gt", gt_pending, dft_calc, fmax=cfg.gt_fmax, steps=cfg.gt_steps,
                              max_atoms=cfg.max_atoms, progress=progress, verdict=gt_verdict)
            gt_now = len(gt_pending)

    files, table, answers = collect_outputs(store, cfg, [s.system_id for s in systems], plots=plots)
    errors = dft_errors(store)
    store.update_run(run_id, finished=time.time(), dft_errors=len(errors))
    return RunSummary(out, run_id, [s.system_id for s in systems], n_placements, len(pending),
                      n_placements - len(pending), dft_now, gt_now, ml_seconds, files, table, answers,
                      errors, stopped)


def _slab_energy(key: str) -> Callable[[str, str, Any], dict]:
    """Row values of a clean-slab relaxation: its energy (eV) under ``key``."""

    def verdict(sid: str, cid: str, r: Any) -> dict:
        e = float(r.energy)
        return {key: e if math.isfinite(e) else None, "energy_ok": math.isfinite(e)}

    return verdict


# --------------------------------------------------------------------------- export


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, k: int | None = None, vasp: bool = True,
) -> list[Path]:
    """Top-k VASP inputs + extxyz of a finished (or partial) run, from its store.

    Writes to ``out`` (default ``<run_dir>/export``); ``k`` defaults to the run's k.
    With ``vasp``, each ML-relaxed clean slab is exported too, as ``<out>/<slab_id>/slab``
    (its single point is the DFT clean-slab energy of E_ads(ML+DFT); ``adsorbml import`` maps it
    back). Returns the VASP calculation directories, clean slabs first (also in ``paths.txt``;
    see :func:`adsorbml.export.export_top_k`).
    """
    store = RunStore(run_dir, create=False)
    cfg = store.config or {}
    k = int(k if k is not None else cfg.get("k", 5))
    ranked: dict[str, list[MLResult]] = {}
    for row in store.rows("ml"):
        ranked.setdefault(row.system_id, []).append(ml_result(row))
    if not ranked:
        raise InputError(f"{store.path} has no finished ML relaxations yet")
    dest = Path(out) if out is not None else store.directory / "export"
    paths = export_top_k(ranked, dest, k=k, vasp=vasp)
    if vasp:
        slabs = [write_vasp_inputs(r.toatoms(), dest / r.system_id / "slab", single_point=True)
                 for r in store.rows("slab_ml")]
        paths = slabs + paths
        atomic_write_text(dest / "paths.txt", "".join(f"{p}\n" for p in paths))
    return paths

"""``adsorbml import RUN_DIR EXPORT_DIR``: finished VASP single points back into a run.

The export tree written by ``adsorbml export`` (``<export>/<system_id>/<config_id>/`` for the
top-k placements, ``<export>/<slab_id>/slab/`` for the ML-relaxed clean slabs) is read with
:func:`adsorbml.vasp_import.scan_export_dir`. Each finished, electronically converged single
point becomes a ``dft_sp`` row of the run (``dft_energy`` = σ→0 energy in eV, ``scf_steps`` =
SCF steps summed over ionic steps and ``ionic_steps``: the compute cost of AdsorbML's speedup;
``dft_source``: the file read), and the run's outputs (results, summary, energies, metrics,
plots) are rewritten from the store with adsorption energies.

Directories that cannot be used are reported by name with the reason: no output, unfinished,
not converged, failed, missing (listed in paths.txt), or not matching the run (no such placement
or clean slab, other atoms). A row the store already holds is kept, never overwritten.
The import registers itself as one more run of the store (``runs[-1]["command"] = "import"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adsorbml.records import single_point_values
from adsorbml.single_points import SinglePoint
from adsorbml.store import RunStore
from adsorbml.vasp_import import scan_export_dir, split_name

__all__ = ["ImportReport", "import_single_points"]


@dataclass
class ImportReport:
    """What an import did. ``imported`` / ``kept``: name → {"energy" (eV), "scf_steps",
    "ionic_steps", "source"}; ``problems``: name → reason; ``files``/``table``/``answers`` as
    returned by :func:`adsorbml.outputs.collect_outputs`."""

    run_dir: Path
    export_dir: Path
    imported: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    table: str | None = None
    answers: list = field(default_factory=list)


def _run_config(store: RunStore) -> Any:
    from adsorbml.workflow import RunConfig

    cfg = dict(store.config or {})
    cfg.pop("energy_scheme", None)
    return RunConfig.from_dict(cfg)


def _target(store: RunStore, system_id: str, config_id: str) -> Any:
    """The row a single point belongs to: the ML-relaxed placement, or the ML-relaxed clean slab."""
    if config_id == "slab":
        return store.get("slab_ml", system_id, "slab")
    return store.get("ml", system_id, config_id)


def import_single_points(
    run_dir: str | os.PathLike, export_dir: str | os.PathLike, *, plots: bool = True,
) -> ImportReport:
    """Read the finished single points below ``export_dir`` into the run in ``run_dir`` and
    rewrite its outputs. Never raises for an unusable directory: see ``report.problems``."""
    from adsorbml.outputs import collect_outputs

    store = RunStore(run_dir, create=False)
    cfg = _run_config(store)
    scan = scan_export_dir(export_dir)  # a missing export directory fails before anything is recorded
    run_id = store.begin_run(store.config or {}, store.metadata.get("fingerprint"))
    store.update_run(run_id, command="import", export_dir=str(export_dir))
    rep = ImportReport(store.directory, Path(export_dir), problems=dict(scan.problems))
    for name, res in sorted(scan.results.items()):
        sid, cid = split_name(name)
        row = _target(store, sid, cid)
        if row is None:
            rep.problems[name] = f"not in the run: no ML-relaxed {'clean slab' if cid == 'slab' else 'placement'} {name}"
            continue
        ref = row.toatoms()
        if ref.get_chemical_symbols() != res.atoms.get_chemical_symbols():
            rep.problems[name] = (f"mismatch: {res.source.name} holds {res.atoms.get_chemical_formula()} in another "
                                  f"order or composition than the run's {ref.get_chemical_formula()}")
            continue
        atoms = res.atoms.copy()
        atoms.set_tags(ref.get_tags())
        atoms.calc = res.atoms.calc
        info = {"energy": res.energy, "scf_steps": res.scf_steps_total, "ionic_steps": res.ionic_steps,
                "source": str(res.source)}
        sp = SinglePoint(res.energy, res.scf_steps_total, res.ionic_steps)
        _, written = store.write("dft_sp", sid, cid, atoms, dict(single_point_values(sp, run_id), dft_source=str(res.source)),
                                 {"vasp": res.to_dict()})
        (rep.imported if written else rep.kept)[name] = info
        store.log_event(event="import", stage="dft_sp", run_id=run_id, system_id=sid, config_id=cid,
                        written=written, energy=res.energy, scf_steps=res.scf_steps_total, source=str(res.source))
    for name, why in sorted(rep.problems.items()):
        store.log_event(event="import_problem", run_id=run_id, name=name, reason=why)
    system_ids = list(dict.fromkeys(r.system_id for r in store.rows("placement")))
    rep.files, rep.table, rep.answers = collect_outputs(store, cfg, system_ids, plots=plots)
    store.update_run(run_id, imported=len(rep.imported), import_problems=len(rep.problems))
    return rep

"""OC20-Dense targets/compute/results files: validation, reading, writing.

Three nested-dict formats (the same layout as the OC20-Dense files; energies in eV):

* **targets** — ground truth, ``{system_id: [(config_id, E_DFT), ...]}``: the energy of every
  valid DFT relaxation of every placement of the system. Only the minimum per system is used.
* **compute** — ground-truth DFT cost, ``{system_id: {config_id: {"scf": n, "ionic": n}}}``.
  A ``"surface"`` entry (the clean-slab relaxation) is allowed and never counted, because
  both the brute-force and the ML-accelerated route need it.
* **results** — the ML-accelerated route,
  ``{system_id: {config_id: {"ml_energy": E_ML, "ml+dft_energy": E_DFT_SP,
  "scf_steps": n, "ionic_steps": n}}}``: one entry per *valid* (non-anomalous) ML-relaxed
  placement. ``ml+dft_energy`` is the DFT single point on the ML-relaxed structure, or
  ``None`` if it was not run / failed. Step counts may be ``None`` when unknown.

Energies in targets and results must share one reference (total or adsorption energy).
The metrics on these files are in :mod:`adsorbml.metrics`.

Files: ``.json`` (optionally ``.json.gz``) is the default interchange format. ``.pkl`` is
read and written for compatibility with the OC20-Dense / dense_eval.py files; unpickling
runs code from the file, so only read pickles you trust.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

from adsorbml.errors import FormatError

__all__ = [
    "Targets",
    "Compute",
    "Results",
    "read_targets",
    "write_targets",
    "read_compute",
    "write_compute",
    "read_results",
    "write_results",
    "validate_targets",
    "validate_compute",
    "validate_results",
]

Targets = dict[str, list[tuple[str, float]]]
Compute = dict[str, dict[str, dict[str, int]]]
Results = dict[str, dict[str, dict[str, Any]]]

_RESULT_KEYS = ("ml_energy", "ml+dft_energy", "scf_steps", "ionic_steps")


def _finite(x: Any) -> bool:
    """True for a real, finite number (not None, str, bytes or bool)."""
    if x is None or isinstance(x, (str, bytes, bool)):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- validation


def validate_targets(targets: Any) -> Targets:
    """Check the targets layout; returns it unchanged or raises :class:`FormatError`."""
    if not isinstance(targets, Mapping):
        raise FormatError(f"targets must be a dict system_id -> [(config_id, energy), ...], got {type(targets).__name__}")
    for sid, entries in targets.items():
        if not isinstance(entries, (list, tuple)) or not entries:
            raise FormatError(f"targets[{sid!r}] must be a non-empty list of (config_id, energy)")
        for item in entries:
            if not isinstance(item, (list, tuple)) or len(item) != 2 or not _finite(item[1]):
                raise FormatError(f"targets[{sid!r}] entry {item!r} is not (config_id, finite energy)")
    return targets


def validate_compute(compute: Any) -> Compute:
    """Check the compute layout; returns it unchanged or raises :class:`FormatError`."""
    if not isinstance(compute, Mapping):
        raise FormatError("compute must be a dict system_id -> {config_id: {'scf': n, 'ionic': n}}")
    for sid, configs in compute.items():
        if not isinstance(configs, Mapping):
            raise FormatError(f"compute[{sid!r}] must be a dict config_id -> {{'scf', 'ionic'}}")
        for cid, steps in configs.items():
            if not isinstance(steps, Mapping) or not {"scf", "ionic"} <= set(steps):
                raise FormatError(f"compute[{sid!r}][{cid!r}] must have keys 'scf' and 'ionic', got {steps!r}")
    return compute


def validate_results(results: Any) -> Results:
    """Check the results layout; returns it unchanged or raises :class:`FormatError`."""
    if not isinstance(results, Mapping):
        raise FormatError("results must be a dict system_id -> {config_id: {'ml_energy', 'ml+dft_energy', ...}}")
    for sid, configs in results.items():
        if not isinstance(configs, Mapping):
            raise FormatError(f"results[{sid!r}] must be a dict config_id -> entry")
        for cid, e in configs.items():
            if not isinstance(e, Mapping) or "ml_energy" not in e:
                raise FormatError(f"results[{sid!r}][{cid!r}] must be a dict with at least 'ml_energy', got {e!r}")
            unknown = set(e) - set(_RESULT_KEYS)
            if unknown:
                raise FormatError(
                    f"results[{sid!r}][{cid!r}] has unknown keys {sorted(unknown)}; allowed: {list(_RESULT_KEYS)}"
                )
    return results


# --------------------------------------------------------------------------- file I/O


def _dump(obj: Any, path: str | os.PathLike) -> Path:
    from eqv2_calc.io import atomic_write, atomic_write_text

    path = Path(path)
    name = path.name.lower()
    if name.endswith(".pkl") or name.endswith(".pickle"):
        def _write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(obj, f)

        return atomic_write(path, _write)
    if name.endswith(".json.gz"):
        def _write(tmp: str) -> None:  # the gzip header names the target, not the temporary file
            with open(tmp, "wb") as raw, gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw) as f:
                f.write(json.dumps(obj, indent=1).encode("utf-8"))

        return atomic_write(path, _write)
    if name.endswith(".json"):
        return atomic_write_text(path, json.dumps(obj, indent=1))
    raise FormatError(f"unknown file type {path.name!r}; use .json, .json.gz or .pkl")


def _load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    name = path.name.lower()
    if name.endswith(".pkl") or name.endswith(".pickle"):
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 — OC20-Dense compatibility, trusted files only
    if name.endswith(".json.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    if name.endswith(".json"):
        return json.loads(path.read_text())
    raise FormatError(f"unknown file type {path.name!r}; use .json, .json.gz or .pkl")


def _plain(x: Any) -> Any:
    """numpy scalars → Python numbers, so JSON can hold them."""
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


def write_targets(path: str | os.PathLike, targets: Targets) -> Path:
    """Write targets; each system's list is written in ascending energy (as OC20-Dense)."""
    validate_targets(targets)
    out = {
        str(s): [[str(c), float(_plain(e))] for c, e in sorted(v, key=lambda ce: (float(ce[1]), str(ce[0])))]
        for s, v in targets.items()
    }
    if str(path).lower().endswith((".pkl", ".pickle")):
        out = {s: [tuple(ce) for ce in v] for s, v in out.items()}
    return _dump(out, path)


def read_targets(path: str | os.PathLike) -> Targets:
    """Read targets from .json/.json.gz/.pkl as ``{system_id: [(config_id, energy), ...]}``."""
    raw = validate_targets(_load(path))
    return {str(s): [(str(c), float(e)) for c, e in v] for s, v in raw.items()}


def write_compute(path: str | os.PathLike, compute: Compute) -> Path:
    """Write ground-truth DFT cost."""
    validate_compute(compute)
    out = {
        str(s): {str(c): {"scf": _plain(v["scf"]), "ionic": _plain(v["ionic"])} for c, v in cfg.items()}
        for s, cfg in compute.items()
    }
    return _dump(out, path)


def read_compute(path: str | os.PathLike) -> Compute:
    """Read ground-truth DFT cost ``{system_id: {config_id: {"scf", "ionic"}}}``."""
    raw = validate_compute(_load(path))
    return {
        str(s): {str(c): {"scf": _plain(v["scf"]), "ionic": _plain(v["ionic"])} for c, v in cfg.items()}
        for s, cfg in raw.items()
    }


def write_results(path: str | os.PathLike, results: Results) -> Path:
    """Write results, each system's entries inserted in ascending ML energy.

    The sorted insertion keeps files usable by ``dense_eval.py``; :mod:`adsorbml.metrics`
    does not rely on it. Entries without a finite ML energy are written last.
    """
    from adsorbml.metrics import sorted_results  # at call time: adsorbml.metrics imports this module

    validate_results(results)
    out: dict[str, dict[str, dict]] = {}
    for sid, cfg in results.items():
        ranked = sorted_results(cfg)
        ranked_ids = {c for c, _ in ranked}
        rest = [(str(c), dict(e)) for c, e in cfg.items() if str(c) not in ranked_ids]
        out[str(sid)] = {
            c: {k: _plain(e.get(k)) for k in _RESULT_KEYS} for c, e in ranked + rest
        }
    return _dump(out, path)


def read_results(path: str | os.PathLike) -> Results:
    """Read results ``{system_id: {config_id: {"ml_energy", "ml+dft_energy", ...}}}``."""
    raw = validate_results(_load(path))
    return {
        str(s): {str(c): {k: _plain(e.get(k)) for k in _RESULT_KEYS} for c, e in cfg.items()}
        for s, cfg in raw.items()
    }

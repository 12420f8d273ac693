"""Resuming runs: which settings a stored result was made with, and whether they still hold.

One convention for every resumable command (``eqv2 relax``, ``eqv2 train``, ``adsorbml run``):

* each command names, in an explicit **allow-list**, the settings that determine its results
  (potential, thresholds, optimizer and training hyper-parameters, seeds, inputs, ...).
  Execution settings — device, batch sizes and atom/edge budgets, threads, progress bars,
  logging/checkpoint intervals, output paths — are not in it, so a run can be resumed with
  other execution settings. A new option must be added to the allow-list or to the
  command's list of execution settings (a test checks every option is in one of them);
* the selected settings are recorded as plain JSON next to the results, with the sha256 of
  their canonical JSON (:func:`settings_sha256`);
* on resume :func:`check_settings` (or :func:`check_or_record` for a JSON file) compares
  the stored and the current selection and raises an error that lists every differing key
  (stored value → current value) and how to proceed (same settings, another output
  directory, or delete the old one).

:func:`structure_fingerprint` is the per-structure counterpart (which input a stored
relaxation belongs to).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from eqv2_calc.errors import Eqv2Error

__all__ = [
    "SettingsMismatchError", "canonical_json", "settings_sha256", "select_settings", "settings_diff",
    "check_settings", "check_or_record", "structure_fingerprint",
]


class SettingsMismatchError(Eqv2Error, ValueError):
    """Stored results were made with other result-determining settings than the current ones."""


def _plain(value: Any) -> Any:
    """JSON-able form: tuples → lists, numpy scalars/arrays → Python, paths → str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def canonical_json(obj: Any) -> str:
    """Canonical JSON of ``obj``: sorted keys, no whitespace, floats as Python's shortest
    round-trip repr, tuples as lists, non-finite floats as ``NaN``/``Infinity``."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def settings_sha256(settings: Mapping[str, Any]) -> str:
    """sha256 (hex) of :func:`canonical_json` of ``settings``."""
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()


def select_settings(values: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The allow-listed ``keys`` of ``values`` as plain JSON values (in the order of ``keys``).

    A key missing from ``values`` is a programming error (``KeyError``): the allow-list and
    the settings object must agree."""
    return {k: _plain(values[k]) for k in keys}


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(not recorded)"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return json.dumps(_plain(value), sort_keys=True, ensure_ascii=False)


def settings_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored, current)}`` for every key whose canonical JSON differs, over the keys of
    both (a key only one side has appears with the other side absent)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in list(current) + [k for k in stored if k not in current]:
        old, new = stored.get(key, _ABSENT), current.get(key, _ABSENT)
        if old is _ABSENT or new is _ABSENT or canonical_json(old) != canonical_json(new):
            out[key] = (old, new)
    return out


def check_settings(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    where: str,
    hint: str = "use another output directory, or delete the old one to start over",
    assume: Mapping[str, Any] | None = None,
    error: type[Exception] = SettingsMismatchError,
) -> None:
    """Raise ``error`` if ``stored`` (the recorded selection; None: nothing recorded, always
    fine) differs from ``current`` in any key.

    ``assume``: values for keys that files written by older versions did not record (the value
    that was in effect then), so those files stay resumable. The message reads
    ``cannot resume: <where> holds results made with other settings: key: stored → current;
    ...; rerun with the same settings, or <hint>``.
    """
    if stored is None:
        return
    old = {**dict(assume or {}), **dict(stored)}
    diff = settings_diff(old, current)
    if diff:
        changes = "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, (a, b) in diff.items())
        raise error(
            f"cannot resume: {where} holds results made with other settings ({changes}; stored → current); "
            f"rerun with the same settings, or {hint}"
        )


def check_or_record(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
    where: str | None = None,
    hint: str = "use another output directory, or delete the old one to start over",
    assume: Mapping[str, Any] | None = None,
    error: type[Exception] = SettingsMismatchError,
) -> dict[str, Any]:
    """Check ``settings`` against the JSON file ``path`` if it exists, then (re)write it.

    The file holds ``{"settings": {...}, "settings_sha256": "...", **extra}`` (``extra``:
    informational entries such as the input file name, not compared). A mismatch raises
    ``error`` (see :func:`check_settings`; ``where`` defaults to the file's directory) and
    leaves the file untouched. Returns the recorded dict.
    """
    from eqv2_calc.io import atomic_write_text

    path = Path(path)
    current = _plain(dict(settings))
    if path.exists():
        try:
            old = json.loads(path.read_text())
            stored = old["settings"]
        except (ValueError, KeyError, TypeError) as exc:
            raise error(
                f"cannot resume: {path} is not a settings file this version reads ({exc}); {hint}"
            ) from None
        check_settings(stored, current, where=where or str(path.parent), hint=hint, assume=assume, error=error)
    record = {**_plain(dict(extra or {})), "settings": current, "settings_sha256": settings_sha256(current)}
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


def structure_fingerprint(atoms: Any, fix_tag0: bool = False) -> str:
    """sha256 of what determines the relaxation of one structure: atomic numbers, positions,
    cell, pbc and the free-atom mask (:func:`eqv2_calc.relax.constraints.free_mask`)."""
    from eqv2_calc.relax.constraints import free_mask

    h = hashlib.sha256()
    for arr in (atoms.numbers.astype(np.int64), atoms.get_positions().astype(np.float64),
                np.asarray(atoms.get_cell(), dtype=np.float64), atoms.get_pbc().astype(bool),
                free_mask(atoms, fix_tag0=fix_tag0)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()

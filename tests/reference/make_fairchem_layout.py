"""Record the checkpoint layout fairchem-core 1.10 requires, as data for the normal tests.

Runs inside the fairchem reference venv (../shared/reference/setup_refvenv.sh), never in the
project venv's tests:

    /tmp/eqv2-refvenv/bin/python tests/reference/make_fairchem_layout.py
        → writes tests/data/fairchem_layout.json

For each model configuration (the tiny ones of tests/test_checkpoint_save.py and the
published 31M architecture) it writes a checkpoint with the project's own
``save_fairchem_checkpoint`` and records:

* ``model_attributes``: the file's ``config.model_attributes`` — what fairchem's
  ``EquiformerV2(**model_attributes)`` is built from;
* ``state_dict``: ``[key, shape, dtype]`` of fairchem's own module built from those attributes,
  in its order, with the ``module.module.`` prefix of the official files — exactly what the
  strict ``load_state_dict`` of ``OCPCalculator`` requires;
* ``constructor_parameters``: the keyword parameters of fairchem's ``EquiformerV2``;
* for the tiny configurations (seeded weights, ``state_dict_sha256``): fairchem's
  ``OCPCalculator`` energies and raw forces on two structures (``fairchem_results``) and the
  values of the value-sensitive required entries in that file (``required_values``).

For the first tiny configuration it then loads the file with ``OCPCalculator`` (strict) and
removes, one at a time, every entry except the state_dict, at every depth (subtrees first;
the children of a removable subtree are not tried): an entry without which fairchem fails to
load, or computes other energies/forces, is **required**. Those paths and their value types
are recorded as ``required``, with the value for strings and booleans whose change alone
also breaks loading or changes the results. The normal test
(tests/test_checkpoint_save.py::test_written_checkpoint_has_the_layout_fairchem_requires)
checks files written by ``save_fairchem_checkpoint`` against all of this without fairchem.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_reference import DATA, _strip, import_project  # noqa: E402

_SMALL = dict(max_radius=12.0, max_neighbors=20, grid_resolution=18)
TINY = {  # keep in sync with tests/test_checkpoint_save.py::TINY
    "l4m2": dict(num_layers=1, sphere_channels=16, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
                 attn_value_channels=4, ffn_hidden_channels=16, lmax=4, mmax=2, edge_channels=8, **_SMALL),
    "l6m3": dict(num_layers=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
                 attn_value_channels=4, ffn_hidden_channels=8, lmax=6, mmax=3, edge_channels=8, **_SMALL),
    "l3m3_oc22": dict(num_layers=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
                      attn_value_channels=4, ffn_hidden_channels=8, lmax=3, mmax=3, edge_channels=8,
                      enforce_max_neighbors_strictly=False, use_energy_lin_ref=True, **_SMALL),
}
SEED = 3
STRUCTURE = "Cu111_CO"
EVALUATED = ("Cu111_CO", "NaCl_bulk")  # fairchem's numbers for the tiny files, shipped as data


def _type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "tensor"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict",
            type(None): "null", tuple: "list"}.get(type(value), type(value).__name__)


def _evaluate(path: str, atoms):
    import numpy as np
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    calc = OCPCalculator(checkpoint_path=path, cpu=True, seed=0)
    a = atoms.copy()
    a.calc = calc
    return float(a.get_potential_energy()), np.asarray(calc.results["forces"], dtype=float).copy()


def _paths(d: dict, prefix: tuple = ()):
    """Nested paths, parents before children (model_attributes is recorded whole)."""
    for key, value in d.items():
        path = prefix + (key,)
        yield path
        if isinstance(value, dict) and key != "model_attributes":
            yield from _paths(value, path)


def _without(ckpt: dict, path: tuple, replace=None) -> dict:
    """A copy of ``ckpt`` without the entry at ``path`` (or with it set to ``replace``)."""
    out = {k: (v if k == "state_dict" else copy.deepcopy(v)) for k, v in ckpt.items()}
    node = out
    for k in path[:-1]:
        node = node[k]
    if replace is None:
        del node[path[-1]]
    else:
        node[path[-1]] = replace
    return out


def _same_results(ckpt: dict, path: tuple, atoms, workdir: str, e0, f0, replace=None) -> tuple[bool, str]:
    import numpy as np
    import torch

    trial = os.path.join(workdir, "knockout.pt")
    torch.save(_without(ckpt, path, replace), trial)
    try:
        e, f = _evaluate(trial, atoms)
    except Exception as exc:  # noqa: BLE001 - any failure means the entry is needed
        return False, f"{type(exc).__name__}: {str(exc)[:120]}"
    same = abs(e - e0) < 1e-6 and np.allclose(f, f0, rtol=0, atol=1e-5)
    return same, "" if same else f"energy {e:.6f} vs {e0:.6f}"


def required_entries(path: str, atoms, workdir: str) -> list[dict]:
    import torch

    e0, f0 = _evaluate(path, atoms)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    candidates = []
    for key, value in ckpt.items():
        if key == "state_dict":
            continue
        candidates.append((key,))
        if isinstance(value, dict):
            candidates += [(key,) + p for p in _paths(value)]
    required, removable = [], []
    for cand in candidates:
        if any(cand[: len(r)] == r for r in removable):
            continue  # a removable parent: its children are removable too
        same, why = _same_results(ckpt, cand, atoms, workdir, e0, f0)
        if same:
            removable.append(cand)
            continue
        node = ckpt
        for k in cand:
            node = node[k]
        entry = {"path": list(cand), "type": _type(node), "why": why}
        if isinstance(node, (str, bool)):  # does the value matter, or only the entry?
            other = (not node) if isinstance(node, bool) else node + "_changed"
            value_free, why_value = _same_results(ckpt, cand, atoms, workdir, e0, f0, replace=other)
            if not value_free:
                entry["value"] = node
                entry["why_value"] = why_value
        required.append(entry)
        print(f"required: {'.'.join(cand)} ({why})", flush=True)
    return required


def _dumps(obj, indent: int = 0) -> str:
    """JSON with one line per list of scalars / state_dict entry (a reviewable diff)."""
    pad, inner = " " * indent, " " * (indent + 1)
    flat = isinstance(obj, list) and all(not isinstance(v, (dict, list)) or
                                         (isinstance(v, list) and all(not isinstance(w, (dict, list)) for w in v))
                                         for v in obj)
    if not isinstance(obj, (dict, list)) or flat and len(json.dumps(obj)) < 100:
        return json.dumps(obj)
    if isinstance(obj, dict):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + pad + "}" if obj else "{}"
    body = ",\n".join(inner + _dumps(v, indent + 1) for v in obj)
    return "[\n" + body + "\n" + pad + "]" if obj else "[]"


def main() -> int:
    import fairchem.core
    import torch
    from ase.io import read
    from fairchem.core.models.equiformer_v2 import EquiformerV2 as FairchemEquiformerV2

    logging.disable(logging.WARNING)
    random_init = import_project()
    from eqv2_calc.checkpoint.save import save_fairchem_checkpoint
    from eqv2_calc.model import EquiformerV2Config

    names = json.loads((DATA / "structure_names.json").read_text())
    structures = dict(zip(names, read(DATA / "structures.extxyz", ":")))
    atoms = structures[STRUCTURE]
    params = [p for p in inspect.signature(FairchemEquiformerV2.__init__).parameters if p != "self"]
    record: dict = {
        "fairchem_version": fairchem.core.__version__,
        "torch_version": torch.__version__,
        "made_by": "tests/reference/make_fairchem_layout.py",
        "constructor_parameters": params,
        "configs": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {name: EquiformerV2Config(**fields) for name, fields in TINY.items()}
        configs["31M"] = random_init.SIZES["31M"]
        for name, cfg in configs.items():
            path = os.path.join(tmp, f"{name}.pt")
            save_fairchem_checkpoint(random_init.make_random_model(cfg, SEED), path)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            attrs = dict(ckpt["config"]["model_attributes"])
            with torch.random.fork_rng(devices=[]):
                fresh = FairchemEquiformerV2(**attrs)
            layout = [["module.module." + k, list(v.shape), str(v.dtype).replace("torch.", "")]
                      for k, v in fresh.state_dict().items()]
            file_keys = [_strip(k) for k in ckpt["state_dict"]]
            assert sorted(file_keys) == sorted(k for k, _ in fresh.state_dict().items()), name
            record["configs"][name] = {
                "eqv2_config": {k: v for k, v in cfg.to_dict().items()},
                "model_attributes": attrs,
                "state_dict": layout,
            }
            print(f"{name}: {len(layout)} state_dict entries", flush=True)
            if name == "l4m2":
                record["required"] = required_entries(path, atoms, tmp)
                record["required_from"] = f"{name}, seed {SEED}, structure {STRUCTURE}"
            if name in TINY:  # the file loads in fairchem: record its values and fairchem's results
                record["configs"][name]["seed"] = SEED
                record["configs"][name]["state_dict_sha256"] = random_init.state_dict_sha256(path)
                results = {}
                for sname in EVALUATED:
                    e, f = _evaluate(path, structures[sname])
                    results[sname] = {"energy": e, "forces": f.tolist()}
                record["configs"][name]["fairchem_results"] = results
                values = {}
                for req in record["required"]:
                    if "value" in req:  # the value in this file (accepted by fairchem just now)
                        node = ckpt
                        for k in req["path"]:
                            node = node[k]
                        values[".".join(req["path"])] = node
                record["configs"][name]["required_values"] = values
    record["seconds"] = round(time.perf_counter() - t0, 1)
    out = DATA / "fairchem_layout.json"
    out.write_text(_dumps(record) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

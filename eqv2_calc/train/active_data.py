"""Active-learning data: teacher labels on the structures a model visits when it relaxes.

A distilled model fails where its own relaxations take it. The teacher's paths do not go
there: the worst held-out relaxations of eqv2-7net-small v2 ran to the 300-step limit and
drifted to geometries unlike any training frame. One round of this module (DAgger-style) takes
a base data set of :mod:`eqv2_calc.train.distill_data` and a model trained on it, and does this:

1. **starts**: for every *training* adsorbate system, the ``n_starts`` placements that follow
   the ones the base data used (:func:`~eqv2_calc.train.distill_data.ordered_placements`),
   after skipping ``first_start`` (a later round, e.g. ``first_start=1`` after a round with
   ``n_starts=1``, relaxes new starts). Validation and test systems stay unseen;
2. **ML relaxations**: the model relaxes all starts with batched L-BFGS (fmax ``fmax`` eV/Å,
   ≤ ``steps`` steps; the AdsorbML step limit by default). It keeps ``frames`` frames evenly
   spaced over each trajectory (first and last included), with the model's view in ``info``:
   ``ml_energy`` (eV), ``ml_step``, ``ml_reason``;
3. **labels**: the teacher labels those frames (``kind="ml-path"``, split "train"). Frames
   whose teacher forces are non-finite or larger than ``max_force`` eV/Å are dropped, and the
   manifest counts them.

The output is ``OUT/train.extxyz``, to be added to the training files, and ``OUT/manifest.json``
(options, the model's sha256, counts, ML outcomes).

Each stage is resumable. A start's picked frames are written to ``OUT/ml/<start>.extxyz`` as
soon as its relaxation finishes, and a system's labels to ``OUT/jobs/<system>.extxyz``
(+ ``.json``). A killed run skips what is finished. One caveat: a resumed run batches the
remaining starts differently, so their trajectories can differ from an uninterrupted run's at
float round-off.

Command line::

    python -m eqv2_calc.train.active_data OUT_DIR --base runs/distill-data --checkpoint MODEL.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from eqv2_calc.errors import InputError
from eqv2_calc.io import atomic_write, atomic_write_text

ACTIVE_DEFAULTS: dict[str, Any] = dict(n_starts=2, first_start=0, frames=6, fmax=0.05, steps=300, save_every=5,
                                       max_force=100.0)
"""Options of one round (see module docstring); ``save_every``: the trajectory is sampled
every that many steps before the ``frames`` are picked."""


def active_options(base: dict, checkpoint_sha256: str, **options: Any) -> dict:
    """The options of a round on base data options ``base`` with the model of that sha256
    (recorded in ``manifest.json``; a different set in an existing directory is refused).
    ``first_start`` is recorded only when it is not 0, so rounds made before the option existed
    keep their recorded options."""
    unknown = set(options) - set(ACTIVE_DEFAULTS)
    if unknown:
        raise InputError(f"unknown active-learning options {sorted(unknown)}; known: {sorted(ACTIVE_DEFAULTS)}")
    opts = {**ACTIVE_DEFAULTS, **options}
    for key, low in (("n_starts", 1), ("first_start", 0), ("frames", 2), ("steps", 1), ("save_every", 1)):
        if not isinstance(opts[key], int) or opts[key] < low:
            raise InputError(f"{key} must be an integer >= {low}, got {opts[key]!r}")
    for key in ("fmax", "max_force"):
        if not opts[key] > 0:
            raise InputError(f"{key} must be > 0 eV/Å, got {opts[key]!r}")
    if opts["first_start"] == 0:
        del opts["first_start"]
    return {**opts, "base": base, "checkpoint_sha256": checkpoint_sha256}


def start_name(system: str, k: int) -> str:
    """File stem of start ``k`` of ``system``, e.g. "Pt-111-CO-s0"."""
    return f"{system}-s{k}"


def training_systems(base: dict) -> list[tuple[str, str, str]]:
    """(metal, facet, adsorbate) of the training adsorbate systems of base options ``base``, in job order."""
    from eqv2_calc.train.distill_data import job_list

    return [j["system"] for j in job_list(base) if j["kind"] == "system" and j["split"] == "train" and j["system"][2]]


def training_starts(base: dict, n_starts: int, limit: int | None = None, first_start: int = 0) -> list[Atoms]:
    """The new starts ``first_start`` … ``first_start + n_starts − 1`` of the training adsorbate
    systems of base options ``base`` (the first ``limit`` systems), in job order. ``info``: the
    base metadata plus ``placement``, ``start`` (that index), ``start_name``."""
    from eqv2_calc.train.distill_data import build_slab, ordered_placements, sub_seed, system_name

    out = []
    for metal, facet, ads in training_systems(base)[:limit]:
        name = system_name(metal, facet, ads)
        rng = np.random.default_rng(sub_seed(base["seed"], name))
        placements = ordered_placements(build_slab(metal, facet), ads, name, base, rng)
        first = base["n_initial"] + 1 + first_start  # the base data used the first n_initial + 1
        for k, p in enumerate(placements[first:first + n_starts], start=first_start):
            a = p.atoms.copy()
            a.info.update(system=name, metal=metal, facet=facet, adsorbate=ads, split="train",
                          placement=p.config_id, start=k, start_name=start_name(name, k))
            out.append(a)
    return out


def _picks(n: int, k: int) -> np.ndarray:
    """Up to ``k`` evenly spaced indices of ``range(n)``, 0 and n−1 included."""
    return np.unique(np.round(np.linspace(0, n - 1, num=min(k, n))).astype(int))


def relax_starts(out: Path, starts: list[Atoms], calc: Any, opts: dict, progress: bool = True) -> None:
    """Stage 2: relax the starts without ``out/ml/<start>.extxyz`` with ``calc`` (fmax
    ``opts["fmax"]`` eV/Å, ≤ ``opts["steps"]``) and write their picked frames (positions Å,
    ``info["ml_energy"]`` eV; no calculator attached)."""
    from eqv2_calc.relax import relax_batch

    ml_dir = out / "ml"
    ml_dir.mkdir(parents=True, exist_ok=True)
    todo = [a for a in starts if not (ml_dir / f"{a.info['start_name']}.extxyz").is_file()]
    every = opts["save_every"]

    def on_result(r) -> None:
        traj = r.trajectory
        frames = []
        for i in _picks(len(traj), opts["frames"]):
            a = traj[i].copy()
            a.info.update(ml_energy=float(traj[i].get_potential_energy()),
                          ml_step=int(r.nsteps if i == len(traj) - 1 else i * every),
                          ml_reason=r.reason.split(":")[0], kind="ml-path", frame=int(i))
            a.calc = None
            frames.append(a)
        atomic_write(ml_dir / f"{r.name}.extxyz", lambda tmp: write(tmp, frames, format="extxyz"))

    if todo:
        relax_batch(todo, calc, fmax=opts["fmax"], steps=opts["steps"], names=[a.info["start_name"] for a in todo],
                    save_every=every, on_result=on_result, progress=progress)


def _label_job(job: dict) -> dict:
    """Teacher labels of one system's ML frames (in a teacher worker)."""
    from eqv2_calc.train.distill_data import label

    t0 = time.perf_counter()
    frames, dropped = [], 0
    for a in job["frames"]:
        info = {k: v for k, v in a.info.items() if k != "start_name"}
        f = label(a, **info)
        forces = f.get_forces(apply_constraint=False)
        if np.isfinite(f.get_potential_energy()) and np.isfinite(forces).all() \
                and np.linalg.norm(forces, axis=1).max() <= job["max_force"]:
            frames.append(f)
        else:
            dropped += 1
    return {"name": job["name"], "frames": frames, "dropped": dropped, "seconds": round(time.perf_counter() - t0, 2)}


def label_frames(out: Path, starts: list[Atoms], opts: dict, workers: int, threads: int, progress: bool) -> list[str]:
    """Stage 3: teacher-label (energy eV, raw forces eV/Å) the ML frames of ``starts`` (relaxed
    by :func:`relax_starts`), one job per system without ``out/jobs/<system>.json``, in
    ``workers`` processes; returns the systems in order."""
    from tqdm.auto import tqdm

    from eqv2_calc.train.distill_data import run_teacher_jobs

    jobs_dir = out / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    by_system: dict[str, list[str]] = {}
    for a in starts:
        by_system.setdefault(a.info["system"], []).append(a.info["start_name"])
    systems = list(by_system)
    todo = []
    for s, names in by_system.items():
        if not (jobs_dir / f"{s}.json").is_file():
            frames = [f for n in names for f in read(out / "ml" / f"{n}.extxyz", index=":")]
            todo.append({"name": s, "frames": frames, "max_force": opts["max_force"]})

    def done(res: dict) -> None:
        name = res["name"]
        atomic_write(jobs_dir / f"{name}.extxyz", lambda tmp: write(tmp, res["frames"], format="extxyz"))
        meta = {"name": name, "frames": len(res["frames"]), "dropped": res["dropped"], "seconds": res["seconds"]}
        atomic_write_text(jobs_dir / f"{name}.json", json.dumps(meta))  # last: marks the job finished

    bar = tqdm(total=len(systems), initial=len(systems) - len(todo), desc=f"teacher {opts['base']['teacher']}",
               disable=not progress)
    run_teacher_jobs(todo, _label_job, done, opts["base"]["teacher"], workers, threads, bar)
    bar.close()
    return systems


def generate_active_dataset(out_dir: str | Path, base_dir: str | Path, checkpoint: str | Path, *, workers: int = 2,
                            threads: int = 1, progress: bool = True, limit: int | None = None,
                            **options: Any) -> dict:
    """One active-learning round (see module docstring) into ``out_dir``; returns the manifest.

    ``base_dir``: a data set of :mod:`~eqv2_calc.train.distill_data` (its ``manifest.json``
    gives the systems, split and teacher); ``checkpoint``: the model that relaxes;
    ``limit``: only the first that many training systems (tests and trials)."""
    from eqv2_calc.calculator import EquiformerV2Calculator
    from eqv2_calc.train.distill_data import claim_directory

    out, base_dir = Path(out_dir), Path(base_dir)
    mbase = base_dir / "manifest.json"
    if not mbase.is_file():
        raise InputError(f"{base_dir} holds no distillation data (no manifest.json); "
                         f"run: python -m eqv2_calc.train.distill_data {base_dir}")
    base = json.loads(mbase.read_text())["options"]
    calc = EquiformerV2Calculator(checkpoint_path=str(checkpoint), device="cpu")
    opts = active_options(base, calc.metadata["sha256"], **options)
    claim_directory(out, opts, "a round with other options or another model")
    t0 = time.perf_counter()
    starts = training_starts(base, opts["n_starts"], limit, opts.get("first_start", 0))
    relax_starts(out, starts, calc, opts, progress)
    systems = label_frames(out, starts, opts, workers, threads, progress)
    return assemble(out, systems, opts, time.perf_counter() - t0, limit)


def assemble(out: Path, systems: list[str], opts: dict, seconds: float, limit: int | None) -> dict:
    """Concatenate the labelled systems into ``out/train.extxyz`` and write the manifest."""
    frames, dropped, secs = [], 0, 0.0
    for s in systems:
        meta = json.loads((out / "jobs" / f"{s}.json").read_text())
        dropped += meta["dropped"]
        secs += meta["seconds"]
        if meta["frames"]:  # all frames of a system can be dropped: its file is then empty
            frames += read(out / "jobs" / f"{s}.extxyz", index=":")
    atomic_write(out / "train.extxyz", lambda tmp: write(tmp, frames, format="extxyz"))
    final: dict[tuple[str, int], Atoms] = {}  # per start, its last labelled frame (the ML end point)
    for f in frames:
        key = (f.info["system"], int(f.info["start"]))
        if key not in final or f.info["frame"] > final[key].info["frame"]:
            final[key] = f
    last = [f for f in final.values() if f.info["ml_step"] > 0]
    reasons: dict[str, int] = {}
    for f in last:
        reasons[f.info["ml_reason"]] = reasons.get(f.info["ml_reason"], 0) + 1
    err = [abs(f.info["ml_energy"] - f.get_potential_energy()) for f in last]
    manifest = {
        "options": opts, "limit": limit, "systems": len(systems), "frames": len(frames), "atoms": int(sum(map(len, frames))),
        "dropped_frames": dropped, "ml_outcomes": reasons,
        "ml_final_energy_error": {"mean": round(float(np.mean(err)), 4), "max": round(float(np.max(err)), 4)} if err else None,
        "teacher_seconds": round(secs, 1), "wall_seconds": round(seconds, 1),
        "sha256": hashlib.sha256((out / "train.extxyz").read_bytes()).hexdigest(),
        "complete": limit is None,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqv2_calc.train.active_data", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--base", required=True, help="the distillation data set (python -m eqv2_calc.train.distill_data)")
    p.add_argument("--checkpoint", required=True, help="the model that relaxes (trained on --base)")
    p.add_argument("--workers", type=int, default=2, help="teacher processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per teacher process")
    p.add_argument("--limit", type=int, help="only the first N training systems (trials)")
    for k, v in ACTIVE_DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args(argv)
    m = generate_active_dataset(args.out_dir, args.base, args.checkpoint, workers=args.workers, threads=args.threads,
                                limit=args.limit, **{k: getattr(args, k) for k in ACTIVE_DEFAULTS})
    print(json.dumps({k: m[k] for k in ("systems", "frames", "dropped_frames", "ml_outcomes", "ml_final_energy_error",
                                        "wall_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Distillation data: teacher-labelled frames from the structures AdsorbML actually relaxes.

The teacher (:mod:`eqv2_calc.train.teacher`, SevenNet) labels every frame; the geometries
come from the product's own pipeline:

* slabs: :func:`adsorbml.inputs.slabs_from_bulk` with the OC20 settings (≥ 8 Å in-plane, 7 Å
  slab, 20 Å vacuum, subsurface fixed, tags 0/1/2), for every metal of :data:`SURFACES` and its
  facets (in-plane sizes from 2×3 to 4×3 surface cells, 27–54 metal atoms);
* placements: :func:`adsorbml.placements.generate_placements` (heuristic + random sites, its
  orientations and heights), a seeded subset of :data:`ADSORBATES` per surface.

Per (metal, facet, adsorbate) *system*, seeded by its name:

* ``initial``: ``n_initial`` placements as generated (the starting points of AdsorbML, with
  the largest forces a model meets), and ``n_rattle`` copies rattled by N(0, σ²) on the free
  atoms (σ = 0.05, 0.1 Å);
* ``path``: one more placement relaxed by the teacher (ASE LBFGS, fmax ``relax_fmax`` eV/Å,
  ≤ ``relax_steps`` steps): ``path_frames`` frames spread geometrically over the trajectory
  (denser at the start, where forces are large; first and last included). The start and the
  teacher's relaxed energy go to ``relaxations.extxyz`` (for the relax-and-compare benchmark).

Per surface the clean slab (rattled start, teacher-relaxed: path + 2 rattled frames) and, once,
the gas molecules of the OC20 references and adsorbates (H2, H2O, CO, N2, O2, CH4, NH3 in a
20 Å box without periodicity, as :meth:`adsorbml.references.GasReferences.computed` relaxes them).

Split **by system** (:func:`eqv2_calc.train.emt_data.split_systems`, seeded hash): val and
test systems are unseen (metal, facet, adsorbate) combinations. Test frames are written as
``test_initial.extxyz`` (the held-out initial placements) and ``test_paths.extxyz`` (held-out
relaxation paths). Clean slabs and molecules go to training.

``complement=True`` labels the other adsorbates of every surface instead (the systems that
choice left out), all for training and without gas molecules or clean slabs: more training
systems for a data set of the same seed, whose split stays as it is. ``new_surfaces=True``
labels the facets of :data:`NEW_SURFACES` (other facets of the same metals, with their clean
slabs), all for training.

Resumable: each system is one job written atomically to ``OUT/jobs/<name>.extxyz`` (+ ``.json``)
as soon as it is labelled; a killed run skips finished jobs. ``OUT/manifest.json`` records the
options; the assembled split files are rewritten at the end. Stop a run with Ctrl-C or a
SIGTERM to the parent: its spawned workers notice within a second that the parent is gone and
exit (their unfinished jobs are done by the next run). Deterministic for fixed options
and teacher (the number of worker processes does not change the output).

Command line::

    python -m eqv2_calc.train.distill_data OUT_DIR [--workers 2] [--seed 0]
    python -m eqv2_calc.train.distill_data OUT_DIR --complement --n-initial 10 --n-rattle 4 --path-frames 0
    python -m eqv2_calc.train.distill_data OUT_DIR --new-surfaces
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms
from ase.io import read, write

from eqv2_calc.errors import InputError
from eqv2_calc.io import atomic_write, atomic_write_text, frame_with_results
from eqv2_calc.relax.constraints import fixed_atoms
from eqv2_calc.train.emt_data import split_systems
from eqv2_calc.train.teacher import DEFAULT_TEACHER

SURFACES: dict[str, tuple[tuple[int, int, int], ...]] = {
    **{m: ((1, 1, 1), (1, 0, 0), (2, 1, 1)) for m in ("Pt", "Pd", "Ni", "Cu", "Ag", "Au", "Rh", "Ir", "Al")},
    "Ru": ((0, 0, 1), (1, 0, 0), (1, 0, 1)),
}
"""Metal → Miller indices of its slabs (fcc bulk from ``ase.build.bulk``; Ru hcp)."""

NEW_SURFACES: dict[str, tuple[tuple[int, int, int], ...]] = {
    **{m: ((3, 1, 1), (2, 1, 0)) for m in ("Pt", "Pd", "Ni", "Cu", "Ag", "Au", "Rh", "Ir", "Al")},
    "Ru": ((1, 1, 0), (1, 0, 2)),
}
"""Further facets of the same metals (``new_surfaces=True``; 24–72 atoms), none of them in
:data:`SURFACES`: training systems on surfaces the base data has not seen."""

ADSORBATES: tuple[str, ...] = ("*H", "*O", "*OH", "*CO", "*C", "*N", "*CH3", "*CHO", "*NH2", "*COH")
"""Adsorbates sampled from (built-in geometries of :mod:`adsorbml.adsorbates`)."""

MOLECULES: tuple[str, ...] = ("H2", "H2O", "CO", "N2", "O2", "CH4", "NH3")
RATTLE_SIGMAS: tuple[float, ...] = (0.05, 0.1)
MOLECULE_BOX = 20.0


def generation_options(
    seed: int = 0, teacher: str = DEFAULT_TEACHER, ads_per_surface: int = 5, n_initial: int = 6, n_rattle: int = 3,
    path_frames: int = 10, relax_fmax: float = 0.05, relax_steps: int = 60, num_random: int = 20,
    complement: bool = False, new_surfaces: bool = False,
) -> dict:
    """The options that determine a data set (recorded in ``manifest.json``).

    ``complement``: label the systems that the ``ads_per_surface`` choice of ``seed`` leaves
    out (the other adsorbates of every surface), all for training, without gas molecules and
    clean slabs: more training systems for the data set of the same ``seed`` and
    ``ads_per_surface`` whose split, and held-out systems, stay as they are. It is recorded
    only when set, so data made before the option existed keep their recorded options.
    ``new_surfaces``: the systems of :data:`NEW_SURFACES` instead (with their clean slabs, all
    for training, no gas molecules); recorded only when set.
    ``path_frames=0``: no teacher relaxation (initial and rattled frames only)."""
    counts = dict(ads_per_surface=(ads_per_surface, 1), n_initial=(n_initial, 1), n_rattle=(n_rattle, 0),
                  path_frames=(path_frames, 0), relax_steps=(relax_steps, 1), num_random=(num_random, 0))
    for key, (value, low) in counts.items():
        if not isinstance(value, int) or value < low:
            raise InputError(f"{key} must be an integer >= {low}, got {value!r}")
    if complement and ads_per_surface >= len(ADSORBATES):
        raise InputError(f"complement needs ads_per_surface < {len(ADSORBATES)} (else no system is left out)")
    opts = dict(seed=seed, teacher=teacher, ads_per_surface=ads_per_surface, n_initial=n_initial, n_rattle=n_rattle,
                path_frames=path_frames, relax_fmax=relax_fmax, relax_steps=relax_steps, num_random=num_random)
    return {**opts, **({"complement": True} if complement else {}), **({"new_surfaces": True} if new_surfaces else {})}


def sub_seed(seed: int, *parts: str) -> int:
    """A 32-bit seed derived from ``seed`` and the names ``parts`` (CRC32; stable across runs and platforms)."""
    return zlib.crc32(":".join([str(seed), *parts]).encode())


def facet_name(miller: Sequence[int]) -> str:
    """Miller index (h, k, l) → facet label, e.g. (2, 1, 1) → "211"."""
    return "".join(str(int(x)) for x in miller)


def systems(seed: int = 0, ads_per_surface: int = 5, complement: bool = False,
            new_surfaces: bool = False) -> list[tuple[str, str, str]]:
    """(metal, facet, adsorbate) of every adsorbate system: per surface of :data:`SURFACES`
    (``new_surfaces``: of :data:`NEW_SURFACES`) a seeded choice of ``ads_per_surface`` of
    :data:`ADSORBATES` (fixed order); ``complement``: the others."""
    if not 1 <= ads_per_surface <= len(ADSORBATES):
        raise InputError(f"ads_per_surface must be in 1..{len(ADSORBATES)}, got {ads_per_surface}")
    out = []
    for metal, millers in (NEW_SURFACES if new_surfaces else SURFACES).items():
        for hkl in millers:
            facet = facet_name(hkl)
            rng = np.random.default_rng(sub_seed(seed, metal, facet, "adsorbates"))
            pick = set(rng.choice(len(ADSORBATES), size=ads_per_surface, replace=False).tolist())
            out += [(metal, facet, a) for i, a in enumerate(ADSORBATES) if (i in pick) != complement]
    return out


def system_name(metal: str, facet: str, adsorbate: str) -> str:
    """Job / system name, e.g. ("Pt", "111", "*CO") → "Pt-111-CO"; adsorbate "" → "Pt-111-clean"."""
    return f"{metal}-{facet}-{adsorbate.lstrip('*') or 'clean'}"


def build_slab(metal: str, facet: str):
    """The OC20-style slab record of ``metal`` ``facet`` (first termination)."""
    from ase.build import bulk

    from adsorbml.inputs import slabs_from_bulk

    known = [(m, h) for table in (SURFACES, NEW_SURFACES) for m, hs in table.items() for h in hs]
    hkl = next((h for m, h in known if m == metal and facet_name(h) == facet), None)
    if hkl is None:
        raise InputError(f"no surface {metal}({facet}); known: {sorted((m, facet_name(h)) for m, h in known)}")
    return slabs_from_bulk(bulk(metal), hkl, max_slabs=1)[0]


# --------------------------------------------------------------------------- labelling

_TEACHER: Any = None


def _init_worker(teacher: str, threads: int) -> None:
    global _TEACHER
    import torch

    from eqv2_calc.train.teacher import make_teacher

    torch.set_num_threads(threads)
    _TEACHER = make_teacher(teacher)


def _exit_with(parent: int) -> None:
    """Poll once a second; end this process as soon as ``parent`` is no longer its parent."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_pool_worker(teacher: str, threads: int, parent: int) -> None:
    """:func:`_init_worker` in a pool process of ``parent``; the process also exits once
    ``parent`` is gone (a pool's workers would otherwise outlive a SIGTERM or SIGKILL to it)."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
    _init_worker(teacher, threads)


def label(atoms: Atoms, **info) -> Atoms:
    """``atoms`` with the teacher's energy (eV) and raw forces (eV/Å) and ``info`` (in a teacher worker)."""
    a = atoms.copy()
    a.calc = _TEACHER
    e = float(a.get_potential_energy())
    f = a.get_forces(apply_constraint=False)
    return frame_with_results(atoms, e, f, info=info)


def _rattled(atoms: Atoms, sigma: float, rng: np.random.Generator) -> Atoms:
    a = atoms.copy()
    free = ~fixed_atoms(a)
    a.positions[free] += rng.normal(scale=sigma, size=(int(free.sum()), 3))
    return a


def _path_picks(n: int, k: int) -> np.ndarray:
    """Up to ``k`` indices of ``range(n)``, geometrically spaced (dense at the start), 0 and n−1 included."""
    if n <= k:
        return np.arange(n)
    picks = np.unique(np.round(np.geomspace(1, n, num=k)).astype(int) - 1)
    return np.unique(np.concatenate([[0], picks, [n - 1]]))


def _teacher_relax(atoms: Atoms, fmax: float, steps: int, path_frames: int, **info) -> tuple[list[Atoms], Atoms, bool, int]:
    """Teacher-relax ``atoms``: (path frames, relaxed frame, converged, steps)."""
    from ase.optimize import LBFGS

    work = atoms.copy()
    work.calc = _TEACHER
    traj: list[tuple[np.ndarray, float, np.ndarray]] = []

    def record() -> None:
        traj.append((work.get_positions(), float(work.get_potential_energy()), work.get_forces(apply_constraint=False)))

    opt = LBFGS(work, logfile=None, maxstep=0.2)
    opt.attach(record, interval=1)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    frames = []
    for k in _path_picks(len(traj), path_frames):
        a = atoms.copy()
        a.positions = traj[k][0]
        frames.append(frame_with_results(a, traj[k][1], traj[k][2], info={**info, "kind": "path", "frame": int(k)}))
    relaxed = atoms.copy()
    relaxed.positions = traj[-1][0]
    relaxed = frame_with_results(relaxed, traj[-1][1], traj[-1][2], info=info)
    return frames, relaxed, converged, opt.nsteps


def relax_job(job: dict) -> Atoms:
    """Teacher-relax ``job["atoms"]`` (ASE LBFGS, fmax ``job["fmax"]`` eV/Å, ≤ ``job["steps"]``;
    in a teacher worker): the relaxed frame with its labels, ``info`` as given plus
    ``teacher_converged`` and ``teacher_steps`` (replacing any earlier ``teacher_*`` entries).
    A module-level job for :func:`run_teacher_jobs`."""
    atoms = job["atoms"].copy()
    atoms.info = {k: v for k, v in atoms.info.items() if not k.startswith("teacher_")}
    _, relaxed, converged, n = _teacher_relax(atoms, job["fmax"], job["steps"], 2)
    relaxed.info.update(teacher_converged=converged, teacher_steps=n)
    return relaxed


def ordered_placements(slab, adsorbate: str, name: str, opts: dict, rng: np.random.Generator) -> list:
    """The placements of ``adsorbate`` on ``slab`` (heuristic + ``num_random`` random sites,
    seeded by ``name``) in the seeded order of system ``name``: the data set uses the first
    ``n_initial`` as initial frames and the next as the teacher's relaxation start, and
    :mod:`eqv2_calc.train.active_data` takes the following ones. ``rng`` is the system's
    generator (``np.random.default_rng(sub_seed(seed, name))``), advanced by the permutation."""
    from adsorbml.placements import generate_placements

    placements = generate_placements(slab, adsorbate, num_random=opts["num_random"], heuristic=True,
                                     seed=sub_seed(opts["seed"], name, "placements") % (2**31))
    return [placements[i] for i in rng.permutation(len(placements))]


def _system_job(job: dict) -> dict:
    """Label one system (see module docstring); returns {"frames": [...], "relaxation": Atoms | None, ...}."""
    o = job["options"]
    metal, facet, ads = job["system"]
    name = system_name(metal, facet, ads)
    rng = np.random.default_rng(sub_seed(o["seed"], name))
    meta = {"system": name, "metal": metal, "facet": facet, "adsorbate": ads or "clean", "split": job["split"]}
    t0 = time.perf_counter()
    slab = build_slab(metal, facet)
    frames: list[Atoms] = []
    relaxation = None
    if not ads:  # the clean slab: a rattled start relaxed by the teacher, plus rattled frames
        start = _rattled(slab.atoms, 0.05, rng)
        path, relaxed, conv, n = _teacher_relax(start, o["relax_fmax"], o["relax_steps"], o["path_frames"] // 2, **meta)
        frames += path
        frames += [label(_rattled(relaxed, s, rng), kind="rattle", frame=i, **meta) for i, s in enumerate(RATTLE_SIGMAS)]
    else:
        chosen = ordered_placements(slab, ads, name, o, rng)[: o["n_initial"] + 1]
        if len(chosen) < o["n_initial"] + 1:
            raise InputError(f"{name}: {len(chosen)} placements, fewer than n_initial + 1 = {o['n_initial'] + 1}; "
                             "raise num_random")
        for i, p in enumerate(chosen[:-1]):
            frames.append(label(p.atoms, kind="initial", frame=i, placement=p.config_id, **meta))
        for i in range(o["n_rattle"]):
            p = chosen[i % (len(chosen) - 1)]
            sigma = RATTLE_SIGMAS[i % len(RATTLE_SIGMAS)]
            frames.append(label(_rattled(p.atoms, sigma, rng), kind="rattle", frame=i, placement=p.config_id, **meta))
        p = chosen[-1]
        conv, n = False, 0
        if o["path_frames"]:
            path, relaxed, conv, n = _teacher_relax(p.atoms, o["relax_fmax"], o["relax_steps"], o["path_frames"],
                                                    placement=p.config_id, **meta)
            frames += path
            relaxation = p.atoms.copy()
            relaxation.info.update(meta, placement=p.config_id, teacher_relaxed_energy=relaxed.get_potential_energy(),
                                   teacher_converged=conv, teacher_steps=n)
    return {"name": name, "frames": frames, "relaxation": relaxation, "converged": conv, "steps": n,
            "seconds": round(time.perf_counter() - t0, 2)}


def _molecule_job(job: dict) -> dict:
    from ase.build import molecule

    o = job["options"]
    t0 = time.perf_counter()
    rng = np.random.default_rng(sub_seed(o["seed"], "molecules"))
    frames = []
    for m in MOLECULES:
        atoms = molecule(m)
        atoms.set_cell([MOLECULE_BOX] * 3)
        atoms.center()
        atoms.pbc = False
        meta = {"system": f"gas-{m}", "metal": "gas", "facet": "gas", "adsorbate": m, "split": "train"}  # no empty strings: extxyz
        start = _rattled(atoms, 0.05, rng)
        path, relaxed, _, _ = _teacher_relax(start, 0.01, 200, 4, **meta)
        frames += path
        frames += [label(_rattled(relaxed, s, rng), kind="rattle", frame=i, **meta) for i, s in enumerate(RATTLE_SIGMAS)]
    return {"name": "gas", "frames": frames, "relaxation": None, "converged": True, "steps": 0,
            "seconds": round(time.perf_counter() - t0, 2)}


def _run_job(job: dict) -> dict:
    return _molecule_job(job) if job["kind"] == "gas" else _system_job(job)


def job_list(opts: dict) -> list[dict]:
    """Every labelling job of ``opts`` in generation order: the gas molecules, the clean slabs,
    then the adsorbate systems interleaved by a seeded hash (so that a partial run covers every
    metal and facet). With ``complement``: only its adsorbate systems, all for training; with
    ``new_surfaces``: the clean slabs and adsorbate systems of the new surfaces, all for training."""
    complement, new = opts.get("complement", False), opts.get("new_surfaces", False)
    ads_systems = systems(opts["seed"], opts["ads_per_surface"], complement, new)
    mixed = sorted(ads_systems, key=lambda s: hashlib.sha256(f"{opts['seed']}:order:{'-'.join(s)}".encode()).hexdigest())
    if complement or new:
        which = dict.fromkeys(ads_systems, "train")
    else:
        which = {s: part for part, ss in split_systems(ads_systems, opts["seed"]).items() for s in ss}
    jobs = [{"kind": "system", "options": opts, "system": s, "split": which[s]} for s in mixed]
    if complement:
        return jobs
    clean = [{"kind": "system", "options": opts, "system": s, "split": "train"}
             for s in sorted({(m, f, "") for m, f, _ in ads_systems})]
    gas = [] if new else [{"kind": "gas", "options": opts, "system": None, "split": "train"}]
    return [*gas, *clean, *jobs]


def _job_name(job: dict) -> str:
    return "gas" if job["kind"] == "gas" else system_name(*job["system"])


def job_names(opts: dict) -> list[str]:
    """Names of :func:`job_list` (the files ``jobs/<name>.*``), in generation order."""
    return [_job_name(j) for j in job_list(opts)]


def run_teacher_jobs(jobs: Sequence[dict], run: Callable[[dict], dict], done: Callable[[dict], None], teacher: str,
                     workers: int, threads: int, bar) -> None:
    """``done(run(job))`` for every job, in ``workers`` spawned processes (each with the teacher
    loaded once and ``threads`` torch threads) or in this process for ``workers <= 1``; ``run``
    must be a module-level function (it is pickled). ``bar`` (tqdm) advances per finished job."""
    if not jobs:
        return
    if workers > 1:
        from eqv2_calc.train.teacher import require_teacher

        require_teacher(teacher)  # else a pool whose initializer fails respawns its workers forever
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(teacher, threads, os.getpid())) as pool:
            for res in pool.imap_unordered(run, jobs):
                done(res)
                bar.update()
    else:
        _init_worker(teacher, threads)
        for job in jobs:
            done(run(job))
            bar.update()


def _write_job(jobs_dir: Path, res: dict) -> None:
    name = res["name"]
    if res["relaxation"] is not None:
        atomic_write(jobs_dir / f"{name}.relax.extxyz", lambda tmp: write(tmp, res["relaxation"], format="extxyz"))
    atomic_write(jobs_dir / f"{name}.extxyz", lambda tmp: write(tmp, res["frames"], format="extxyz"))
    meta = {k: res[k] for k in ("name", "converged", "steps", "seconds")} | {"frames": len(res["frames"])}
    atomic_write_text(jobs_dir / f"{name}.json", json.dumps(meta))  # last: marks the job finished


LABELS_ARCHIVE = Path(__file__).resolve().parents[2] / "data" / "distill-jobs-7net-l3i5-seed0.tar.xz"
"""Finished labelling jobs of the default options (:func:`generation_options` with no
arguments), committed so that a retrain does not repeat the teacher work (~1.5 h of single-thread time); an archive of
``jobs/<name>.{extxyz,relax.extxyz,json}`` (in a repository checkout, not in the wheel)."""


def restore_labels(out_dir: str | Path, archive: str | Path = LABELS_ARCHIVE, folders: Sequence[str] = ("jobs",)) -> int:
    """Unpack the files of ``archive`` under ``folders`` (``jobs/``; an active-learning round of
    :mod:`eqv2_calc.train.active_data` also has ``ml/``) missing from ``out_dir``; returns how
    many files were added. Only for data generated with the archive's options."""
    import tarfile

    out = Path(out_dir)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    added = 0
    with tarfile.open(archive, "r:xz") as tar:
        for m in tar.getmembers():
            name = Path(m.name)
            if not m.isfile() or str(name.parent) not in folders or (out / name).exists():
                continue
            tar.extract(m, out, filter="data")
            added += 1
    return added


def claim_directory(out: Path, opts: dict, what: str) -> None:
    """Start (or continue) a run with options ``opts`` in ``out``: refuses a ``manifest.json``
    with other options (``what`` names them in the error), else records ``opts`` as incomplete."""
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    if mpath.is_file():
        have = json.loads(mpath.read_text()).get("options")
        if have != opts:
            raise InputError(f"{out} holds {what} ({have}); use another directory")
    atomic_write_text(mpath, json.dumps({"options": opts, "complete": False}, indent=1))


def generate_distill_dataset(out_dir: str | Path, *, workers: int = 2, threads: int = 1, progress: bool = True,
                             limit: int | None = None, **options: Any) -> dict:
    """Label everything (see module docstring) into ``out_dir``; returns the manifest.

    ``workers`` processes with ``threads`` torch threads each; ``limit`` labels only the first
    that many jobs (for tests and trials; the split files then hold what exists). Finished jobs
    in ``out_dir/jobs`` are kept; a different set of options in an existing ``manifest.json``
    is refused (use a new directory)."""
    from tqdm.auto import tqdm

    opts = generation_options(**options)
    out = Path(out_dir)
    jobs_dir = out / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    claim_directory(out, opts, "data generated with other options")
    jobs = job_list(opts)
    if limit is not None:
        jobs = jobs[:limit]
    names = [_job_name(j) for j in jobs]
    todo = [j for j, n in zip(jobs, names) if not (jobs_dir / f"{n}.json").is_file()]
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"teacher {opts['teacher']}", disable=not progress)
    run_teacher_jobs(todo, _run_job, lambda res: _write_job(jobs_dir, res), opts["teacher"], workers, threads, bar)
    bar.close()
    return assemble(out, names, opts, time.perf_counter() - t0, limit)


def finished_prefix(out_dir: str | Path, **options: Any) -> int:
    """How many jobs, in generation order, are finished in ``out_dir`` before the first
    unfinished one (pass it as ``limit`` to assemble a partial run deterministically)."""
    names = job_names(generation_options(**options))
    jobs_dir = Path(out_dir) / "jobs"
    return next((i for i, n in enumerate(names) if not (jobs_dir / f"{n}.json").is_file()), len(names))


def assemble(out: Path, names: Sequence[str], opts: dict, seconds: float, limit: int | None = None) -> dict:
    """Concatenate the finished jobs into the split files and write the manifest."""
    jobs_dir = out / "jobs"
    parts: dict[str, list[Atoms]] = {"train": [], "val": [], "test_initial": [], "test_paths": []}
    relaxations: list[Atoms] = []
    steps, conv, secs = [], [], 0.0
    for n in names:
        if not (jobs_dir / f"{n}.json").is_file():
            continue
        meta = json.loads((jobs_dir / f"{n}.json").read_text())
        secs += meta["seconds"]
        for f in read(jobs_dir / f"{n}.extxyz", index=":"):
            part = f.info["split"]
            if part == "test":
                part = "test_initial" if f.info["kind"] in ("initial", "rattle") else "test_paths"
            parts[part].append(f)
        rpath = jobs_dir / f"{n}.relax.extxyz"
        for r in read(rpath, index=":") if rpath.is_file() else []:
            relaxations.append(r)
            steps.append(r.info["teacher_steps"])
            conv.append(bool(r.info["teacher_converged"]))
    for part, frames in parts.items():
        atomic_write(out / f"{part}.extxyz", lambda tmp, fr=frames: write(tmp, fr, format="extxyz"))
    atomic_write(out / "relaxations.extxyz", lambda tmp: write(tmp, relaxations, format="extxyz"))
    by_split: dict[str, list[str]] = {}
    for r in relaxations:
        by_split.setdefault(r.info["split"], []).append(r.info["system"])
    manifest = {
        "options": opts, "limit": limit, "jobs": len(names),
        "complete": limit is None and all((jobs_dir / f"{n}.json").is_file() for n in names),
        "frames": {k: len(v) for k, v in parts.items()},
        "atoms": {k: int(sum(len(a) for a in v)) for k, v in parts.items()},
        "systems": by_split,
        "teacher_relaxations": {"count": len(steps), "converged": int(sum(conv)),
                                "mean_steps": round(float(np.mean(steps)), 1) if steps else None},
        "teacher_seconds": round(secs, 1), "wall_seconds": round(seconds, 1),
        "sha256": {p: hashlib.sha256((out / f"{p}.extxyz").read_bytes()).hexdigest() for p in parts},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqv2_calc.train.distill_data", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--workers", type=int, default=2, help="labelling processes (output does not depend on it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--limit", type=int, help="label only the first N jobs (trials)")
    d = generation_options()
    for k, v in d.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--complement", action="store_true",
                   help="the adsorbate systems the seed's choice leaves out, all for training (see generation_options)")
    p.add_argument("--new-surfaces", action="store_true",
                   help="the facets of NEW_SURFACES (clean slabs + adsorbate systems), all for training")
    p.add_argument("--finished-prefix", action="store_true",
                   help="label nothing new: assemble the jobs finished before the first unfinished one "
                        "(the same as --limit N with that N; recorded in manifest.json)")
    args = p.parse_args(argv)
    opts = {k: getattr(args, k) for k in (*d, "complement", "new_surfaces")}
    limit = finished_prefix(args.out_dir, **opts) if args.finished_prefix else args.limit
    m = generate_distill_dataset(args.out_dir, workers=args.workers, threads=args.threads, limit=limit, **opts)
    print(json.dumps({k: m[k] for k in ("frames", "teacher_relaxations", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

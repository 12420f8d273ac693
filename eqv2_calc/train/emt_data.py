"""Reference data from ASE's EMT calculator: metal slabs with small adsorbates.

EMT (effective medium theory, ``ase.calculators.emt``) has parameters for Al, Cu, Ag, Au,
Ni, Pd, Pt and (as "extra parameters - just for fun") H, C, N, O. It is a toy chemistry, but
it is fast, offline and deterministic, which makes it a good teacher for a demo model.

A *system* is one (metal, facet, adsorbate) combination; adsorbate ``"clean"`` is the bare
slab. For every system :func:`system_frames` builds a small slab (fcc111/fcc100 2×2×3,
fcc110 2×2×4, fcc211 3×2×3; 12–22 atoms, 6 Å vacuum each side, pbc T T F), fixes the bottom
third of the metal atoms with ``FixAtoms``, places the adsorbate over a seeded random surface
position at a bonding height, relaxes it with EMT + ASE BFGS, and keeps

* up to ``traj_frames`` frames spread over the relaxation trajectory (first and last included);
* ``rattles`` rattled copies (free atoms displaced by N(0, σ²), σ ∈ {0.03, 0.06, 0.1} Å, of
  the relaxed and of the initial structure);

and repeats this from ``starts`` different random positions (start 0 is the system's
benchmark start). Systems of the training split also get ``compressed`` frames per start:
the relaxed adsorbate moved rigidly towards its nearest metal atom until that distance is
65–90 % of the relaxed one (less if EMT forces would exceed 20 eV/Å). They show the model
the short-range repulsion that relaxation trajectories never visit (without them a model
may let an N atom pass through a Cu atom); they are a training device and are kept out of
val/test, whose frames stay the near-equilibrium distribution the model is used on.

Each frame is an ``ase.Atoms`` with a ``SinglePointCalculator`` (energy eV, forces eV/Å, raw
forces including those on fixed atoms), the ``FixAtoms`` constraint and ``info`` keys
``system`` ("Pt-111-CO"), ``metal``, ``facet``, ``adsorbate``, ``kind``
("traj"/"rattle"/"compressed"), ``start`` (0, 1, ...), ``frame``.

The split is **by system**: :func:`split_systems` assigns whole systems to train / val /
test with a seeded permutation, so no held-out (metal, facet, adsorbate) combination is ever
seen in training. The unrelaxed start of every system is written too (``starts.extxyz``), with
the EMT-relaxed energy in ``info["emt_relaxed_energy"]``, for relaxation benchmarks.

Command line::

    python -m eqv2_calc.train.emt_data OUT_DIR [--seed 0]      # or: eqv2 emt-data OUT_DIR

writes ``OUT_DIR/{train,val,test,starts}.extxyz`` and ``OUT_DIR/manifest.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.build import fcc100, fcc110, fcc111, fcc211
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import write
from ase.optimize import BFGS

from eqv2_calc.errors import InputError
from eqv2_calc.io import atomic_write, atomic_write_text, frame_with_results
from eqv2_calc.relax.constraints import fixed_atoms

METALS: tuple[str, ...] = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
FACETS: tuple[str, ...] = ("111", "100", "110", "211")
ADSORBATES: tuple[str, ...] = ("clean", "H", "O", "N", "C", "OH", "CO", "NH", "CH", "CH2", "CH3", "NO")
SLAB_SIZES: dict[str, tuple[int, int, int]] = {
    "111": (2, 2, 3), "100": (2, 2, 3), "110": (2, 2, 4), "211": (3, 2, 3),
}
RATTLE_SIGMAS: tuple[float, ...] = (0.03, 0.06, 0.1)
"""Å; standard deviations of the rattled frames (cycled)."""
COMPRESSION_RANGE: tuple[float, float] = (0.65, 0.9)
"""Range of (adsorbate–nearest metal distance) / (relaxed distance) of the compressed frames."""
MAX_COMPRESSED_FORCE = 20.0
"""eV/Å; compressed frames with a larger force component are compressed less (see
:func:`compressed_frame`), so a few extreme frames do not dominate the force loss and its
normalisation."""


def adsorbate_atoms(name: str) -> Atoms:
    """Gas-phase-like geometry of adsorbate ``name``; atom 0 binds to the surface (at the
    origin), the rest point away from the surface (+z). Positions in Å."""
    simple = {"H", "O", "N", "C"}
    if name in simple:
        return Atoms(name, positions=[[0.0, 0.0, 0.0]])
    diatomic = {"OH": 0.97, "CO": 1.15, "NH": 1.03, "CH": 1.10, "NO": 1.16}
    if name in diatomic:
        return Atoms(name, positions=[[0.0, 0.0, 0.0], [0.0, 0.0, diatomic[name]]])
    if name == "CH2":
        return Atoms("CH2", positions=[[0, 0, 0], [0.92, 0.0, 0.6], [-0.92, 0.0, 0.6]])
    if name == "CH3":
        ang = np.deg2rad([0.0, 120.0, 240.0])
        h = [[1.03 * np.cos(a), 1.03 * np.sin(a), 0.37] for a in ang]
        return Atoms("CH3", positions=[[0, 0, 0], *h])
    raise InputError(f"unknown adsorbate {name!r}; known: {', '.join(ADSORBATES[1:])}")


def build_slab(metal: str, facet: str) -> Atoms:
    """A small ``metal`` slab of ``facet`` (see module docstring) with its bottom third fixed."""
    if metal not in METALS:
        raise InputError(f"metal {metal!r} has no EMT parameters; choose from {METALS}")
    build = {"111": fcc111, "100": fcc100, "110": fcc110, "211": fcc211}
    if facet not in build:
        raise InputError(f"unknown facet {facet!r}; choose from {FACETS}")
    slab = build[facet](metal, size=SLAB_SIZES[facet], vacuum=6.0)
    z = slab.positions[:, 2]
    nfix = len(slab) // 3
    fixed = np.argsort(z, kind="stable")[:nfix]
    slab.set_constraint(FixAtoms(indices=sorted(fixed.tolist())))
    slab.set_tags(np.ones(len(slab), dtype=int))
    return slab


def place_adsorbate(slab: Atoms, name: str, rng: np.random.Generator) -> Atoms:
    """``slab`` + adsorbate ``name`` at a random (x, y) near the top-most metal atom, at the
    height where its binding atom is 2.0 Å (H: 1.8 Å) from the nearest metal atom."""
    out = slab.copy()
    if name == "clean":
        return out
    ads = adsorbate_atoms(name)
    top = out.positions[np.argmax(out.positions[:, 2])]
    cell = np.asarray(out.cell)
    xy = top[:2] + rng.uniform(-0.5, 0.5, size=2) @ cell[:2, :2] * 0.5
    target = 1.8 if ads.numbers[0] == 1 else 2.0
    # periodic images in-plane, to measure distances near cell edges
    images = np.concatenate(
        [out.positions + i * cell[0] + j * cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)]
    )
    lo, hi = top[2], top[2] + 4.0
    for _ in range(50):  # bisection on the height of the binding atom
        mid = 0.5 * (lo + hi)
        d = np.linalg.norm(images - np.array([xy[0], xy[1], mid]), axis=1).min()
        lo, hi = (mid, hi) if d < target else (lo, mid)
    ads.positions += np.array([xy[0], xy[1], hi])
    ads.set_tags(np.full(len(ads), 2))
    out += ads
    return out


def _with_results(atoms: Atoms, energy: float, forces: np.ndarray, **info) -> Atoms:
    return frame_with_results(atoms, energy, forces, info=info)


def _emt_frame(atoms: Atoms, **info) -> Atoms:
    calc_atoms = atoms.copy()
    calc_atoms.calc = EMT()
    energy = calc_atoms.get_potential_energy()
    forces = calc_atoms.get_forces(apply_constraint=False)
    return _with_results(atoms, energy, forces, **info)


def _seed(seed: int, *parts: str) -> int:
    return zlib.crc32(":".join([str(seed), *parts]).encode())


def _relax_frames(
    start: Atoms, rng: np.random.Generator, traj_frames: int, rattles: int, fmax: float, max_steps: int, meta: dict
) -> tuple[list[Atoms], Atoms, int]:
    """EMT-relax ``start``; returns (trajectory + rattled frames, relaxed structure, BFGS steps)."""
    work = start.copy()
    work.calc = EMT()
    traj: list[tuple[np.ndarray, float, np.ndarray]] = []

    def record() -> None:
        traj.append((work.get_positions(), work.get_potential_energy(), work.get_forces(apply_constraint=False)))

    opt = BFGS(work, logfile=None, maxstep=0.2)
    opt.attach(record, interval=1)
    opt.run(fmax=fmax, steps=max_steps)
    if not traj:
        record()
    picks = np.unique(np.linspace(0, len(traj) - 1, num=min(traj_frames, len(traj))).round().astype(int))
    frames = []
    for k in picks:
        pos, e, f = traj[k]
        a = start.copy()
        a.positions = pos
        frames.append(_with_results(a, e, f, kind="traj", frame=int(k), **meta))
    free = ~fixed_atoms(start)
    relaxed = start.copy()
    relaxed.positions = traj[-1][0]
    relaxed = _with_results(relaxed, traj[-1][1], traj[-1][2], **meta)
    for r in range(rattles):
        base = relaxed if r % 2 == 0 else start
        sigma = RATTLE_SIGMAS[r % len(RATTLE_SIGMAS)]
        a = base.copy()
        pos = a.get_positions()
        pos[free] += rng.normal(scale=sigma, size=(int(free.sum()), 3))
        a.positions = pos
        frames.append(_emt_frame(a, kind="rattle", frame=r, **meta))
    return frames, relaxed, opt.nsteps


def compressed_frame(relaxed: Atoms, rng: np.random.Generator, **info) -> Atoms | None:
    """``relaxed`` with its adsorbate (tag 2) moved rigidly towards the nearest metal atom so
    that their distance becomes a random fraction in :data:`COMPRESSION_RANGE` of the relaxed
    one; EMT-labelled. While the largest free-atom force exceeds
    :data:`MAX_COMPRESSED_FORCE` the move is halved (at most 4 times). ``None`` for a clean slab."""
    ads = np.flatnonzero(relaxed.get_tags() == 2)
    if len(ads) == 0:
        return None
    metal = np.flatnonzero(relaxed.get_tags() != 2)
    free = ~fixed_atoms(relaxed)
    d = relaxed.get_distances(ads[0], metal, mic=True, vector=True)
    near = d[np.argmin(np.linalg.norm(d, axis=1))]  # binding atom → nearest metal atom, Å
    shift = near * (1.0 - rng.uniform(*COMPRESSION_RANGE))
    for _ in range(5):
        a = relaxed.copy()
        a.positions[ads] += shift
        frame = _emt_frame(a, **info)
        if np.abs(frame.calc.results["forces"][free]).max() <= MAX_COMPRESSED_FORCE:
            break
        shift = 0.5 * shift
    return frame


@dataclass
class SystemData:
    """Frames of one system plus its unrelaxed start and EMT-relaxed energy (eV)."""

    name: str
    start: Atoms
    relaxed_energy: float
    frames: list[Atoms]


def system_frames(
    metal: str, facet: str, adsorbate: str, seed: int = 0, traj_frames: int = 6, rattles: int = 4,
    fmax: float = 0.05, max_steps: int = 150, starts: int = 1, compressed: int = 0,
) -> SystemData:
    """EMT frames of one system (see module docstring); deterministic in ``seed``.

    ``starts`` (≥ 1) random adsorbate positions, each relaxed with EMT + BFGS to ``fmax``
    (eV/Å, at most ``max_steps`` steps) and sampled (``traj_frames`` + ``rattles`` frames) and,
    if ``compressed`` > 0, that many compressed frames per start.
    ``SystemData.start``/``relaxed_energy`` (eV) are those of start 0."""
    _check_counts(starts=starts, traj_frames=traj_frames, rattles=rattles, compressed=compressed)
    name = f"{metal}-{facet}-{adsorbate}"
    meta = {"system": name, "metal": metal, "facet": facet, "adsorbate": adsorbate}
    slab = build_slab(metal, facet)
    frames: list[Atoms] = []
    for k in range(starts):
        rng = np.random.default_rng(_seed(seed, name) if k == 0 else _seed(seed, name, str(k)))
        start_k = place_adsorbate(slab, adsorbate, rng)
        new, relaxed, nsteps = _relax_frames(start_k, rng, traj_frames, rattles, fmax, max_steps, {**meta, "start": k})
        frames += new
        for c in range(compressed):
            frame = compressed_frame(relaxed, rng, kind="compressed", frame=c, start=k, **meta)
            if frame is not None:
                frames.append(frame)
        if k == 0:
            first, relaxed_energy, first_steps = start_k, relaxed.get_potential_energy(), nsteps
    start_out = first.copy()
    start_out.info.update(meta, emt_relaxed_energy=float(relaxed_energy), emt_relax_steps=first_steps)
    return SystemData(name=name, start=start_out, relaxed_energy=float(relaxed_energy), frames=frames)


def all_systems(
    metals: Sequence[str] = METALS, facets: Sequence[str] = FACETS, adsorbates: Sequence[str] = ADSORBATES
) -> list[tuple[str, str, str]]:
    """Every (metal, facet, adsorbate) combination, in a fixed order."""
    return [(m, f, a) for m in metals for f in facets for a in adsorbates]


def split_systems(
    systems: Sequence[tuple[str, str, str]], seed: int = 0, fractions: tuple[float, float] = (0.1, 0.15)
) -> dict[str, list[tuple[str, str, str]]]:
    """Assign whole systems to "train", "val" and "test" (fractions of val and test).

    Deterministic: systems are ordered by a seeded hash of their name, the first
    ``fractions[1]`` go to test, the next ``fractions[0]`` to val, the rest to train.
    """
    key = lambda s: hashlib.sha256(f"{seed}:{'-'.join(s)}".encode()).hexdigest()
    order = sorted(systems, key=key)
    n_test = int(round(fractions[1] * len(order)))
    n_val = int(round(fractions[0] * len(order)))
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def _check_counts(starts: int, traj_frames: int, rattles: int, compressed: int) -> None:
    if starts < 1 or traj_frames < 1 or rattles < 0 or compressed < 0:
        raise InputError(
            f"need starts >= 1, traj_frames >= 1, rattles >= 0 and compressed >= 0; got starts={starts}, "
            f"traj_frames={traj_frames}, rattles={rattles}, compressed={compressed}"
        )


def generation_options(seed: int = 0, traj_frames: int = 6, rattles: int = 4, starts: int = 2, compressed: int = 2) -> dict:
    """The options that determine a generated data set (recorded in ``manifest.json``)."""
    return {"seed": seed, "traj_frames": traj_frames, "rattles": rattles, "starts": starts, "compressed": compressed}


def _system_job(job: tuple[tuple[str, str, str], int], seed: int, traj_frames: int, rattles: int, starts: int) -> SystemData:
    sysdef, compressed = job
    return system_frames(*sysdef, seed=seed, traj_frames=traj_frames, rattles=rattles, starts=starts, compressed=compressed)


def generate_emt_dataset(
    out_dir: str | Path, seed: int = 0, traj_frames: int = 6, rattles: int = 4, starts: int = 2, compressed: int = 2,
    metals: Sequence[str] = METALS, facets: Sequence[str] = FACETS, adsorbates: Sequence[str] = ADSORBATES,
    progress: bool = True, workers: int = 1,
) -> dict:
    """Generate all systems, write ``{train,val,test,starts}.extxyz`` + ``manifest.json`` to
    ``out_dir``; returns the manifest (frame counts, systems per split, seconds).

    ``starts`` and ``compressed`` as in :func:`system_frames`; compressed frames are made for
    training systems only. ``workers`` > 1 generates systems in that many processes (same
    output: every system is seeded on its own)."""
    from tqdm.auto import tqdm

    _check_counts(starts=starts, traj_frames=traj_frames, rattles=rattles, compressed=compressed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    systems = all_systems(metals, facets, adsorbates)
    split = split_systems(systems, seed)
    which = {s: name for name, ss in split.items() for s in ss}
    frames: dict[str, list[Atoms]] = {"train": [], "val": [], "test": []}
    benchmark_starts: list[Atoms] = []
    job = partial(_system_job, seed=seed, traj_frames=traj_frames, rattles=rattles, starts=starts)
    jobs = [(s, compressed if which[s] == "train" else 0) for s in systems]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(job, jobs), total=len(jobs), desc="EMT systems", disable=not progress))
    else:
        results = [job(j) for j in tqdm(jobs, desc="EMT systems", disable=not progress)]
    for sysdef, data in zip(systems, results):
        part = which[sysdef]
        for f in data.frames:
            f.info["split"] = part
        data.start.info["split"] = part
        frames[part].extend(data.frames)
        benchmark_starts.append(data.start)
    for part, fr in frames.items():
        atomic_write(out / f"{part}.extxyz", lambda tmp, fr=fr: write(tmp, fr, format="extxyz"))
    atomic_write(out / "starts.extxyz", lambda tmp: write(tmp, benchmark_starts, format="extxyz"))
    manifest = {
        **generation_options(seed, traj_frames, rattles, starts, compressed),
        "frames": {k: len(v) for k, v in frames.items()},
        "atoms": {k: int(sum(len(a) for a in v)) for k, v in frames.items()},
        "systems": {k: ["-".join(s) for s in v] for k, v in split.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="output directory for {train,val,test,starts}.extxyz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--traj-frames", type=int, default=6, help="frames kept per relaxation trajectory")
    p.add_argument("--rattles", type=int, default=4, help="rattled frames per start")
    p.add_argument("--starts", type=int, default=2, help="random adsorbate positions per system")
    p.add_argument("--compressed", type=int, default=2, help="compressed-adsorbate frames per start (training systems)")
    p.add_argument("--workers", type=int, default=2, help="processes (output does not depend on it)")


def run(args: argparse.Namespace) -> int:
    m = generate_emt_dataset(args.out_dir, seed=args.seed, traj_frames=args.traj_frames, rattles=args.rattles,
                             starts=args.starts, compressed=args.compressed, workers=args.workers)
    print(json.dumps({k: m[k] for k in ("frames", "atoms", "seconds")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqv2_calc.train.emt_data", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""``eqv2 relax``: relax every frame of a structure file, resumably.

Output directory layout (all files readable with ``ase.io`` or as plain CSV/JSON)::

    OUT/run.json               settings that determine the results (SETTINGS_KEYS) and their
                               sha256; a rerun with other ones is refused, one with other
                               execution settings (device, --max-atoms, ...) resumes
    OUT/structures/<name>.traj final structure of each finished input frame (ASE .traj, exact
                               float64), written atomically the moment it finishes (energy, raw
                               forces, constraints, relax_* info keys)
    OUT/trajectories/<name>.traj   initial, every --save-every-th, and final frame
    OUT/is2re.csv              relaxed energies of all frames (input order)
    OUT/is2rs.extxyz           relaxed structures of all frames (input order; extxyz keeps 8
                               decimals)
    OUT/summary.json           counts, utilization, wall time, metrics vs --reference

``--relax-cell`` relaxes every structure's cell together with its positions (ASE
``FrechetCellFilter`` coordinates and convergence test; needs a calculator with stress, e.g.
emt, and structures periodic in 3-D); the final structures then carry the relaxed cell and
the stress (eV/Å³). ``--cell-mask xx,yy,zz,yz,xz,xy`` (six 1/0 values, ASE's ``mask``) keeps the
cell components marked 0, e.g. ``--cell-mask 0,0,1,0,0,0`` relaxes only the c axis.

``<name>`` is the zero-padded frame index. An interrupted run keeps every finished
structure; rerunning the same command skips them (a structure counts as finished only if
its stored input fingerprint matches the current input frame).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from eqv2_calc.calcspec import BUILTIN_CALCULATORS, CalculatorSpec, parse_calculator_spec
from eqv2_calc.distributed.options import add_ray_arguments, options_from_args
from eqv2_calc.errors import InputError, RelaxationError
from eqv2_calc.io import atomic_write, atomic_write_text
from eqv2_calc.relax.cell import VOIGT_COMPONENTS, CellFilter, cell_mask_voigt, normalize_cell_mask
from eqv2_calc.relax.io import result_atoms_for_output, write_is2re, write_is2rs, write_trajectory
from eqv2_calc.relax.lbfgs import CURVATURE_GUARDS, LBFGSParams
from eqv2_calc.relax.runner import DEFAULT_MAX_FORCE, RelaxResult, RelaxStats, relax_batch
from eqv2_calc.resume import check_or_record, structure_fingerprint

SETTINGS_KEYS: tuple[str, ...] = (
    "potential", "dtype", "fmax", "steps", "maxstep", "memory", "damping", "alpha", "curvature_guard",
    "fix_tag0", "max_force", "relax_cell", "hydrostatic_strain", "constant_volume", "scalar_pressure",
    "cell_mask",
)
"""The settings that determine the results, recorded in ``run.json`` (allow-list, see
:mod:`eqv2_calc.resume`); ``potential`` stands for ``--checkpoint``/``--calculator``, ``dtype``
is the model dtype of a checkpoint (None for an ASE calculator)."""

POTENTIAL_ARGS: tuple[str, ...] = ("checkpoint", "calculator")
"""The options recorded together as the ``potential`` setting."""

EXECUTION_ARGS: tuple[str, ...] = (
    "input", "index", "out", "max_atoms", "max_edges", "save_every", "device", "reference", "no_progress",
    "trust_checkpoint", "ray", "actors", "cpus_per_actor", "gpus_per_actor", "prefetch",
)
"""Options that do not change the result of a structure (free to change on resume); the input
frames themselves are matched one by one by :func:`~eqv2_calc.resume.structure_fingerprint`."""

_LEGACY_SETTINGS = {  # run.json files written before these were recorded
    "dtype": None, "relax_cell": False, "hydrostatic_strain": False, "constant_volume": False, "scalar_pressure": 0.0,
    "cell_mask": None,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``relax`` sub-command."""
    p = subparsers.add_parser(
        "relax",
        help="relax all structures of a file with batched L-BFGS (IS2RS/IS2RE)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="any ase.io-readable file; every frame is relaxed")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="EquiformerV2 checkpoint (file or official name) to use as the potential")
    src.add_argument("--calculator", metavar="SPEC",
                     help="use an ASE calculator instead of a checkpoint: "
                          f"{' | '.join(sorted(BUILTIN_CALCULATORS))} | module:Class, optionally with "
                          'JSON keyword arguments, e.g. \'lj{"sigma": 2.3}\'')
    p.add_argument("--out", required=True, help="output directory (created; reruns resume)")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (default 0.05)")
    p.add_argument("--steps", type=int, default=300, help="max L-BFGS steps per structure (default 300)")
    p.add_argument("--maxstep", type=float, default=0.2, help="max atomic displacement per step, Å (default 0.2)")
    p.add_argument("--memory", type=int, default=100, help="L-BFGS memory (default 100)")
    p.add_argument("--damping", type=float, default=1.0, help="step damping factor (default 1.0)")
    p.add_argument("--alpha", type=float, default=70.0, help="initial Hessian guess, eV/Å² (default 70)")
    p.add_argument("--curvature-guard", choices=CURVATURE_GUARDS, default="skip",
                   help="pairs with y.s <= 0: skip (default), reset history, or none (exact ASE)")
    p.add_argument("--max-atoms", type=int, default=None, help="atoms per potential call (default 4096)")
    p.add_argument("--max-edges", type=int, default=None, help="edges per potential call (eqV2 only)")
    p.add_argument("--fix-tag0", action="store_true", help="also fix atoms with tag 0 (OC20 convention)")
    p.add_argument("--max-force", type=float, default=DEFAULT_MAX_FORCE,
                   help=f"flag a structure failed above this free-atom force, eV/Å (default {DEFAULT_MAX_FORCE:g})")
    p.add_argument("--relax-cell", action="store_true",
                   help="relax the cell too (ASE FrechetCellFilter coordinates; needs a calculator with stress, "
                        "e.g. emt, and 3-D periodic structures)")
    p.add_argument("--hydrostatic-strain", action="store_true",
                   help="with --relax-cell: isotropic deformation only (the cell keeps its shape)")
    p.add_argument("--constant-volume", action="store_true",
                   help="with --relax-cell: relax the cell shape at constant volume")
    p.add_argument("--scalar-pressure", type=float, default=0.0,
                   help="with --relax-cell: external pressure in eV/Å³ (1 GPa = 0.00624 eV/Å³); "
                        "E + pV is minimized (default 0)")
    p.add_argument("--cell-mask", default=None, metavar="XX,YY,ZZ,YZ,XZ,XY",
                   help="with --relax-cell: which cell components relax, six 1/0 values in Voigt order "
                        "(ASE FrechetCellFilter mask; 0 = keep), e.g. 1,1,1,0,0,0 (no shear) or 0,0,1,0,0,0 "
                        "(c axis only); default: all relax")
    p.add_argument("--save-every", type=int, default=0,
                   help="also keep every n-th frame in the trajectories (default 0: initial+final)")
    p.add_argument("--device", default=None, help="torch device for --checkpoint (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model dtype for --checkpoint (default float32; the optimizer is float64)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load --checkpoint even if its pickle holds objects beyond tensors, containers, numbers "
                        "and strings (full unpickling can run code from the file: only for files you trust)")
    p.add_argument("--index", default=":", help="ase.io frame selection (default ':' = all)")
    p.add_argument("--reference", default=None,
                   help="reference relaxed structures (same frames, with energies) for IS2RE MAE and ADwT")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    add_ray_arguments(p)
    p.set_defaults(func=run_relax)
    return p


def _calculator_spec(args: argparse.Namespace) -> CalculatorSpec:
    """The parsed ``--calculator`` (ASE calculators only; checkpoints go through --checkpoint)."""
    return parse_calculator_spec(args.calculator, allow=("ase",), what="--calculator",
                                 hint=" (for an EquiformerV2 checkpoint use --checkpoint)")


def _make_potential(args: argparse.Namespace) -> Any:
    if args.calculator:
        return _calculator_spec(args).build()
    from eqv2_calc.potential import load_potential

    return load_potential(args.checkpoint, device=args.device or "auto", dtype=args.dtype,
                          trust_checkpoint=args.trust_checkpoint)


fingerprint = structure_fingerprint  # the per-structure input fingerprint (name kept)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`SETTINGS_KEYS` of this invocation."""
    if args.calculator:
        pot, dtype = f"calculator:{_calculator_spec(args).canonical}", None
    else:
        pot, dtype = f"checkpoint:{Path(args.checkpoint).resolve()}", args.dtype
    values = {
        "potential": pot, "dtype": dtype, "fmax": args.fmax, "steps": args.steps, "maxstep": args.maxstep,
        "memory": args.memory, "damping": args.damping, "alpha": args.alpha,
        "curvature_guard": args.curvature_guard, "fix_tag0": bool(args.fix_tag0),
        "max_force": args.max_force, "relax_cell": bool(args.relax_cell),
        "hydrostatic_strain": bool(args.hydrostatic_strain), "constant_volume": bool(args.constant_volume),
        "scalar_pressure": float(args.scalar_pressure), "cell_mask": _cell_mask(args),
    }
    return {k: values[k] for k in SETTINGS_KEYS}


_MASK_WORDS = {"1": True, "0": False, "true": True, "false": False}


def _cell_mask(args: argparse.Namespace) -> list[bool] | None:
    """``--cell-mask`` as 6 Voigt booleans, None if absent or nothing is kept (the recorded
    setting: a mask of only 1s is the same relaxation as none)."""
    if args.cell_mask is None:
        return None
    words = [w.strip().lower() for w in str(args.cell_mask).split(",")]
    if len(words) != 6 or any(w not in _MASK_WORDS for w in words):
        raise InputError(
            f"--cell-mask {args.cell_mask!r}: expected six comma-separated 1/0 values for "
            f"{','.join(VOIGT_COMPONENTS)} (1 = relax, 0 = keep), e.g. 1,1,1,0,0,0"
        )
    mask = normalize_cell_mask([_MASK_WORDS[w] for w in words])
    return None if mask is None else cell_mask_voigt(mask)


def _cell_filter(args: argparse.Namespace) -> CellFilter | None:
    """The cell filter of ``--relax-cell`` and its options (None without it; its options alone
    are an error)."""
    if not args.relax_cell:
        given = [flag for flag, on in (("--hydrostatic-strain", args.hydrostatic_strain),
                                       ("--constant-volume", args.constant_volume),
                                       ("--scalar-pressure", args.scalar_pressure != 0.0),
                                       ("--cell-mask", args.cell_mask is not None)) if on]
        if given:
            raise InputError(f"{', '.join(given)} only apply to a cell relaxation: add --relax-cell")
        return None
    return CellFilter(hydrostatic_strain=args.hydrostatic_strain, constant_volume=args.constant_volume,
                      scalar_pressure=args.scalar_pressure, mask=_cell_mask(args))


def _check_run_file(out: Path, settings: dict[str, Any], input_path: str) -> None:
    legacy = dict(_LEGACY_SETTINGS)
    if str(settings["potential"]).startswith("checkpoint:"):
        legacy["dtype"] = "float32"  # the only default before dtype was recorded
    check_or_record(out / "run.json", settings, extra={"input": str(input_path)}, where=str(out),
                    hint="use another --out directory, or delete it to start over", assume=legacy,
                    error=RelaxationError)


def result_from_file(path: Path, index: int) -> RelaxResult:
    """Rebuild a :class:`RelaxResult` (without trajectory) from ``structures/<name>.traj``."""
    import ase.io

    atoms = ase.io.read(path, format="traj")
    info = atoms.info
    stress = atoms.calc.results.get("stress") if atoms.calc else None
    if stress is not None:
        from ase.stress import voigt_6_to_full_3x3_stress

        stress = voigt_6_to_full_3x3_stress(stress) if np.shape(stress) == (6,) else np.asarray(stress)
    return RelaxResult(
        index=index, name=str(info["relax_name"]), atoms=atoms,
        energy=float(atoms.calc.results["energy"]) if atoms.calc else math.nan,
        fmax=float(info["relax_fmax"]), nsteps=int(info["relax_nsteps"]),
        converged=bool(info["relax_converged"]), failed=bool(info["relax_failed"]),
        reason=str(info["relax_reason"]), initial_energy=float(info["relax_initial_energy"]),
        stress=stress,
    )


def run_relax(args: argparse.Namespace) -> int:
    """Entry point of ``eqv2 relax`` (see module docstring)."""
    import ase.io

    out = Path(args.out)
    try:
        frames = ase.io.read(args.input, index=args.index)
    except FileNotFoundError as exc:
        raise InputError(f"input file not found: {args.input}") from exc
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise InputError(f"no structures in {args.input} (index {args.index!r})")
    for f in frames:
        f.calc = None
    width = max(6, len(str(len(frames) - 1)))
    names = [f"{i:0{width}d}" for i in range(len(frames))]
    if args.calculator:
        _calculator_spec(args).load_class()  # unknown names / bad module paths fail before run.json
    cell_filter = _cell_filter(args)
    ray = options_from_args(args)
    settings = _settings(args)
    LBFGSParams(maxstep=args.maxstep, memory=args.memory, damping=args.damping,
                alpha=args.alpha, curvature_guard=args.curvature_guard)  # validate early
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, settings, args.input)
    sdir, tdir = out / "structures", out / "trajectories"
    sdir.mkdir(exist_ok=True)

    prints = [fingerprint(f, args.fix_tag0) for f in frames]
    done: dict[int, RelaxResult] = {}
    for i, name in enumerate(names):
        path = sdir / f"{name}.traj"
        if path.exists():
            try:
                res = result_from_file(path, i)
                if res.atoms.info.get("relax_input_sha") == prints[i]:
                    done[i] = res
            except Exception:  # noqa: BLE001 - unreadable leftovers are simply recomputed
                pass
    todo = [i for i in range(len(frames)) if i not in done]
    print(f"eqv2 relax: {len(frames)} structures, {len(done)} already finished, {len(todo)} to do",
          file=sys.stderr)

    def save(result: RelaxResult) -> None:
        i = todo[result.index]
        result.index, result.name = i, names[i]
        atoms = result_atoms_for_output(result)
        atoms.info["relax_input_sha"] = prints[i]
        atomic_write(sdir / f"{names[i]}.traj",
                     lambda tmp: ase.io.write(tmp, atoms, format="traj"), suffix=".traj")
        if ray is not None:  # on Ray the trajectories come back with the results and are written here
            write_trajectory(tdir / f"{names[i]}.traj", result.trajectory)
        done[i] = result

    stats = RelaxStats()
    ray_stats = None
    if todo:
        potential = _make_potential(args)
        options = dict(fmax=args.fmax, steps=args.steps, max_atoms=args.max_atoms, max_edges=args.max_edges,
                       fix_tag0=args.fix_tag0, max_force=args.max_force, save_every=args.save_every,
                       progress=not args.no_progress, on_result=save, maxstep=args.maxstep, memory=args.memory,
                       damping=args.damping, alpha=args.alpha, curvature_guard=args.curvature_guard,
                       cell_filter=cell_filter)
        try:
            if ray is None:
                relax_batch([frames[i] for i in todo], potential, names=[names[i] for i in todo], trajectory_dir=tdir,
                            stats=stats, **options)
            else:
                from eqv2_calc.distributed import relax_on_ray

                tdir.mkdir(exist_ok=True)
                _, ray_stats = relax_on_ray([frames[i] for i in todo], potential, ray, **options)
        except KeyboardInterrupt:
            print(f"\neqv2 relax: interrupted; {len(done)} of {len(frames)} structures are finished "
                  f"and kept in {sdir}; rerun the same command to resume", file=sys.stderr)
            return 130
    results = [done[i] for i in range(len(frames))]
    write_is2re(out / "is2re.csv", results)
    write_is2rs(out / "is2rs.extxyz", results)

    summary: dict[str, Any] = {
        "structures": len(results),
        "resumed": len(frames) - len(todo),
        "converged": sum(r.converged for r in results),
        "failed": sum(r.failed for r in results),
        "max_steps": sum(r.reason == "max_steps" for r in results),
        "force_calls": sum(r.force_calls for r in results),
        "this_run": {
            "potential_calls": stats.potential_calls,
            "system_evaluations": stats.system_evaluations,
            "utilization": stats.utilization,
            "oom_events": stats.oom_events,
            "wall_time_s": stats.wall_time,
        },
    }
    if ray_stats is not None:  # the per-actor relaxer counters stay on the actors
        summary["this_run"] = {"ray": {k: v for k, v in vars(ray_stats).items() if k != "actor_info"}}
    if args.reference:
        summary["metrics"] = _metrics(results, args.reference, args.fix_tag0)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _metrics(results: list[RelaxResult], reference: str, fix_tag0: bool) -> dict[str, Any]:
    import ase.io

    from eqv2_calc.relax.metrics import adwt, energy_mae

    refs = ase.io.read(reference, index=":")
    if len(refs) != len(results):
        raise InputError(f"--reference has {len(refs)} frames but the input has {len(results)}")
    ok = [j for j, r in enumerate(results) if not r.failed]
    metrics: dict[str, Any] = {"systems": len(ok)}
    if ok and all(refs[j].calc is not None and "energy" in refs[j].calc.results for j in ok):
        metrics["is2re_energy_mae_eV"] = energy_mae(
            [results[j].energy for j in ok], [refs[j].get_potential_energy() for j in ok])
    if ok:
        metrics["is2rs_adwt"] = adwt([results[j].atoms for j in ok], [refs[j] for j in ok], fix_tag0=fix_tag0)
    return metrics

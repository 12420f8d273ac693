"""Read finished VASP single points back: one calculation directory, or a whole export tree.

:func:`read_single_point` reads ``vasprun.xml`` (or ``vasprun.xml.gz``) with
:class:`pymatgen.io.vasp.Vasprun`, and falls back to ``OUTCAR`` (``ase.io.read``, format
``vasp-out``) when there is no vasprun.xml. The σ→0 energy is taken from the last electronic
(SCF) step of the last ionic step: VASP 5.4.4 writes a wrong ``e_0_energy`` in the final energy
block of an ionic step (it holds the entropy term, e.g. −0.00035 eV), so that field is never
used as it is.

:func:`scan_export_dir` walks a tree written by ``adsorbml export``
(``<export>/<system_id>/<config_id>/{POSCAR,INCAR,KPOINTS}`` plus ``paths.txt``), reads every
calculation directory, and returns the finished results and, by name, every directory that
could not be used with the reason: no output, unfinished (truncated output), not
electronically converged, unreadable or failed. Nothing is dropped silently.

Energies in eV, forces in eV/Å, atom order as in the POSCAR (VASP keeps it).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms

from adsorbml.errors import AdsorbMLError, InputError
from eqv2_calc.io import frame_with_results

__all__ = [
    "DFTResult",
    "ExportScan",
    "NoOutputError",
    "UnfinishedOutputError",
    "UnreadableOutputError",
    "VaspOutputError",
    "read_single_point",
    "scan_export_dir",
    "split_name",
]

VASPRUN_NAMES = ("vasprun.xml", "vasprun.xml.gz")
OUTCAR_NAMES = ("OUTCAR", "OUTCAR.gz")
#: Files that mark a directory as a VASP calculation directory.
CALC_MARKERS = frozenset(("INCAR", "POSCAR", "KPOINTS") + VASPRUN_NAMES + OUTCAR_NAMES)
_OUTCAR_DONE = "General timing and accounting"
_ITER_RE = re.compile(r"Iteration\s+(\d+)\s*\(\s*(\d+)\s*\)")
_NELM_RE = re.compile(r"\bNELM\s*=\s*(\d+)")


# ---------------------------------------------------------------------- types


@dataclass(frozen=True, eq=False)
class DFTResult:
    """One finished VASP calculation (a single point: one ionic step).

    Attributes
    ----------
    energy:
        σ→0 energy of the last ionic step (eV), from its last SCF step.
    force_consistent_energy:
        Free energy TOTEN of the last ionic step (eV).
    forces:
        Forces of the last ionic step, float64 array [n, 3] (eV/Å), POSCAR atom order.
    scf_steps_last:
        Electronic (SCF) steps of the last ionic step.
    scf_steps_total:
        SCF steps summed over all ionic steps (the AdsorbML cost measure).
    ionic_steps:
        Number of ionic steps (1 for a single point).
    converged:
        Electronic convergence of the last ionic step: ``scf_steps_last < nelm``; None when
        NELM is unknown.
    nelm:
        NELM of the run (from the parameters VASP recorded), or None.
    source:
        The file read (vasprun.xml or OUTCAR).
    atoms:
        Final structure (Å) with a SinglePointCalculator holding energy, free_energy, forces;
        FixAtoms from selective dynamics where known.
    vasp_version:
        Version string VASP wrote, if known.
    """

    energy: float
    force_consistent_energy: float
    forces: np.ndarray
    scf_steps_last: int
    scf_steps_total: int
    ionic_steps: int
    converged: bool | None
    nelm: int | None
    source: Path
    atoms: Atoms
    vasp_version: str | None = None

    @property
    def natoms(self) -> int:
        return len(self.forces)

    def to_dict(self, include_forces: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (eV, eV/Å); forces as nested lists if asked for."""
        d: dict[str, Any] = {
            "energy": self.energy, "force_consistent_energy": self.force_consistent_energy,
            "scf_steps_last": self.scf_steps_last, "scf_steps_total": self.scf_steps_total,
            "ionic_steps": self.ionic_steps, "converged": self.converged, "nelm": self.nelm,
            "natoms": self.natoms, "source": str(self.source), "vasp_version": self.vasp_version,
        }
        if include_forces:
            d["forces"] = self.forces.tolist()
        return d


class VaspOutputError(AdsorbMLError):
    """A VASP calculation directory has no usable result; ``kind`` names why, ``path`` where."""

    kind = "failed"

    def __init__(self, path: str | os.PathLike, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{self.path}: {self.kind}: {detail}")


class NoOutputError(VaspOutputError):
    """Neither vasprun.xml nor OUTCAR exists (not run yet, or run elsewhere)."""

    kind = "no output"


class UnfinishedOutputError(VaspOutputError):
    """The output is truncated or has no completed ionic step (running, killed, out of time)."""

    kind = "unfinished"


class UnreadableOutputError(VaspOutputError):
    """The output is complete but holds no usable energy/forces (failed run, corrupt file)."""

    kind = "failed"


class ExportScan(NamedTuple):
    """What :func:`scan_export_dir` found: ``results`` and ``problems`` ({name: reason}),
    names being ``"<system_id>/<config_id>"`` (paths relative to the export directory)."""

    results: dict[str, DFTResult]
    problems: dict[str, str]


# ---------------------------------------------------------------------- one directory


def _output_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise NoOutputError(path, "no such file or directory")
    for name in VASPRUN_NAMES + OUTCAR_NAMES:
        if (path / name).is_file():
            return path / name
    raise NoOutputError(path, "no vasprun.xml or OUTCAR (not run yet?)")


def _nelm_from_incar(directory: Path) -> int | None:
    incar = directory / "INCAR"
    if not incar.is_file():
        return None
    from pymatgen.io.vasp import Incar

    try:
        value = Incar.from_file(incar).get("NELM")
    except Exception:  # noqa: BLE001 - an unreadable INCAR only means NELM is unknown
        return None
    return None if value is None else int(value)


def _finish(
    source: Path, atoms: Atoms, energy: float, fc_energy: float, forces: np.ndarray,
    scf_per_ionic: list[int], nelm: int | None, version: str | None,
) -> DFTResult:
    if not (math.isfinite(energy) and math.isfinite(fc_energy)):
        raise UnreadableOutputError(source, f"non-finite energy ({energy}, force-consistent {fc_energy})")
    forces = np.asarray(forces, dtype=np.float64)
    if forces.shape != (len(atoms), 3) or not np.isfinite(forces).all():
        raise UnreadableOutputError(source, f"forces of shape {forces.shape} for {len(atoms)} atoms, or not finite")
    if not scf_per_ionic or scf_per_ionic[-1] < 1:
        raise UnfinishedOutputError(source, "the last ionic step has no electronic (SCF) step")
    if nelm is None:
        nelm = _nelm_from_incar(source.parent)
    atoms = frame_with_results(atoms, energy, forces, free_energy=fc_energy)
    last = int(scf_per_ionic[-1])
    return DFTResult(
        energy=float(energy), force_consistent_energy=float(fc_energy), forces=forces,
        scf_steps_last=last, scf_steps_total=int(sum(scf_per_ionic)), ionic_steps=len(scf_per_ionic),
        converged=None if nelm is None else last < nelm, nelm=nelm, source=source, atoms=atoms,
        vasp_version=version,
    )


def _read_vasprun(path: Path) -> DFTResult:
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp import Vasprun

    if path.stat().st_size == 0:
        raise UnfinishedOutputError(path, "vasprun.xml is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing POTCARs, unconverged-run notices: judged below
            run = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_projected_eigen=False,
                          parse_potcar_file=False, exception_on_bad_xml=True)
    except SyntaxError as exc:  # lxml / ElementTree parse errors derive from SyntaxError
        raise UnfinishedOutputError(path, f"vasprun.xml is truncated or malformed ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any other parser failure: name it
        raise UnreadableOutputError(path, f"pymatgen cannot read vasprun.xml: {type(exc).__name__}: {exc}") from None
    if not run.ionic_steps:
        raise UnfinishedOutputError(path, "vasprun.xml holds no completed ionic step")
    step = run.ionic_steps[-1]
    scf = [len(s.get("electronic_steps", [])) for s in run.ionic_steps]
    try:
        energy = float(step["electronic_steps"][-1]["e_0_energy"])  # not step["e_0_energy"] (5.4.4 bug)
        fc_energy = float(step["e_fr_energy"])
        forces = np.asarray(step["forces"], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnreadableOutputError(path, f"the last ionic step lacks energies or forces ({exc!r})") from None
    ase_atoms = AseAtomsAdaptor.get_atoms(step["structure"])
    atoms = Atoms(ase_atoms.numbers, positions=ase_atoms.positions, cell=ase_atoms.cell, pbc=ase_atoms.pbc)
    atoms.set_constraint([c.copy() for c in ase_atoms.constraints])
    nelm = run.parameters.get("NELM")
    version = getattr(run, "vasp_version", None)
    return _finish(path, atoms, energy, fc_energy, forces, scf,
                   None if nelm is None else int(nelm), None if version is None else str(version))


def _read_outcar(path: Path) -> DFTResult:
    from ase.io import read

    opener = gzip.open if path.suffix == ".gz" else open
    scf: dict[int, int] = {}
    nelm: int | None = None
    done = False
    version: str | None = None
    with opener(path, "rt", errors="replace") as fh:
        for n, line in enumerate(fh):
            if n == 0 and line.strip().startswith("vasp."):
                version = line.split()[0]
            m = _ITER_RE.search(line)
            if m:
                ionic, elec = int(m.group(1)), int(m.group(2))
                scf[ionic] = max(scf.get(ionic, 0), elec)
            elif nelm is None and "NELM" in line:
                mn = _NELM_RE.search(line)
                nelm = int(mn.group(1)) if mn else None
            elif _OUTCAR_DONE in line:
                done = True
    if not done:
        raise UnfinishedOutputError(path, f"OUTCAR has no final '{_OUTCAR_DONE}' section (running or killed)")
    try:
        frame = read(path, index=-1, format="vasp-out")
        energy = float(frame.get_potential_energy())  # σ→0
        fc_energy = float(frame.get_potential_energy(force_consistent=True))
        forces = frame.get_forces(apply_constraint=False)
    except Exception as exc:  # noqa: BLE001 - name the parser failure
        raise UnreadableOutputError(path, f"ase cannot read OUTCAR: {type(exc).__name__}: {exc}") from None
    atoms = Atoms(frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    atoms.set_constraint([c.copy() for c in frame.constraints])
    per_ionic = [scf[k] for k in sorted(scf)]
    return _finish(path, atoms, energy, fc_energy, forces, per_ionic, nelm, version)


def read_single_point(path: str | os.PathLike) -> DFTResult:
    """Read a finished VASP calculation: a directory (vasprun.xml preferred, else OUTCAR; ``.gz``
    accepted) or one of those files.

    Returns a :class:`DFTResult` even when the run is not electronically converged (check
    ``converged``). Raises :class:`NoOutputError` (no output file),
    :class:`UnfinishedOutputError` (truncated, or no completed ionic/SCF step) or
    :class:`UnreadableOutputError` (complete file without usable energies or forces), all
    :class:`VaspOutputError` with ``.kind`` and ``.path``.
    """
    src = _output_file(Path(path))
    name = src.name
    if name.startswith("vasprun") or name.endswith((".xml", ".xml.gz")):
        return _read_vasprun(src)
    if name.startswith("OUTCAR"):
        return _read_outcar(src)
    raise InputError(f"{src}: not a VASP output file (expected vasprun.xml or OUTCAR, optionally .gz)")


# ---------------------------------------------------------------------- export tree


def split_name(name: str) -> tuple[str, str]:
    """``"<system_id>/<config_id>"`` → (system_id, config_id); a name without "/" → ("", name)."""
    head, _, tail = name.rpartition("/")
    return head, tail


def _calc_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if CALC_MARKERS.intersection(filenames):
            rel = Path(dirpath).relative_to(root).as_posix()
            found[root.name if rel == "." else rel] = Path(dirpath)
            dirnames[:] = []  # a calculation directory's subfolders are its own business
    return found


def _listed_names(root: Path, found: dict[str, Path]) -> list[str]:
    """Names of the directories listed in ``paths.txt`` (written by ``adsorbml export``)."""
    listing = root / "paths.txt"
    if not listing.is_file():
        return []
    names = []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        parts = Path(line.strip()).parts
        match = [n for n in found if tuple(n.split("/")) == parts[-len(n.split("/")):]]
        names.append(max(match, key=len) if match else "/".join(parts[-2:]))
    return names


def scan_export_dir(export_dir: str | os.PathLike, *, require_converged: bool = True) -> ExportScan:
    """Read every calculation directory below ``export_dir`` (the layout of ``adsorbml export``).

    A calculation directory is one holding any of INCAR, POSCAR, KPOINTS, vasprun.xml(.gz),
    OUTCAR(.gz); its name is its path relative to ``export_dir`` (``"<system_id>/<config_id>"``,
    see :func:`split_name`). Directories listed in ``paths.txt`` but missing are reported too.

    Returns ``ExportScan(results, problems)``: ``results`` maps names to :class:`DFTResult`;
    ``problems`` maps names to a reason starting with its kind — ``"no output: ..."``,
    ``"unfinished: ..."``, ``"not converged: ..."`` (only if ``require_converged``; a run whose
    NELM is unknown counts as converged), ``"failed: ..."``, ``"missing: ..."``.
    Raises :class:`InputError` if ``export_dir`` is not a directory.
    """
    root = Path(export_dir)
    if not root.is_dir():
        raise InputError(f"{root}: export directory does not exist or is not a directory")
    found = _calc_dirs(root)
    results: dict[str, DFTResult] = {}
    problems: dict[str, str] = {}
    for name in _listed_names(root, found):
        if name not in found:
            problems[name] = "missing: listed in paths.txt but the directory does not exist"
    for name, directory in found.items():
        try:
            res = read_single_point(directory)
        except VaspOutputError as exc:
            problems[name] = f"{exc.kind}: {exc.detail}"
            continue
        except InputError as exc:
            problems[name] = f"failed: {exc}"
            continue
        if require_converged and res.converged is False:
            problems[name] = (f"not converged: {res.scf_steps_last} SCF steps in the last ionic step "
                              f"reached NELM = {res.nelm} ({res.source.name})")
            continue
        results[name] = res
    return ExportScan(results, problems)

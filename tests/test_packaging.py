"""Packaging: a wheel carries the shipped model and its card, and every sub-package.

The full acceptance check (clean clone → wheel → fresh venv → calculator and ``adsorbml demo``
from another directory) is ``.ci/wheel_smoke.sh`` (``make wheel-smoke``), run by ``.ci/run``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "MANIFEST.in", "README.md", "checkpoints", "eqv2_calc", "adsorbml")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built (no deps, no build isolation) from a copy of the working tree's sources."""
    try:
        from importlib.metadata import version

        if int(version("setuptools").split(".")[0]) < 77:
            pytest.skip(f"setuptools {version('setuptools')} < 77 in this venv (pyproject needs >= 77)")
    except Exception as e:  # no setuptools at all
        pytest.skip(f"setuptools not installed in this venv ({e})")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:  # a copy: an in-tree build would leave build/ behind, whose stale files end up in wheels
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        else:
            shutil.copy2(p, src / name)
    dist = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("eqv2_calc-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_carries_the_shipped_model_and_its_card(wheel):
    names = set(wheel.namelist())
    for rel in ("eqv2-emt-small.pt", "README.md"):
        member = f"eqv2_calc/shipped/{rel}"
        assert member in names, sorted(n for n in names if "shipped" in n)
        assert _sha(wheel.read(member)) == _sha((ROOT / "checkpoints" / rel).read_bytes())


def test_wheel_has_every_subpackage(wheel):
    """pyproject lists the packages explicitly (for the checkpoints/ mapping): none may be missing."""
    names = set(wheel.namelist())
    for top in ("eqv2_calc", "adsorbml"):
        for py in (ROOT / top).rglob("*.py"):
            rel = py.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert rel in names, f"{rel} is not in the wheel: add its package to [tool.setuptools] packages"
    scripts = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "eqv2 = eqv2_calc.cli:main" in scripts and "adsorbml = adsorbml.cli:main" in scripts


def test_shipped_checkpoint_is_the_repository_file():
    """In this (editable) install the package data maps to checkpoints/ itself."""
    from eqv2_calc.calculator import default_checkpoint
    from eqv2_calc.checkpoint.registry import shipped_checkpoint

    path = shipped_checkpoint()
    assert path.is_file() and default_checkpoint() == str(path)
    assert _sha(path.read_bytes()) == _sha((ROOT / "checkpoints" / "eqv2-emt-small.pt").read_bytes())


def test_missing_shipped_model_is_an_error_not_a_fallback(monkeypatch):
    import importlib.resources

    from eqv2_calc import EquiformerV2Calculator
    from eqv2_calc.checkpoint import registry
    from eqv2_calc.errors import CheckpointError

    monkeypatch.setitem(registry.SHIPPED_MODELS, "emt", "not-there.pt")
    with pytest.raises(CheckpointError, match="not part of this installation"):
        EquiformerV2Calculator()
    assert importlib.resources.files(registry.SHIPPED_PACKAGE).joinpath("eqv2-emt-small.pt").is_file()

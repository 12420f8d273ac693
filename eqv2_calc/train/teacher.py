"""The teacher of the shipped model: a SevenNet universal potential (offline weights).

SevenNet (``pip install eqv2-calc[teacher]`` → ``sevenn``, MIT) ships its pretrained weights
inside the PyPI wheel, so it runs with no network. It is a universal interatomic potential
trained on bulk PBE data (MPtrj), **not DFT**: the shipped model distilled from it and the
adsorption energies the demo prints inherit its errors.

Variants available offline (:data:`TEACHER_VARIANTS`); :data:`DEFAULT_TEACHER` was chosen by
``benchmarks/teacher_choice.py`` (numbers in ``checkpoints/README.md``).

The calculator spec ``sevennet`` (``eqv2 relax --calculator``, ``adsorbml --dft-calculator``)
builds :func:`SevenNet`, e.g. ``sevennet{"model": "7net-l3i5"}``.
"""

from __future__ import annotations

import warnings
from typing import Any

from eqv2_calc.errors import InputError

__all__ = ["DEFAULT_TEACHER", "TEACHER_INSTALL_HINT", "TEACHER_VARIANTS", "SevenNet", "make_teacher", "require_teacher"]

TEACHER_VARIANTS: tuple[str, ...] = ("7net-0", "7net-l3i5")
"""SevenNet models whose weights are inside the ``sevenn`` wheel (no download)."""

DEFAULT_TEACHER = "7net-l3i5"
"""The variant the shipped model is distilled from."""

TEACHER_INSTALL_HINT = "install the teacher with: pip install 'eqv2-calc[teacher]'  (or: pip install sevenn)"


def require_teacher(variant: str = DEFAULT_TEACHER) -> None:
    """Raise :class:`~eqv2_calc.errors.InputError` for an unknown ``variant`` or a missing
    ``sevenn``, without loading a model (a check before starting teacher processes)."""
    if variant not in TEACHER_VARIANTS:
        raise InputError(f"unknown teacher {variant!r}; the offline SevenNet variants are {', '.join(TEACHER_VARIANTS)}")
    try:
        import sevenn.calculator  # noqa: F401
    except ImportError as e:
        raise InputError(f"the SevenNet teacher needs the 'sevenn' package ({e}); {TEACHER_INSTALL_HINT}") from None


def make_teacher(variant: str = DEFAULT_TEACHER, device: str = "cpu") -> Any:
    """A SevenNet ASE calculator (energy eV, forces eV/Å, stress eV/Å³) for ``variant``.

    Raises :class:`~eqv2_calc.errors.InputError` for an unknown variant or a missing ``sevenn``."""
    require_teacher(variant)
    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor-product accelerator" on CPU: expected
        return SevenNetCalculator(variant, device=device)


def SevenNet(model: str = DEFAULT_TEACHER, device: str = "cpu") -> Any:  # noqa: N802 (a calculator "class" for specs)
    """Calculator-spec entry point (``sevennet``, ``sevennet{"model": "7net-l3i5"}``): :func:`make_teacher`."""
    return make_teacher(model, device)

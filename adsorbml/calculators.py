"""The calculators of an AdsorbML run, built from their spec strings
(:func:`eqv2_calc.calcspec.parse_calculator_spec`; errors are :class:`InputError`)."""

from __future__ import annotations

from typing import Any

from adsorbml.errors import InputError

__all__ = ["make_dft_calculator", "make_ml_calculator", "shipped_model_available"]


def shipped_model_available() -> bool:
    """Whether this installation contains the shipped model (``eqv2-emt-small.pt``, found by
    :func:`eqv2_calc.checkpoint.registry.shipped_checkpoint`)."""
    from eqv2_calc.checkpoint.registry import shipped_checkpoint
    from eqv2_calc.errors import CheckpointError

    try:
        shipped_checkpoint()
        return True
    except CheckpointError:
        return False


def _parse_calculator(spec: str, allow: tuple[str, ...], what: str):
    """:func:`eqv2_calc.calcspec.parse_calculator_spec` (its errors are :class:`InputError`)."""
    from eqv2_calc.calcspec import parse_calculator_spec

    return parse_calculator_spec(spec, allow=allow, what=what)


def _build_calculator(spec: str, allow: tuple[str, ...], what: str, **eqv2_options: Any) -> Any:
    from eqv2_calc.errors import CheckpointError

    parsed = _parse_calculator(spec, allow, what)
    try:
        return parsed.build(**eqv2_options)
    except CheckpointError as e:
        raise InputError(f"{what} {spec!r}: {e} (or use --ml-calculator emt)") from None


def make_ml_calculator(spec: str, trust_checkpoint: bool = False) -> Any:
    """The ML force field named by ``spec`` (see :attr:`adsorbml.config.RunConfig.ml_calculator`).

    ``trust_checkpoint``: load an EquiformerV2 checkpoint even if its pickle holds objects beyond
    the safe allow-list (see :func:`eqv2_calc.checkpoint.load_model`); only for trusted files."""
    options = {"trust_checkpoint": True} if trust_checkpoint else {}
    return _build_calculator(spec, ("ase", "eqv2"), "ML calculator", **options)


def make_dft_calculator(spec: str) -> Any | None:
    """The DFT (stand-in) calculator: ``"none"`` (→ None), a built-in ASE calculator (``"emt"``,
    ...) or ``"module:Class"`` (see :attr:`adsorbml.config.RunConfig.dft_calculator`)."""
    return _build_calculator(spec, ("ase", "none"), "DFT calculator")

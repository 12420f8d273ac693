"""Exception hierarchy of eqv2-calc and adsorbml.

Every error raised for bad user input derives from :class:`Eqv2Error`; every bad value or
structure from :class:`InputError` (also a ``ValueError``), in both packages
(:mod:`adsorbml.errors` adds its own subclasses), so callers catch one class.
"""

from __future__ import annotations

from ase.calculators.calculator import CalculatorSetupError


class Eqv2Error(Exception):
    """Base class of all eqv2-calc errors."""


class CheckpointError(Eqv2Error, CalculatorSetupError):
    """A checkpoint is missing, corrupt, of another architecture, or cannot be downloaded."""


class InputError(Eqv2Error, ValueError):
    """An atomic structure cannot be evaluated (empty, NaN, overlapping atoms, bad cell, ...)."""


class UnsupportedElementError(InputError):
    """An atomic number lies outside what the model was trained on."""


class RelaxationError(Eqv2Error):
    """A relaxation could not be set up or continued."""

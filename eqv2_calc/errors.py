"""Exception hierarchy. Every error raised for bad user input derives from :class:`Eqv2Error`."""

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


class GraphError(Eqv2Error):
    """The neighbour graph could not be built."""


class RelaxationError(Eqv2Error):
    """A relaxation could not be set up or continued."""

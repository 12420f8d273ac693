"""Exception hierarchy of the AdsorbML workflow, part of eqv2-calc's (:mod:`eqv2_calc.errors`).

Bad input of any kind raises :class:`~eqv2_calc.errors.InputError` — the same class in both
packages, re-exported here — or a subclass of it; workflow failures that are not about one
bad value derive from :class:`AdsorbMLError`. Both derive from
:class:`~eqv2_calc.errors.Eqv2Error`, so callers can catch one class.
"""

from __future__ import annotations

from eqv2_calc.errors import Eqv2Error, InputError


class AdsorbMLError(Eqv2Error):
    """Base class of adsorbml errors that are not bad input (store, placements)."""


class UnknownAdsorbateError(InputError, KeyError):
    """An adsorbate name is not in any available table (the message lists the options)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FormatError(InputError):
    """A targets / compute / results file does not have the OC20-Dense structure."""


class PlacementError(AdsorbMLError):
    """Adsorbate placements could not be generated (no surface atoms, no sites, ...)."""


__all__ = ["AdsorbMLError", "InputError", "UnknownAdsorbateError", "FormatError", "PlacementError"]

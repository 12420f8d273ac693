"""Exception hierarchy of the AdsorbML workflow.

Every error raised for bad user input derives from :class:`AdsorbMLError` (and from
``ValueError`` where the problem is a bad value), so callers can catch one class.
"""

from __future__ import annotations


class AdsorbMLError(Exception):
    """Base class of all adsorbml errors."""


class InputError(AdsorbMLError, ValueError):
    """A slab, bulk, adsorbate or option is malformed (missing tags, bad Miller index, ...)."""


class UnknownAdsorbateError(InputError, KeyError):
    """An adsorbate name is not in any available table (the message lists the options)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FormatError(AdsorbMLError, ValueError):
    """A targets / compute / results file does not have the OC20-Dense structure."""


class PlacementError(AdsorbMLError):
    """Adsorbate placements could not be generated (no surface atoms, no sites, ...)."""

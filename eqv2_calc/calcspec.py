"""Calculator specifications: the one parser behind ``eqv2 relax --calculator`` and
``adsorbml --ml-calculator / --dft-calculator``.

Accepted strings (case-insensitive names, surrounding spaces ignored)::

    emt | lj | morse              built-in ASE calculators (no external programs)
    sevennet                      the SevenNet teacher (needs eqv2-calc[teacher])
    module:Class                  any importable ASE calculator class, e.g. tblite.ase:TBLite
    NAME{"key": value, ...}       either of the above with constructor keyword arguments
                                  (a JSON object), e.g. lj{"sigma": 2.3}
    shipped                       the EquiformerV2 model shipped with the package   (ML only)
    shipped-7net | shipped-emt    a named shipped model (7net: distilled from SevenNet) (ML only)
    path/to/checkpoint.pt         an EquiformerV2 checkpoint file                     (ML only)
    EquiformerV2-31M-S2EF-...     an official checkpoint name (downloaded)            (ML only)
    none                          no calculator                                       (DFT only)

Which kinds a caller accepts is its choice (``allow``); an unknown or malformed spec raises
:class:`CalculatorSpecError` (an :class:`~eqv2_calc.errors.InputError`) listing the options.
Parsing imports nothing; :meth:`CalculatorSpec.load_class` / :meth:`CalculatorSpec.build`
import and construct.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from eqv2_calc.errors import InputError

__all__ = [
    "BUILTIN_CALCULATORS", "SHIPPED_NAMES", "KINDS", "CalculatorSpec", "CalculatorSpecError",
    "parse_calculator_spec", "make_calculator",
]

BUILTIN_CALCULATORS: dict[str, str] = {
    "emt": "ase.calculators.emt:EMT",
    "lj": "ase.calculators.lj:LennardJones",
    "morse": "ase.calculators.morse:MorsePotential",
    "sevennet": "eqv2_calc.train.teacher:SevenNet",
}
"""Short name → ``module:Class`` of the built-in ASE calculators (no external programs;
``sevennet`` is the teacher of the shipped model and needs the ``[teacher]`` extra)."""

SHIPPED_NAMES: tuple[str, ...] = ("shipped", "default")
"""Names of the (default) EquiformerV2 model shipped with the package."""
SHIPPED_VARIANT_NAMES: dict[str, str] = {"shipped-emt": "emt", "shipped-7net": "7net"}
"""Spec names of each shipped model (see :data:`eqv2_calc.checkpoint.registry.SHIPPED_MODELS`)."""

KINDS: tuple[str, ...] = ("ase", "eqv2", "none")
"""``ase``: an ASE calculator class (built-in name or ``module:Class``); ``eqv2``: an
EquiformerV2 checkpoint (shipped, file or official name); ``none``: no calculator."""

_IMPORT_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class CalculatorSpecError(InputError):
    """A calculator specification is unknown, malformed or cannot be imported."""


@dataclass(frozen=True)
class CalculatorSpec:
    """A parsed calculator specification (see the module docstring).

    Attributes
    ----------
    kind:
        One of :data:`KINDS`.
    target:
        ``module:Class`` (kind ``ase``); ``"shipped"``, a checkpoint file path or an official
        name (kind ``eqv2``); ``""`` (kind ``none``).
    kwargs:
        Constructor keyword arguments (kind ``ase``).
    name:
        The built-in short name (``emt``, ...) or ``""``.
    text:
        The string as given.
    """

    kind: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    text: str = ""

    @property
    def canonical(self) -> str:
        """A normalised spelling: ``emt``, ``module:Class``, either with ``{JSON kwargs}`` (sorted
        keys), ``shipped``, the checkpoint path / name as given, or ``none``."""
        if self.kind == "none":
            return "none"
        if self.kind == "eqv2":
            return self.target
        base = self.name or self.target
        if self.kwargs:
            base += json.dumps(self.kwargs, sort_keys=True, separators=(",", ":"))
        return base

    def load_class(self) -> type:
        """Import the calculator class (kind ``ase``); errors name the module or attribute."""
        if self.kind != "ase":
            raise TypeError(f"load_class() is for ASE calculator specs, not kind {self.kind!r}")
        module, _, qualname = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module)
        except ImportError as e:
            raise CalculatorSpecError(
                f"calculator {self.text or self.target!r}: cannot import module {module!r} ({e}); "
                "check the module path and that the package is installed"
            ) from None
        for part in qualname.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                public = sorted(n for n in dir(obj) if n[:1].isupper())
                raise CalculatorSpecError(
                    f"calculator {self.text or self.target!r}: {module!r} has no attribute {part!r}"
                    + (f"; its classes include {', '.join(public[:20])}" if public else "")
                ) from None
        if not callable(obj):
            raise CalculatorSpecError(f"calculator {self.text or self.target!r}: {self.target} is not a class")
        return obj

    def build(self, **eqv2_options: Any) -> Any:
        """Construct the calculator (None for kind ``none``).

        ``eqv2_options`` go to :class:`~eqv2_calc.EquiformerV2Calculator` (device, dtype,
        use_ema, ...) for kind ``eqv2`` and are ignored otherwise. Checkpoint problems raise
        :class:`~eqv2_calc.errors.CheckpointError`."""
        if self.kind == "none":
            return None
        if self.kind == "ase":
            cls = self.load_class()
            try:
                return cls(**self.kwargs)
            except TypeError as e:
                raise CalculatorSpecError(f"calculator {self.text or self.target!r}: {e}") from None
        from eqv2_calc.calculator import EquiformerV2Calculator

        if self.target == "shipped":
            return EquiformerV2Calculator(**eqv2_options)
        if self.target in SHIPPED_VARIANT_NAMES:
            from eqv2_calc.checkpoint.registry import shipped_checkpoint

            path = shipped_checkpoint(SHIPPED_VARIANT_NAMES[self.target])
            return EquiformerV2Calculator(checkpoint_path=str(path), **eqv2_options)
        if os.path.isfile(self.target):
            return EquiformerV2Calculator(checkpoint_path=self.target, **eqv2_options)
        return EquiformerV2Calculator(model_name=self.target, **eqv2_options)


def _options(allow: tuple[str, ...]) -> str:
    opts = sorted(BUILTIN_CALCULATORS) if "ase" in allow else []
    if "eqv2" in allow:
        opts += ["shipped", *SHIPPED_VARIANT_NAMES, "an EquiformerV2 checkpoint file", "an official checkpoint name"]
    if "none" in allow:
        opts.append("none")
    if "ase" in allow:
        opts.append('module:Class (any ASE calculator); ASE calculators take optional JSON keyword '
                    'arguments, e.g. lj{"sigma": 2.3}')
    return "one of " + ", ".join(opts)


def _official_names() -> list[str]:
    from eqv2_calc.checkpoint.registry import OFFICIAL_CHECKPOINTS

    return sorted(OFFICIAL_CHECKPOINTS)


def parse_calculator_spec(
    spec: "str | CalculatorSpec", *, allow: Iterable[str] = KINDS, what: str = "calculator", hint: str = ""
) -> CalculatorSpec:
    """Parse ``spec`` (see the module docstring) into a :class:`CalculatorSpec`.

    ``allow``: the kinds the caller accepts (:data:`KINDS`); ``what`` names the option in
    error messages (e.g. ``"--dft-calculator"``); ``hint`` is appended to the messages for
    unknown specs and refused kinds. Raises :class:`CalculatorSpecError` for an empty, unknown
    or malformed spec, a kind not allowed here, a missing checkpoint file or an unknown
    official name (the message lists the options). Nothing is imported or loaded.
    """
    allow = tuple(allow)
    bad = set(allow) - set(KINDS)
    if bad:
        raise ValueError(f"unknown calculator kinds {sorted(bad)}; valid: {KINDS}")
    if isinstance(spec, CalculatorSpec):
        if spec.kind not in allow:
            raise CalculatorSpecError(f"{what} {spec.text or spec.canonical!r} is not allowed here; use {_options(allow)}")
        return spec
    if not isinstance(spec, str):
        raise CalculatorSpecError(f"{what} must be a string, got {type(spec).__name__}; use {_options(allow)}")
    text = spec
    s = spec.strip()
    if not s:
        raise CalculatorSpecError(f"empty {what}; use {_options(allow)}")
    low = s.lower()

    def refuse(kind: str) -> CalculatorSpecError:
        label = {"eqv2": "EquiformerV2 checkpoints", "ase": "ASE calculators", "none": "'none'"}[kind]
        return CalculatorSpecError(f"{what} {text!r}: {label} are not accepted here; use {_options(allow)}{hint}")

    if low == "none":
        if "none" not in allow:
            raise refuse("none")
        return CalculatorSpec("none", "", {}, "", text)
    if low in BUILTIN_CALCULATORS:
        if "ase" not in allow:
            raise refuse("ase")
        return CalculatorSpec("ase", BUILTIN_CALCULATORS[low], {}, low, text)
    if low in SHIPPED_NAMES or low in SHIPPED_VARIANT_NAMES:
        if "eqv2" not in allow:
            raise refuse("eqv2")
        return CalculatorSpec("eqv2", "shipped" if low in SHIPPED_NAMES else low, {}, "", text)
    if os.path.isfile(s):  # a checkpoint file, before any other reading of the string
        if "eqv2" not in allow:
            raise refuse("eqv2")
        return CalculatorSpec("eqv2", s, {}, "", text)

    head, kwargs = s, {}
    brace = s.find("{")
    if brace >= 0:
        head = s[:brace].strip()
        try:
            kwargs = json.loads(s[brace:])
        except json.JSONDecodeError as e:
            raise CalculatorSpecError(f"{what} {text!r}: the keyword arguments after {head!r} are not valid JSON ({e})") from None
        if not isinstance(kwargs, dict):
            raise CalculatorSpecError(f"{what} {text!r}: keyword arguments must be a JSON object {{\"name\": value}}")
    hlow = head.lower()
    if hlow in BUILTIN_CALCULATORS:
        if "ase" not in allow:
            raise refuse("ase")
        return CalculatorSpec("ase", BUILTIN_CALCULATORS[hlow], kwargs, hlow, text)
    if ":" in head:
        if not _IMPORT_RE.match(head):
            raise CalculatorSpecError(f"{what} {text!r}: expected module:Class (e.g. tblite.ase:TBLite) "
                                      f"or one of {_options(allow)}")
        if "ase" not in allow:
            raise refuse("ase")
        return CalculatorSpec("ase", head, kwargs, "", text)
    if kwargs:
        raise CalculatorSpecError(f"{what} {text!r}: keyword arguments are only for ASE calculators "
                                  f"({', '.join(sorted(BUILTIN_CALCULATORS))} or module:Class)")
    if "eqv2" in allow:
        names = _official_names()
        if s in names:
            return CalculatorSpec("eqv2", s, {}, "", text)
        if os.sep in s or "/" in s or os.path.splitext(s)[1]:
            raise CalculatorSpecError(f"{what} {text!r}: checkpoint file not found")
        raise CalculatorSpecError(f"unknown {what} {text!r}; use {_options(allow)}. Official checkpoint "
                                  f"names: {', '.join(names)}")
    raise CalculatorSpecError(f"unknown {what} {text!r}; use {_options(allow)}{hint}")


def make_calculator(spec: "str | CalculatorSpec", *, allow: Iterable[str] = KINDS, what: str = "calculator",
                    hint: str = "", **eqv2_options: Any) -> Any:
    """``parse_calculator_spec(spec, allow=..., what=..., hint=...).build(**eqv2_options)``."""
    return parse_calculator_spec(spec, allow=allow, what=what, hint=hint).build(**eqv2_options)

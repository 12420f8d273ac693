"""How an actor on another node builds the driver's calculator: :class:`CalculatorRecipe`.

An EquiformerV2 calculator travels as its checkpoint file's *bytes* (put once into Ray's object
store, so every node gets them without a shared file system; the sha256 is checked on arrival)
plus the options it was loaded with; the actor loads it on its own device. Any other calculator
(EMT, ``module:Class``, ...) travels pickled, as Ray sends any argument.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from eqv2_calc.errors import CheckpointError

__all__ = ["CalculatorRecipe", "recipe_for"]


@dataclass
class CalculatorRecipe:
    """A calculator as data. Exactly one of ``checkpoint`` (EquiformerV2: bytes or a Ray object
    reference to them) and ``calculator`` (anything picklable) is set."""

    checkpoint: Any = None
    sha256: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    calculator: Any = None

    def build(self, device: str = "cpu") -> Any:
        """The calculator, inside the actor (EquiformerV2 on ``device``)."""
        if self.calculator is not None:
            return self.calculator
        from eqv2_calc.calculator import EquiformerV2Calculator

        data = self.checkpoint
        if not isinstance(data, (bytes, bytearray)):  # an ObjectRef resolved by Ray, or passed nested
            import ray

            data = ray.get(data)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise CheckpointError("the checkpoint bytes received by the actor do not match the driver's sha256")
        fd, path = tempfile.mkstemp(suffix=".pt", prefix="eqv2-actor-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return EquiformerV2Calculator(checkpoint_path=path, device=device, **self.options)
        finally:
            os.unlink(path)


def recipe_for(calc: Any, *, put=None) -> CalculatorRecipe:
    """The recipe of ``calc`` (an ASE calculator, an ``EquiformerV2Calculator`` or its potential).

    ``put``: stores the checkpoint bytes once (``ray.put``) and returns the reference; without it
    the bytes are embedded. The actors load the file with ``trust_checkpoint=True``: the bytes are
    checked to be those the driver has already unpickled (its own loading applied the safety
    policy the user chose), so this unpickles nothing the driver did not."""
    from eqv2_calc.potential import EquiformerV2Potential

    potential = getattr(calc, "potential", calc)  # an EquiformerV2Calculator holds its potential
    if not isinstance(potential, EquiformerV2Potential):
        return CalculatorRecipe(calculator=calc)
    meta = potential.meta
    if meta is None or not meta.path or not os.path.isfile(meta.path):
        raise CheckpointError("this EquiformerV2Calculator was not loaded from a file: Ray actors need its checkpoint "
                              "file; load it with EquiformerV2Calculator(checkpoint_path=...)")
    with open(meta.path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    if meta.sha256 != sha:
        raise CheckpointError(f"{meta.path} changed on disk since it was loaded (sha256 differs)")
    options = {"dtype": str(potential.model.dtype).replace("torch.", ""), "use_ema": meta.weights == "ema",
               "trust_checkpoint": True}
    return CalculatorRecipe(checkpoint=put(data) if put else data, sha256=sha, options=options)

"""eqv2-calc: EquiformerV2 inference for the official fairchem checkpoints, an ASE calculator,
a batched LBFGS relaxer and the AdsorbML workflow.

Public API::

    from eqv2_calc import EquiformerV2Calculator, load_model, load_potential, relax_batch
"""

from eqv2_calc.calculator import EquiformerV2Calculator
from eqv2_calc.checkpoint import OFFICIAL_CHECKPOINTS, CheckpointMeta, load_model
from eqv2_calc.errors import CheckpointError, Eqv2Error, InputError, UnsupportedElementError
from eqv2_calc.model import EquiformerV2, EquiformerV2Config
from eqv2_calc.potential import ASEPotential, EquiformerV2Potential, Potential, load_potential
from eqv2_calc.relax import RelaxResult, relax_batch

__version__ = "0.1.0"

__all__ = [
    "EquiformerV2Calculator", "load_model", "load_potential", "OFFICIAL_CHECKPOINTS", "CheckpointMeta",
    "EquiformerV2", "EquiformerV2Config", "EquiformerV2Potential", "ASEPotential", "Potential",
    "relax_batch", "RelaxResult",
    "Eqv2Error", "CheckpointError", "InputError", "UnsupportedElementError",
]

"""Reading fairchem EquiformerV2 checkpoints: formats, key mapping, official registry."""

from eqv2_calc.checkpoint.load import CheckpointMeta, load_model
from eqv2_calc.checkpoint.registry import OFFICIAL_CHECKPOINTS, resolve_checkpoint
from eqv2_calc.checkpoint.save import save_fairchem_checkpoint

__all__ = ["CheckpointMeta", "load_model", "save_fairchem_checkpoint", "OFFICIAL_CHECKPOINTS", "resolve_checkpoint"]

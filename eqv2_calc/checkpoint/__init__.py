"""Reading fairchem EquiformerV2 checkpoints: formats, key mapping, official registry."""

from eqv2_calc.checkpoint.load import CheckpointMeta, load_model
from eqv2_calc.checkpoint.registry import OFFICIAL_CHECKPOINTS, resolve_checkpoint

__all__ = ["CheckpointMeta", "load_model", "OFFICIAL_CHECKPOINTS", "resolve_checkpoint"]

"""eqv2-calc: EquiformerV2 inference for the official fairchem checkpoints, an ASE calculator,
a batched LBFGS relaxer and the AdsorbML workflow."""

__version__ = "0.1.0"

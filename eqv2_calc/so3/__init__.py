"""SO(3) math for EquiformerV2: coefficient layouts, edge frames + Wigner-D matrices, S2 grids."""

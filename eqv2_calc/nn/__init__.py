"""EquiformerV2 building blocks. Parameter names follow fairchem's state_dict keys."""

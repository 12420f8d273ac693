"""Feed-forward network with a grid MLP (EquiformerV2 "use_grid_mlp").

x [N, K, C] → so3_linear_1 → to S2 grid → Linear·SiLU·Linear·SiLU·Linear (bias-free, pointwise)
→ back to coefficients; the l = 0 row is replaced by SiLU(scalar_mlp(x_l0)) → so3_linear_2.
The grid is sampled in the global frame.
"""

from __future__ import annotations

import torch
from torch import nn

from eqv2_calc.nn.context import NODE_CHUNK, row_chunks
from eqv2_calc.nn.so3_linear import SO3Linear


class GridFeedForward(nn.Module):
    """Keys ``scalar_mlp.0``, ``so3_linear_1``, ``grid_mlp.{0,2,4}``, ``so3_linear_2``."""

    def __init__(self, channels: int, hidden_channels: int, out_channels: int, lmax: int):
        super().__init__()
        self.scalar_mlp = nn.Sequential(nn.Linear(channels, hidden_channels), nn.SiLU())
        self.so3_linear_1 = SO3Linear(channels, hidden_channels, lmax)
        self.grid_mlp = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels, bias=False), nn.SiLU(),
            nn.Linear(hidden_channels, hidden_channels, bias=False), nn.SiLU(),
            nn.Linear(hidden_channels, hidden_channels, bias=False),
        )
        self.so3_linear_2 = SO3Linear(hidden_channels, out_channels, lmax)

    def forward(self, x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
        """x [N, K, C]; to_grid [G, K], from_grid [K, G] (node grid) → [N, K, out]."""
        scalars = self.scalar_mlp(x[:, 0])
        h = self.so3_linear_1(x)
        chunks = row_chunks(h.shape[0], NODE_CHUNK, h)
        if len(chunks) == 1:
            h = torch.cat([scalars[:, None, :], self._grid_mlp(h, to_grid, from_grid)], dim=1)
        else:  # inference: the [G, nodes, F] grid values of one chunk of nodes at a time
            out = h.new_empty(h.shape)
            out[:, 0] = scalars
            for nodes in chunks:
                out[nodes, 1:] = self._grid_mlp(h[nodes], to_grid, from_grid)
            h = out
        return self.so3_linear_2(h)

    def _grid_mlp(self, h: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
        """Rows l > 0 of from_grid(grid_mlp(to_grid(h))): h [N', K, F] → [N', K−1, F]."""
        num, rows, ch = h.shape
        grid = to_grid @ h.transpose(0, 1).reshape(rows, num * ch)  # [G, N'·F], one GEMM
        grid = self.grid_mlp(grid.view(-1, num, ch))  # pointwise MLP over F
        return (from_grid[1:] @ grid.view(-1, num * ch)).view(rows - 1, num, ch).transpose(0, 1)

"""Edge-degree embedding: initial l > 0 node features from the neighbour distribution.

Per edge a radial MLP gives the m = 0 coefficients of degrees 0..L in the edge frame; they are
rotated to the global frame, summed at the target node and divided by ``avg_degree``.
"""

from __future__ import annotations

import torch

from eqv2_calc.nn.context import EDGE_CHUNK, EdgeContext, EdgeEmbedding, row_chunks
from eqv2_calc.nn.radial import RadialMLP


class EdgeDegreeEmbedding(EdgeEmbedding):
    """Keys ``{source,target}_embedding``, ``rad_func``. Output [N, K, C]."""

    def __init__(
        self, channels: int, lmax: int, radial_channels: list[int],
        max_num_elements: int | None, avg_degree: float,
    ):
        super().__init__(max_num_elements, radial_channels[-1])
        self.lmax, self.channels, self.avg_degree = lmax, channels, avg_degree
        self.rad_func = RadialMLP(list(radial_channels) + [(lmax + 1) * channels])

    def forward(self, ctx: EdgeContext) -> torch.Tensor:
        chunks = row_chunks(ctx.src.shape[0], EDGE_CHUNK, ctx.rot_inv)
        out = ctx.rot_inv.new_zeros(ctx.num_nodes, ctx.rot_inv.shape[1], self.channels)
        for edges in chunks:  # in edge order: the same sums as one index_add_ over all edges
            m0 = self.rad_func(self.edge_features(ctx, edges)).view(-1, self.lmax + 1, self.channels)
            msg = torch.bmm(ctx.rot_inv[edges, :, : self.lmax + 1], m0)  # m = 0 rows come first
            out.index_add_(0, ctx.dst[edges], msg)
        return out / self.avg_degree

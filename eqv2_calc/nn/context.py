"""Per-forward edge data shared by every layer (computed once per graph).

Shapes: N nodes, E edges, K = (L+1)², Kr = edge-frame rows (m-primary), G = grid points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EdgeContext:
    """Graph and edge-frame tensors.

    src, dst        [E] int64   edge source j and target i (messages flow j → i)
    src_z, dst_z    [E] int64   atomic numbers of source and target
    distance_feats  [E, F]      Gaussian distance features (or shared edge features)
    rot             [E, Kr, K]  global → edge frame (rows in m-primary order)
    rot_inv         [E, K, Kr]  edge frame → global, degree rescale included
    num_nodes       int
    """

    src: torch.Tensor
    dst: torch.Tensor
    src_z: torch.Tensor
    dst_z: torch.Tensor
    distance_feats: torch.Tensor
    rot: torch.Tensor
    rot_inv: torch.Tensor
    num_nodes: int

    def aggregate(self, messages: torch.Tensor) -> torch.Tensor:
        """Sum edge messages [E, ...] onto their target nodes → [N, ...]."""
        out = messages.new_zeros((self.num_nodes,) + tuple(messages.shape[1:]))
        return out.index_add_(0, self.dst, messages)


class EdgeEmbedding(torch.nn.Module):
    """Optional per-consumer atom embeddings appended to the distance features.

    With ``max_num_elements`` set, owns ``source_embedding`` / ``target_embedding``
    (keys as in fairchem) and returns concat[distance, emb(Z_src), emb(Z_dst)]; otherwise
    returns the context's features unchanged (shared or no atom-edge embedding).
    """

    def __init__(self, max_num_elements: int | None, channels: int):
        super().__init__()
        self.own = max_num_elements is not None
        if self.own:
            self.source_embedding = torch.nn.Embedding(max_num_elements, channels)
            self.target_embedding = torch.nn.Embedding(max_num_elements, channels)

    def edge_features(self, ctx: EdgeContext) -> torch.Tensor:
        if not self.own:
            return ctx.distance_feats
        return torch.cat(
            [ctx.distance_feats, self.source_embedding(ctx.src_z), self.target_embedding(ctx.dst_z)],
            dim=1,
        )

"""Per-forward edge data shared by every layer (computed once per graph).

Shapes: N nodes, E edges, K = (L+1)², Kr = edge-frame rows (m-primary), G = grid points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EDGE_CHUNK = 256
"""Edges per chunk of the per-edge computations (inference on the CPU, see :func:`row_chunks`)."""
NODE_CHUNK = 16
"""Nodes per chunk of the feed-forward grid MLP (inference on the CPU, see :func:`row_chunks`)."""


def row_chunks(num: int, size: int, like: torch.Tensor) -> list[slice]:
    """Slices of ``num`` rows (edges or nodes) that a large per-row computation processes at a time.

    Inference on the CPU: equal chunks of at most ``size`` rows. Every per-row temporary is then a few MB
    whatever the graph size, stays in the CPU caches, and is recycled by the C allocator from
    call to call instead of being mapped and unmapped for every layer (fresh pages, page faults:
    10–20 % of a call under glibc's default malloc settings). With autograd, and on other
    devices, one chunk of all rows, which the caller computes as before.
    """
    if torch.is_grad_enabled() or like.device.type != "cpu" or num <= size:
        return [slice(None)]
    step = -(-num // -(-num // size))  # equal chunks of at most ``size`` rows
    return [slice(start, start + step) for start in range(0, num, step)]


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

    def edge_features(self, ctx: EdgeContext, edges: slice = slice(None)) -> torch.Tensor:
        """Features [E', F'] of the edges ``edges`` (default: all)."""
        if not self.own:
            return ctx.distance_feats[edges]
        return torch.cat(
            [ctx.distance_feats[edges], self.source_embedding(ctx.src_z[edges]),
             self.target_embedding(ctx.dst_z[edges])],
            dim=1,
        )

"""SO(2) convolution in the edge frame (eSCN).

Input and output are m-primary edge-frame features [E, Kr, C] (see :mod:`eqv2_calc.so3.layout`).
For each order m the n_m = L+1−m degrees are mixed by a linear map; for m > 0 the (+m, −m)
pair is treated as the (real, imaginary) parts of a complex number:
out(+m) = W_r x(+m) − W_i x(−m),  out(−m) = W_r x(−m) + W_i x(+m), where fc = [W_r; W_i].
Optional radial weights [E, Σ_m n_m·Cin] multiply the inputs first (chunks [m0 | m1 | …],
each flattened (l, channel)).
"""

from __future__ import annotations

import torch
from torch import nn

from eqv2_calc.nn.radial import RadialMLP
from eqv2_calc.so3.layout import m_sizes


class SO2MConv(nn.Module):
    """The m > 0 map: ``fc`` Linear(n_m·Cin → 2·n_m·Cout), no bias."""

    def __init__(self, in_channels: int, out_channels: int, n: int):
        super().__init__()
        self.n, self.out_channels = n, out_channels
        self.fc = nn.Linear(n * in_channels, 2 * n * out_channels, bias=False)

    def gauss_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_r, W_i − W_r, W_r + W_i), each [n·Cout, n·Cin]: computed once per forward, not per chunk."""
        half = self.n * self.out_channels
        w_r, w_i = self.fc.weight[:half], self.fc.weight[half:]
        return w_r, w_i - w_r, w_r + w_i

    def forward(
        self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[E, 2, n·Cin] (+m half, −m half) → [E, 2n, Cout]; ``weights`` from :meth:`gauss_weights`.

        The complex product uses Gauss's three-multiplication form (3 GEMMs instead of 4):
        k1 = W_r(x₊ + x₋), k2 = (W_i − W_r)x₊, k3 = (W_r + W_i)x₋; out₊ = k1 − k3, out₋ = k1 + k2.
        """
        w_r, w_diff, w_sum = self.gauss_weights() if weights is None else weights
        x_pos, x_neg = x[:, 0], x[:, 1]
        k1 = (x_pos + x_neg) @ w_r.T
        k2 = x_pos @ w_diff.T
        k3 = x_neg @ w_sum.T
        return torch.stack([k1 - k3, k1 + k2], dim=1).reshape(x.shape[0], 2 * self.n, self.out_channels)


class SO2Convolution(nn.Module):
    """Keys ``fc_m0``, ``so2_m_conv.{m-1}.fc``, ``rad_func`` (when ``radial_channels``).

    ``extra_m0_outputs`` scalars are split off the front of the m = 0 output and returned
    separately (attention logits and gates).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        lmax: int,
        mmax: int,
        radial_channels: list[int] | None = None,
        extra_m0_outputs: int = 0,
    ):
        super().__init__()
        self.sizes = m_sizes(lmax, mmax)
        self.in_channels, self.out_channels, self.extra = in_channels, out_channels, extra_m0_outputs
        n0 = self.sizes[0]
        self.fc_m0 = nn.Linear(n0 * in_channels, n0 * out_channels + extra_m0_outputs)
        self.so2_m_conv = nn.ModuleList(
            SO2MConv(in_channels, out_channels, n) for n in self.sizes[1:]
        )
        self.rad_func = None
        if radial_channels is not None:
            self.rad_func = RadialMLP(list(radial_channels) + [sum(self.sizes) * in_channels])

    def m_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The m > 0 maps' :meth:`SO2MConv.gauss_weights`, to pass to several chunked calls."""
        return [conv.gauss_weights() for conv in self.so2_m_conv]

    def forward(
        self,
        x: torch.Tensor,
        edge_features: torch.Tensor | None = None,
        m_weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [E, Kr, Cin], edge_features [E, F] → (out [E, Kr, Cout], extras [E, extra]).

        ``m_weights``: :meth:`m_weights`, when the caller evaluates the edges in chunks;
        ``out``: a contiguous [E, Kr, Cout] tensor to write the result into (inference only)."""
        num_edges, cin = x.shape[0], self.in_channels
        weights = self.rad_func(edge_features) if self.rad_func is not None else None
        n0 = self.sizes[0]
        x0 = x[:, :n0].reshape(num_edges, n0 * cin)
        if weights is not None:
            x0 = x0 * weights[:, : n0 * cin]
        y0 = self.fc_m0(x0)
        extras = y0[:, : self.extra]
        outs = [y0[:, self.extra :].reshape(num_edges, n0, self.out_channels)]
        row, col = n0, n0 * cin
        if m_weights is None:
            m_weights = self.m_weights()
        for n, conv, w in zip(self.sizes[1:], self.so2_m_conv, m_weights):
            xm = x[:, row : row + 2 * n].reshape(num_edges, 2, n * cin)
            if weights is not None:
                xm = xm * weights[:, None, col : col + n * cin]
            outs.append(conv(xm, w))
            row, col = row + 2 * n, col + n * cin
        if out is not None:
            return torch.cat(outs, dim=1, out=out), extras
        return torch.cat(outs, dim=1), extras

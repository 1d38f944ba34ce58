"""Building blocks shared by several generators: criss-cross attention (CCNet).

Huang, Wang, Huang, Huang, Wei and Liu, "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019.
A criss-cross attention pass lets every position attend to the positions of its own row and its own column
(``H + W - 1`` of them: the position itself is counted once), instead of to all ``H x W`` positions as a non-local
block does. Queries and keys are 1x1 projections to ``C / reduction`` channels, values a 1x1 projection to ``C``
channels; the energies of the column and of the row are normalised by one softmax over the ``H + W - 1``
positions, the values aggregated with those weights, and the result added to the input scaled by a learned
``gamma`` that starts at 0 (so an untrained block is the identity, and a generator that contains it starts as the
same network without it). Applied twice with shared weights (CCNet's recurrence ``R = 2``), every position
receives information from every other position: from ``(i, j)`` to ``(k, l)`` through ``(k, j)`` (or
``(i, l)``), at the cost of ``O(HW (H + W))`` instead of ``O((HW)^2)``.

DAFF-GAN (Cheng et al.) uses these blocks in the bottleneck of pix2pixHD-style generators, twice: in the masks ->
H&E renderer (:mod:`napari_nucsynth.models.pix2pixhd`) and in the points -> masks model
(:mod:`napari_nucsynth.models.daff`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CrissCrossAttention", "RecurrentCrissCross"]


class CrissCrossAttention(nn.Module):
    """One criss-cross attention pass (see the module docstring): ``x + gamma * attention(x)``.

    Parameters
    ----------
    channels : int
        Channels of the input (and output).
    reduction : int
        Queries and keys have ``max(1, channels // reduction)`` channels (CCNet: 8).
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        if int(channels) < 1 or int(reduction) < 1:
            raise ValueError(f"channels and reduction must be positive, got {channels} and {reduction}")
        inner = max(1, int(channels) // int(reduction))
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The aggregated values (without the residual and ``gamma``), N x C x H x W."""
        n, _, h, w = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        # energies of the column (positions (g, j) for output (i, j)) and of the row (positions (i, g))
        e_col = torch.einsum("nchw,ncgw->nhwg", q, k)
        e_row = torch.einsum("nchw,nchg->nhwg", q, k)
        # the position itself is in both its row and its column: count it once (in the row)
        own = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]  # (i, 1, g): g == i
        e_col = e_col.masked_fill(own, float("-inf"))
        att = torch.softmax(torch.cat([e_col, e_row], -1), -1)
        a_col, a_row = att[..., :h].to(v.dtype), att[..., h:].to(v.dtype)
        return torch.einsum("nhwg,ncgw->nchw", a_col, v) + torch.einsum("nhwg,nchg->nchw", a_row, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.attention(x)


class RecurrentCrissCross(nn.Module):
    """CCNet's recurrent criss-cross attention: one :class:`CrissCrossAttention` applied ``recurrence`` times with
    shared weights (2 gives every position the context of the whole image). The identity until ``gamma`` learns."""

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2):
        super().__init__()
        if int(recurrence) < 1:
            raise ValueError(f"recurrence must be at least 1, got {recurrence}")
        self.recurrence = int(recurrence)
        self.cca = CrissCrossAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x

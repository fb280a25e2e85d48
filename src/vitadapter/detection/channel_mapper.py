"""Upstream's ``ChannelMapperWithPooling`` neck (its no-FPN Mask R-CNN): each level mapped on its own."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv_module import ConvModule


class ChannelMapperWithPooling(nn.Module):
    """A conv + ReLU per level (no top-down pass), then 2x2 stride-2 max-pools of the last map up to
    ``num_outs`` levels. Module names follow upstream: ``convs.{i}.conv``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int = 5, kernel_size: int = 1, norm: bool = False):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.convs = nn.ModuleList(ConvModule(c, out_channels, kernel_size, norm=norm) for c in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.convs):
            raise ValueError(f"ChannelMapperWithPooling expects {len(self.convs)} feature maps, got {len(features)}")
        outs = [conv(x) for conv, x in zip(self.convs, features)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 2, stride=2))
        return outs

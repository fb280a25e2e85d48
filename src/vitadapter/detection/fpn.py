"""The FPN neck in mmdet 2.x's layout: pyramid (strides 4-32) -> ``num_outs`` maps of one width."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .conv_module import ConvModule


class FPN(nn.Module):
    """1x1 ``lateral_convs``, a top-down pass (nearest upsampling to the finer map's size, added), 3x3
    ``fpn_convs``, no activation; levels beyond the inputs are stride-2 max-pools (kernel 1) of the last
    output, mmdet's ``add_extra_convs=False``. ``norm`` puts a norm after every conv: True or "BN"
    BatchNorm (upstream's LSJ recipes), "GN" GroupNorm of ``num_groups`` groups (its Objects365 HTC++)."""

    def __init__(
        self, in_channels: Sequence[int], out_channels: int, num_outs: int = 5, norm: Union[bool, str] = False,
        num_groups: int = 32,
    ):
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("in_channels must list at least one input level")
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=norm, act=False, num_groups=num_groups) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, norm=norm, act=False, num_groups=num_groups) for _ in in_channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN expects {len(self.lateral_convs)} feature maps, got {len(features)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs

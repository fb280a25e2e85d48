"""mmcv's ``ConvModule`` without a norm, the unit of mmdet's RoI and semantic heads: a conv with bias
followed by ReLU, its weights stored as ``conv.weight`` / ``conv.bias`` as in mmdet checkpoints."""
from __future__ import annotations

import torch
from torch import nn


class ConvReLU(nn.Module):
    """Conv2d (with bias) -> ReLU, initialised as mmcv does (Kaiming normal, fan-out; zero bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

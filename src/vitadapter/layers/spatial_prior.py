"""Spatial prior module: a small conv stem that gives the adapter its stride 4-32 maps
(docs/upstream.md, "Forward")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _conv_bn_relu(in_chs: int, out_chs: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """Image -> four ``dim``-channel maps at strides 4, 8, 16, 32."""

    def __init__(self, dim: int, inplanes: int = 64, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(in_chans, inplanes, 2),
            *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, x: torch.Tensor, finest: bool = True) -> list[Optional[torch.Tensor]]:
        """The four maps; the stride-4 one is ``None`` without ``finest`` (a model pruned to the
        coarser levels, whose ``fc1`` is gone)."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1) if finest else None, self.fc2(c2), self.fc3(c3), self.fc4(c4)]

"""Spatial prior module: a small conv stem that gives the adapter its stride 4-32 maps
(docs/upstream.md, "Forward")."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
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
        c1 = _run_folded(self.stem, x)
        c2 = _run_folded(self.conv2, c1)
        c3 = _run_folded(self.conv3, c2)
        c4 = _run_folded(self.conv4, c3)
        return [self.fc1(c1) if finest else None, self.fc2(c2), self.fc3(c3), self.fc4(c4)]


def _run_folded(stack: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``stack``; outside training, each conv followed by a BatchNorm with running statistics
    runs as one conv with the norm folded into its weight and bias.

    The stem's maps are the model's largest (64 x H/2 x W/2, 16 MB at 512 x 512): a separate
    BatchNorm reads one and writes a fresh one, about 1-4 ms each on a 2-core CPU. The modules stay
    as they are (their parameter names are upstream's); only the arithmetic moves, which changes
    results by float rounding alone.
    """
    layers = list(stack)
    i = 0
    while i < len(layers):
        layer = layers[i]
        norm = layers[i + 1] if i + 1 < len(layers) else None
        if _foldable(layer, norm):
            x = _folded_conv(layer, norm, x)
            i += 2
        else:
            x = layer(x)
            i += 1
    return x


def _foldable(conv: nn.Module, norm: Optional[nn.Module]) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(norm) is nn.BatchNorm2d
        and not norm.training
        and norm.running_var is not None
        and conv.padding_mode == "zeros"
    )


def _folded_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    # folded here rather than with torch.nn.utils.fusion, whose detached Parameters would cut the
    # gradient of a model run in eval mode with autograd on (frozen statistics, attribution)
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    return F.conv2d(x, weight, shift.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)

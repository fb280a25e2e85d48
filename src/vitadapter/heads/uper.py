"""UPerHead (Unified Perceptual Parsing), the decode head of upstream's UperNet models.

A pyramid pooling module on the coarsest level, a top-down path through lateral 1x1 convs, a 3x3
conv on each merged level, then all levels upsampled to the finest one, concatenated and fused.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConvNormAct, DecodeHead


class UPerHead(DecodeHead):
    """Pyramid (``in_channels`` per level read, finest first) -> logits at the finest level's stride.

    Module names match mmseg 0.x: ``psp_modules.{i}.1`` (after the adaptive pool), ``bottleneck``,
    ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        in_index: Sequence[int] = (0, 1, 2, 3),
        **kwargs,
    ):
        in_channels = list(in_channels)
        if len(in_channels) != len(in_index) or len(in_channels) < 1:
            raise ValueError(f"UPerHead needs one in_channels entry per level read: {in_channels} for in_index {list(in_index)}")
        super().__init__(channels, num_classes, in_index, **kwargs)
        self.in_channels = in_channels
        self.pool_scales = tuple(pool_scales)
        coarsest = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(coarsest, channels, 1)) for scale in self.pool_scales
        )
        self.bottleneck = ConvNormAct(coarsest + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, padding=1)

    def features_to_map(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = self.select(features)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels)]
        laterals.append(self._pyramid_pooling(levels[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the coarser one added
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        finest = outs[0].shape[2:]
        outs = [outs[0]] + [self._resize(x, finest) for x in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def _pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [self._resize(module(x), x.shape[2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=self.align_corners)

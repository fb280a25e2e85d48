"""FCNHead: a few convs and a classifier on one pyramid level, upstream's auxiliary head
(on the stride-16 level, weighted 0.4 in the loss, unused at inference)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import ConvNormAct, DecodeHead


class FCNHead(DecodeHead):
    """One level (``in_index``) -> ``num_convs`` conv units -> logits at that level's stride.

    ``concat_input`` fuses the convs' output with the input through ``conv_cat``. Module names match
    mmseg 0.x: ``convs.{i}``, ``conv_cat``, ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        num_classes: int = 150,
        num_convs: int = 1,
        kernel_size: int = 3,
        dilation: int = 1,
        concat_input: bool = False,
        in_index: int = 2,
        loss_weight: float = 0.4,
        **kwargs,
    ):
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNHead without convs passes its input through: in_channels ({in_channels}) must equal channels ({channels})")
        if not isinstance(in_index, int):
            raise ValueError(f"FCNHead reads one pyramid level: in_index must be an int, got {in_index!r}")
        super().__init__(channels, num_classes, in_index, loss_weight=loss_weight, **kwargs)
        padding = kernel_size // 2 * dilation
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(
            *(ConvNormAct(c_in, channels, kernel_size, padding, dilation) for c_in in widths[:-1])
        )
        self.conv_cat = ConvNormAct(in_channels + channels, channels, kernel_size, kernel_size // 2) if concat_input else None

    def features_to_map(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        (x,) = self.select(features)
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return out

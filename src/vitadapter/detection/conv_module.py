"""mmcv's ``ConvModule`` as the detector parts use it: conv, optional BatchNorm, optional ReLU, stored
as ``conv.*`` and ``bn.*`` so mmdet checkpoints load without renaming."""
from __future__ import annotations

import torch
from torch import nn


class ConvModule(nn.Module):
    """Conv -> (BatchNorm) -> (ReLU). The conv has a bias only without a norm, as mmcv's ``bias="auto"``.

    Upstream trains the normed variants with SyncBatchNorm; its parameters and running statistics are
    those of a plain ``BatchNorm2d`` (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns them back).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU() if act else None
        # mmcv's ConvModule initialisation, so heads trained from scratch start where upstream's do
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x

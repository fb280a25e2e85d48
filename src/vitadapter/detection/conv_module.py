"""mmcv's ``ConvModule`` as the detector parts use it: conv, optional BatchNorm or GroupNorm, optional
ReLU, stored as ``conv.*`` and ``bn.*`` / ``gn.*`` so mmdet checkpoints load without renaming."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn


class ConvModule(nn.Module):
    """Conv -> (norm) -> (ReLU). The conv has a bias only without a norm, as mmcv's ``bias="auto"``.

    ``norm``: False, True or "BN" (BatchNorm), "GN" (GroupNorm of ``num_groups`` groups, mmcv's
    ``dict(type="GN", num_groups=...)``). Upstream trains the BatchNorm variants with SyncBatchNorm;
    its parameters and running statistics are those of a plain ``BatchNorm2d``
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns them back).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, norm: Union[bool, str] = False, act: bool = True,
        num_groups: int = 32,
    ):
        super().__init__()
        if norm not in (False, True, "BN", "GN"):
            raise ValueError(f"norm must be False, True, 'BN' or 'GN', got {norm!r}")
        if norm == "GN" and out_channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide the {out_channels} output channels")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm in (True, "BN") else None
        self.gn = nn.GroupNorm(num_groups, out_channels) if norm == "GN" else None
        self.activate = nn.ReLU() if act else None
        # mmcv's ConvModule initialisation, so heads trained from scratch start where upstream's do
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.gn is not None:
            x = self.gn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x

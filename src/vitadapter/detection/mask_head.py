"""The FCN mask head of Mask R-CNN (mmdet's ``FCNMaskHead``)."""
from __future__ import annotations

import torch
from torch import nn

from .conv_module import ConvModule


class FCNMaskHead(nn.Module):
    """RoI features (K, C, s, s) -> ``convs`` (3x3 + [BN] + ReLU) -> 2x ``upsample`` (transposed conv +
    ReLU) -> ``conv_logits``: (K, num_classes, 2s, 2s) mask logits (one class-agnostic map if asked)."""

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        num_convs: int = 4,
        conv_out_channels: int = 256,
        norm: bool = False,
        class_agnostic: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        widths = [in_channels] + [conv_out_channels] * num_convs
        self.convs = nn.ModuleList(ConvModule(a, b, 3, norm=norm) for a, b in zip(widths[:-1], widths[1:]))
        self.upsample = nn.ConvTranspose2d(widths[-1], conv_out_channels, 2, stride=2)
        self.relu = nn.ReLU()
        self.conv_logits = nn.Conv2d(conv_out_channels, 1 if class_agnostic else num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def features(self, roi_features: torch.Tensor) -> torch.Tensor:
        """The last conv unit's output."""
        x = roi_features
        for conv in self.convs:
            x = conv(x)
        return x

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """Mask logits (K, classes, 2s, 2s) from :meth:`features`' output."""
        return self.conv_logits(self.relu(self.upsample(feat)))

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(roi_features))

    def label_logits(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, 2s, 2s) logits of each RoI's own class (of the one map when class-agnostic)."""
        logits = self.logits(self.features(roi_features))
        channel = torch.zeros_like(labels) if self.class_agnostic else labels
        return logits[torch.arange(logits.shape[0], device=logits.device), channel]

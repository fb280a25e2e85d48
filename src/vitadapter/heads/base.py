"""What the convolutional decode heads share: mmseg's conv-norm-ReLU unit, the classifier behind
dropout, and the training loss.

Every head here maps the backbone's pyramid (a list of NCHW maps, strides 4, 8, 16, 32) to class
logits at the stride of the finest level it reads. Parameter names follow mmseg 0.x, so the
``decode_head.*`` / ``auxiliary_head.*`` entries of upstream's checkpoints load without renaming.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvNormAct(nn.Module):
    """Conv (no bias: the norm has one) -> BatchNorm -> ReLU, stored as ``conv.*`` and ``bn.*``.

    Upstream trains with SyncBatchNorm; its statistics and affine parameters are those of a plain
    ``BatchNorm2d`` (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns them back for DDP).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DecodeHead(nn.Module):
    """Base of the convolutional heads: which pyramid levels are read (``in_index``), the 1x1
    classifier ``conv_seg`` behind ``Dropout2d``, and mmseg's pixel-wise cross-entropy loss.

    Subclasses implement ``features_to_map`` (pyramid -> ``channels``-wide map); ``forward`` then
    classifies it.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        in_index: int | Sequence[int],
        dropout_ratio: float = 0.1,
        align_corners: bool = False,
        loss_weight: float = 1.0,
        ignore_index: int = 255,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0 <= dropout_ratio < 1:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {dropout_ratio}")
        self.channels = channels
        self.num_classes = num_classes
        self.in_index = in_index if isinstance(in_index, int) else tuple(in_index)
        self.align_corners = align_corners
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class logits at the stride of the finest level read."""
        return self.conv_seg(self.dropout(self.features_to_map(features)))

    def features_to_map(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def semantic_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """What the segmentor resizes to the image: for these heads, ``forward`` itself."""
        return self(features)

    def loss(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """mmseg's ``loss_ce``: logits resized to the labels (bilinear), cross-entropy per pixel,
        averaged over *all* pixels (ignored ones count as zero, as mmseg 0.x averages), times
        ``loss_weight``. ``labels``: (B, H, W) class indices, ``ignore_index`` where unlabelled."""
        logits = F.interpolate(self(features), size=labels.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=self.ignore_index, reduction="none")
        return {"loss_ce": self.loss_weight * per_pixel.mean()}

    def select(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The pyramid levels this head reads, in ``in_index`` order."""
        indexes = (self.in_index,) if isinstance(self.in_index, int) else self.in_index
        if not all(-len(features) <= i < len(features) for i in indexes):
            raise ValueError(f"{type(self).__name__} reads pyramid levels {list(indexes)}, got {len(features)} levels")
        return [features[i] for i in indexes]

"""R-CNN box heads: mmdet's ``ConvFCBBoxHead`` family (``Shared2FCBBoxHead``, the cascade's
4-conv-1-fc head with BatchNorm, ``Shared4Conv1FCBBoxHead``), with the background class LAST."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .box_coder import DeltaXYWHBBoxCoder
from .conv_module import ConvModule


class ConvFCBBoxHead(nn.Module):
    """RoI features (K, C, s, s) -> ``shared_convs`` (3x3 + [BN] + ReLU) -> flatten (C, s, s) order ->
    ``shared_fcs`` (+ ReLU) -> ``fc_cls`` (num_classes + 1 logits, background last) and ``fc_reg``
    (4 deltas per class, or 4 shared with ``reg_class_agnostic``).

    Defaults are ``Shared2FCBBoxHead``'s. The deltas decode with this stage's ``target_stds``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        roi_feat_size: int = 7,
        num_shared_convs: int = 0,
        num_shared_fcs: int = 2,
        conv_out_channels: int = 256,
        fc_out_channels: int = 1024,
        norm: bool = False,
        reg_class_agnostic: bool = False,
        target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if num_shared_fcs < 1:
            raise ValueError(f"num_shared_fcs must be at least 1, got {num_shared_fcs}")
        self.num_classes = num_classes
        self.roi_feat_size = roi_feat_size
        self.reg_class_agnostic = reg_class_agnostic
        self.bbox_coder = DeltaXYWHBBoxCoder(target_means, target_stds)
        conv_widths = [in_channels] + [conv_out_channels] * num_shared_convs
        self.shared_convs = nn.ModuleList(ConvModule(a, b, 3, norm=norm) for a, b in zip(conv_widths[:-1], conv_widths[1:]))
        fc_widths = [conv_widths[-1] * roi_feat_size * roi_feat_size] + [fc_out_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(fc_widths[:-1], fc_widths[1:]))
        self.relu = nn.ReLU()
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 if reg_class_agnostic else 4 * num_classes)

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (K, num_classes + 1), deltas (K, 4 or 4 * num_classes))."""
        x = roi_features
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = self.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def decode(self, boxes: torch.Tensor, deltas: torch.Tensor, image_size: Optional[tuple[int, int]]) -> torch.Tensor:
        """Boxes (K, 4) + this head's deltas -> (K, 4) or (K, 4 * num_classes) boxes clipped to ``image_size``."""
        return self.bbox_coder.decode(boxes, deltas, max_shape=image_size)

    def regress_by_class(self, boxes: torch.Tensor, labels: torch.Tensor, deltas: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """The cascade's refinement: each box moved by the deltas of its ``labels`` class."""
        if not self.reg_class_agnostic:
            columns = labels[:, None] * 4 + torch.arange(4, device=labels.device)
            deltas = deltas.gather(1, columns)
        return self.decode(boxes, deltas, image_size)

"""R-CNN box heads: mmdet's ``ConvFCBBoxHead`` family (``Shared2FCBBoxHead``, the cascade's
4-conv-1-fc head with BatchNorm, ``Shared4Conv1FCBBoxHead``), with the background class LAST."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .box_coder import DeltaXYWHBBoxCoder
from .box_losses import BoxRegressionLoss
from .conv_module import ConvModule
from .sampler import SamplingResult


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

    def sample_labels(self, samples: Sequence[SamplingResult]) -> torch.Tensor:
        """(K,) class targets of the sampled RoIs in loss order: per image the positives' gt classes, then
        ``num_classes`` (background) for its negatives."""
        return torch.cat([
            torch.cat([s.pos_gt_labels, s.pos_gt_labels.new_full((s.neg_boxes.shape[0],), self.num_classes)]) for s in samples
        ])

    def loss(
        self, logits: torch.Tensor, deltas: torch.Tensor, samples: Sequence[SamplingResult], regression: BoxRegressionLoss
    ) -> dict[str, torch.Tensor]:
        """mmdet's ``BBoxHead.loss`` on this head's outputs for the RoIs ``torch.cat([s.boxes for s in
        samples])``: ``{"loss_cls", "loss_bbox"}``.

        Softmax cross-entropy (background last) and ``regression`` on each positive's deltas of its gt
        class (decoded from its RoI, unclipped, when the loss is on boxes), each summed and divided by
        the number of sampled RoIs.
        """
        labels = self.sample_labels(samples)
        if logits.shape[0] != labels.shape[0] or deltas.shape[0] != labels.shape[0]:
            raise ValueError(f"logits and deltas need one row per sampled RoI ({labels.shape[0]}), got {logits.shape[0]} and {deltas.shape[0]}")
        num_samples = max(labels.shape[0], 1)
        loss_cls = F.cross_entropy(logits.float(), labels, reduction="sum") / num_samples
        positive = labels < self.num_classes
        pos_deltas = deltas.float()[positive]
        if not self.reg_class_agnostic:
            pos_deltas = pos_deltas.unflatten(1, (-1, 4))[torch.arange(pos_deltas.shape[0], device=labels.device), labels[positive]]
        # positives come first within each image, so these rows line up with the gt boxes below
        pos_rois = torch.cat([s.pos_boxes for s in samples]).float()
        gt_boxes = torch.cat([s.pos_gt_boxes for s in samples]).float()
        if regression.decoded:
            loss_bbox = regression(self.bbox_coder.decode(pos_rois, pos_deltas), gt_boxes)
        else:
            loss_bbox = regression(pos_deltas, self.bbox_coder.encode(pos_rois, gt_boxes))
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox / num_samples}

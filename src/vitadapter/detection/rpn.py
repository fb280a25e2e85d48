"""The region proposal network: mmdet 2.x's ``RPNHead`` and its test-time proposal rules."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import AnchorGenerator
from .box_coder import DeltaXYWHBBoxCoder
from .conv_module import ConvModule
from .postprocess import batched_nms


class RPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then per anchor a sigmoid objectness (``rpn_cls``) and 4 deltas
    (``rpn_reg``) on every neck level. ``proposals`` turns the maps into per-image boxes.

    Proposal rules (``test_cfg.rpn``): per level the ``nms_pre`` best anchors by objectness, decoded
    and clipped to the image; boxes with a side <= ``min_bbox_size`` dropped; one NMS (IoU
    ``iou_threshold``) in which levels never suppress each other; the ``max_per_img`` best kept.
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int = 256,
        num_convs: int = 1,
        anchor_strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_scales: Sequence[float] = (8,),
        target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        nms_pre: int = 1000,
        max_per_img: int = 1000,
        iou_threshold: float = 0.7,
        min_bbox_size: float = 0.0,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs must be at least 1, got {num_convs}")
        self.anchor_generator = AnchorGenerator(anchor_strides, anchor_ratios, anchor_scales)
        self.bbox_coder = DeltaXYWHBBoxCoder(target_means, target_stds)
        num_anchors = self.anchor_generator.num_anchors
        # mmdet keeps a bare conv for one layer and ConvModules for more: the checkpoint keys differ
        if num_convs == 1:
            self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        else:
            widths = [in_channels] + [feat_channels] * num_convs
            self.rpn_conv = nn.Sequential(*(ConvModule(a, b, 3) for a, b in zip(widths[:-1], widths[1:])))
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.nms_pre = nms_pre
        self.max_per_img = max_per_img
        self.iou_threshold = iou_threshold
        self.min_bbox_size = min_bbox_size

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness logits (B, A, h, w) and deltas (B, 4A, h, w), channel 4a + k."""
        if len(features) != len(self.anchor_generator.strides):
            raise ValueError(f"RPNHead expects {len(self.anchor_generator.strides)} levels, got {len(features)}")
        cls_maps, reg_maps = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x))
            cls_maps.append(self.rpn_cls(x))
            reg_maps.append(self.rpn_reg(x))
        return cls_maps, reg_maps

    def proposals(
        self, cls_maps: Sequence[torch.Tensor], reg_maps: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Per image (N, 5) proposals (x1, y1, x2, y2, objectness), best first, in the batch's pixels."""
        anchors = self.anchor_generator([tuple(m.shape[-2:]) for m in cls_maps])
        return [
            self._image_proposals([m[i] for m in cls_maps], [m[i] for m in reg_maps], anchors, size)
            for i, size in enumerate(image_sizes)
        ]

    def _image_proposals(self, cls_maps, reg_maps, anchors, image_size) -> torch.Tensor:
        scores, deltas, priors, levels = [], [], [], []
        for level, (cls, reg, level_anchors) in enumerate(zip(cls_maps, reg_maps, anchors)):
            level_scores = cls.permute(1, 2, 0).reshape(-1).sigmoid()
            level_deltas = reg.permute(1, 2, 0).reshape(-1, 4)
            if 0 < self.nms_pre < level_scores.shape[0]:
                level_scores, order = level_scores.sort(descending=True)
                level_scores, order = level_scores[: self.nms_pre], order[: self.nms_pre]
                level_deltas, level_anchors = level_deltas[order], level_anchors[order]
            scores.append(level_scores)
            deltas.append(level_deltas)
            priors.append(level_anchors)
            levels.append(torch.full_like(level_scores, level, dtype=torch.long))
        scores, levels = torch.cat(scores), torch.cat(levels)
        boxes = self.bbox_coder.decode(torch.cat(priors), torch.cat(deltas), max_shape=image_size)
        if self.min_bbox_size >= 0:
            valid = (boxes[:, 2] - boxes[:, 0] > self.min_bbox_size) & (boxes[:, 3] - boxes[:, 1] > self.min_bbox_size)
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        if boxes.numel() == 0:
            return boxes.new_zeros(0, 5)
        keep = batched_nms(boxes, scores, levels, self.iou_threshold)[: self.max_per_img]
        return torch.cat([boxes[keep], scores[keep, None]], dim=1)

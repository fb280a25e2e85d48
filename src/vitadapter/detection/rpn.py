"""The region proposal network: mmdet 2.x's ``RPNHead`` and its test-time proposal rules."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import AnchorGenerator
from .assigner import MaxIoUAssigner
from .box_coder import DeltaXYWHBBoxCoder
from .box_losses import BoxRegressionLoss
from .conv_module import ConvModule
from .postprocess import batched_nms
from .sampler import RandomSampler

# upstream's pipelines pad each image to a multiple of 32 (mmdet's Pad(size_divisor=32)); anchors past
# that padded area, on the batch's extra padding, never train
_SIZE_DIVISOR = 32


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
        self,
        cls_maps: Sequence[torch.Tensor],
        reg_maps: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        nms_pre: Optional[int] = None,
        max_per_img: Optional[int] = None,
    ) -> list[torch.Tensor]:
        """Per image (N, 5) proposals (x1, y1, x2, y2, objectness), best first, in the batch's pixels.

        ``nms_pre`` / ``max_per_img`` replace the test settings (training's ``rpn_proposal`` differs).
        """
        nms_pre = self.nms_pre if nms_pre is None else nms_pre
        max_per_img = self.max_per_img if max_per_img is None else max_per_img
        anchors = self.anchor_generator([tuple(m.shape[-2:]) for m in cls_maps])
        return [
            self._image_proposals([m[i] for m in cls_maps], [m[i] for m in reg_maps], anchors, size, nms_pre, max_per_img)
            for i, size in enumerate(image_sizes)
        ]

    def _image_proposals(self, cls_maps, reg_maps, anchors, image_size, nms_pre, max_per_img) -> torch.Tensor:
        scores, deltas, priors, levels = [], [], [], []
        for level, (cls, reg, level_anchors) in enumerate(zip(cls_maps, reg_maps, anchors)):
            level_scores = cls.permute(1, 2, 0).reshape(-1).sigmoid()
            level_deltas = reg.permute(1, 2, 0).reshape(-1, 4)
            if 0 < nms_pre < level_scores.shape[0]:
                level_scores, order = level_scores.sort(descending=True)
                level_scores, order = level_scores[:nms_pre], order[:nms_pre]
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
        keep = batched_nms(boxes, scores, levels, self.iou_threshold)[:max_per_img]
        return torch.cat([boxes[keep], scores[keep, None]], dim=1)

    def training_anchor_mask(
        self, featmap_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], anchors: torch.Tensor, allowed_border: float
    ) -> torch.Tensor:
        """(N,) bool over the concatenated ``anchors``: those that may train for an image of ``image_size``.

        mmdet's valid flags (the anchor's cell lies on the image padded to a multiple of 32) and, when
        ``allowed_border`` >= 0, its inside flags (the anchor pokes out of the image by at most that many px).
        """
        pad_h, pad_w = (math.ceil(side / _SIZE_DIVISOR) * _SIZE_DIVISOR for side in image_size)
        flags = []
        for (h, w), stride in zip(featmap_sizes, self.anchor_generator.strides):
            valid = torch.zeros(h, w, dtype=torch.bool, device=anchors.device)
            valid[: min(math.ceil(pad_h / stride), h), : min(math.ceil(pad_w / stride), w)] = True
            flags.append(valid[:, :, None].expand(h, w, self.anchor_generator.num_anchors).reshape(-1))
        mask = torch.cat(flags)
        if allowed_border >= 0:
            h, w = image_size
            mask &= (anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            mask &= (anchors[:, 2] < w + allowed_border) & (anchors[:, 3] < h + allowed_border)
        return mask

    def loss(
        self,
        cls_maps: Sequence[torch.Tensor],
        reg_maps: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        gt_boxes: Sequence[torch.Tensor],
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        regression: BoxRegressionLoss,
        allowed_border: float = -1,
        gt_boxes_ignore: Optional[Sequence[Optional[torch.Tensor]]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """mmdet's ``RPNHead.loss``: ``{"loss_rpn_cls", "loss_rpn_bbox"}``.

        Per image the trainable anchors (:meth:`training_anchor_mask`) are assigned to ``gt_boxes`` (N_i, 4)
        and sampled; sigmoid cross-entropy on the sampled anchors' objectness (positives 1, negatives 0)
        and ``regression`` on the positives, both divided by the batch's sampled anchors with every image
        counting at least one positive and one negative.
        """
        batch = cls_maps[0].shape[0]
        if len(image_sizes) != batch or len(gt_boxes) != batch:
            raise ValueError(f"image_sizes and gt_boxes need one entry per image ({batch}), got {len(image_sizes)} and {len(gt_boxes)}")
        if sampler.add_gt_as_proposals:
            raise ValueError("sampler: the RPN samples anchors only; add_gt_as_proposals must be False")
        featmap_sizes = [tuple(m.shape[-2:]) for m in cls_maps]
        anchors = torch.cat(self.anchor_generator(featmap_sizes))
        logits = torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1) for m in cls_maps], dim=1).float()
        deltas = torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, 4) for m in reg_maps], dim=1).float()
        cls_sum = reg_sum = logits.new_zeros(())
        num_samples = 0
        for i, (size, gt) in enumerate(zip(image_sizes, gt_boxes)):
            candidates = self.training_anchor_mask(featmap_sizes, size, anchors, allowed_border).nonzero().squeeze(1)
            ignore = None if gt_boxes_ignore is None else gt_boxes_ignore[i]
            sample = sampler(assigner(anchors[candidates], gt, ignore), anchors[candidates], gt, generator=generator)
            pos, neg = candidates[sample.pos_inds], candidates[sample.neg_inds]
            objectness = torch.cat([logits.new_ones(pos.numel()), logits.new_zeros(neg.numel())])
            cls_sum = cls_sum + F.binary_cross_entropy_with_logits(logits[i, torch.cat([pos, neg])], objectness, reduction="sum")
            if regression.decoded:
                reg_sum = reg_sum + regression(self.bbox_coder.decode(sample.pos_boxes, deltas[i, pos]), sample.pos_gt_boxes)
            else:
                reg_sum = reg_sum + regression(deltas[i, pos], self.bbox_coder.encode(sample.pos_boxes, sample.pos_gt_boxes))
            num_samples += max(pos.numel(), 1) + max(neg.numel(), 1)
        return {"loss_rpn_cls": cls_sum / num_samples, "loss_rpn_bbox": reg_sum / num_samples}

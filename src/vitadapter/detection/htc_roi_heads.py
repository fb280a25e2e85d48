"""The RoI stage of HTC (hybrid task cascade) at test time: mmdet 2.22's ``HybridTaskCascadeRoIHead``
with ``simple_test(rescale=True)``, as upstream's HTC++ configs set it up (interleaved, mask information
flow, semantic features fused into the box and mask branches, soft-NMS)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .box_head import ConvFCBBoxHead
from .htc_heads import HTCMaskHead, mask_info_flow
from .poolers import RoIPooler
from .postprocess import paste_masks
from .roi_heads import boxes_to_rois, cascade_stages, scale_factor
from .semantic_head import FusedSemanticHead, fuse_semantic
from .soft_nms import _check_options, multiclass_soft_nms

Size = tuple[int, int]

_SOFT_NMS_KEYS = ("iou_threshold", "sigma", "min_score", "method", "offset")


class HTCRoIHeads(nn.Module):
    """HTC's RoI stage: ``bbox_heads`` (``ConvFCBBoxHead`` kwargs, one per stage: upstream's
    ``Shared4Conv1FCBBoxHead``), ``mask_heads`` (``HTCMaskHead`` kwargs, one per stage) and
    ``semantic_head`` (``FusedSemanticHead`` kwargs) whose feature map, RoIAligned at
    ``semantic_roi_size`` from stride ``semantic_stride``, is added to every box and mask RoI feature.

    Test time: the proposals go through the box stages as in a cascade (each stage refines the RoIs for
    the next); the score is the softmax of the stages' mean logits, the boxes the last stage's; the
    (box, class) pairs above ``score_thr`` go through soft-NMS (``soft_nms``: mmcv ``soft_nms``
    arguments) in original pixels and the ``max_per_img`` best are kept. Every mask stage then reads the
    same final boxes, stage k also the last conv feature of stage k-1; their sigmoids are averaged and
    pasted at ``mask_thr_binary``.

    Module names are mmdet's: checkpoint keys ``roi_head.bbox_head.{k}.*``, ``roi_head.mask_head.{k}.*``,
    ``roi_head.semantic_head.*``.
    """

    def __init__(
        self,
        bbox_heads: Sequence[Mapping[str, Any]],
        mask_heads: Sequence[Mapping[str, Any]],
        semantic_head: Mapping[str, Any],
        bbox_roi_extractor: Optional[Mapping[str, Any]] = None,
        mask_roi_extractor: Optional[Mapping[str, Any]] = None,
        semantic_stride: int = 8,
        semantic_roi_size: int = 14,
        score_thr: float = 0.001,
        soft_nms: Optional[Mapping[str, Any]] = None,
        max_per_img: int = 100,
        mask_thr_binary: float = 0.5,
    ):
        super().__init__()
        if len(bbox_heads) < 1:
            raise ValueError("bbox_heads must list at least one stage")
        if len(mask_heads) != len(bbox_heads):
            raise ValueError(f"mask_heads must list one head per stage ({len(bbox_heads)}), got {len(mask_heads)}")
        soft_nms = dict(soft_nms or {})
        unknown = sorted(set(soft_nms) - set(_SOFT_NMS_KEYS))
        if unknown:
            raise ValueError(f"soft_nms: unknown settings {', '.join(unknown)} (known: {', '.join(_SOFT_NMS_KEYS)})")
        _check_options(soft_nms.get("method", "linear"), soft_nms.get("offset", 0), soft_nms.get("sigma", 0.5))
        self.bbox_head = nn.ModuleList(ConvFCBBoxHead(**kw) for kw in bbox_heads)
        self.mask_head = nn.ModuleList(HTCMaskHead(**kw) for kw in mask_heads)
        for k, head in enumerate(self.mask_head):
            # information flow: every stage after the first reads its predecessor's last conv feature
            if k and head.conv_res is None:
                raise ValueError(f"mask_heads[{k}] needs with_conv_res=True: stage {k} reads stage {k - 1}'s feature")
        self.semantic_head = FusedSemanticHead(**semantic_head)
        self.bbox_roi_extractor = RoIPooler(**{"output_size": 7, **(bbox_roi_extractor or {})})
        self.mask_roi_extractor = RoIPooler(**{"output_size": 14, **(mask_roi_extractor or {})})
        self.semantic_stride = int(semantic_stride)
        self.semantic_roi_size = int(semantic_roi_size)
        self.score_thr = score_thr
        self.soft_nms = soft_nms
        self.max_per_img = max_per_img
        self.mask_thr_binary = mask_thr_binary

    @property
    def num_classes(self) -> int:
        return self.bbox_head[-1].num_classes

    @property
    def bbox_heads(self) -> list[ConvFCBBoxHead]:
        return list(self.bbox_head)

    @property
    def mask_heads(self) -> list[HTCMaskHead]:
        return list(self.mask_head)

    def semantic_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The semantic branch's feature map (``conv_embedding`` output) from the neck's levels."""
        return self.semantic_head(features)[1]

    def _fused(self, pooler: RoIPooler, features: Sequence[torch.Tensor], semantic: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return fuse_semantic(pooler(features, rois), semantic, rois, 1 / self.semantic_stride, self.semantic_roi_size)

    def stage_outputs(
        self, features: Sequence[torch.Tensor], semantic: torch.Tensor, rois: torch.Tensor, image_sizes: Sequence[Size]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per box stage: (RoIs fed to it, class logits, deltas), box features fused with ``semantic``."""
        return cascade_stages(self.bbox_heads, lambda r: self._fused(self.bbox_roi_extractor, features, semantic, r), rois, image_sizes)

    def mask_probabilities(
        self, features: Sequence[torch.Tensor], semantic: torch.Tensor, rois: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(R, 2s, 2s): the mean over the mask stages (information flow) of each RoI's own class sigmoid."""
        logits = mask_info_flow(self.mask_heads, self._fused(self.mask_roi_extractor, features, semantic, rois))
        channel = torch.zeros_like(labels) if self.mask_heads[-1].class_agnostic else labels
        rows = torch.arange(rois.shape[0], device=rois.device)
        # HTC averages probabilities, not logits
        return sum(stage[rows, channel].sigmoid() for stage in logits) / len(logits)

    def candidates(
        self, features: Sequence[torch.Tensor], semantic: torch.Tensor, proposals: Sequence[torch.Tensor], image_sizes: Sequence[Size]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, before any NMS: the last stage's boxes ((N, 4), or (N, 4 * classes) with
        class-specific regression) clipped to the image, in the batch's pixels, and the softmax of the
        stages' mean logits (N, classes + 1): mmdet's ``get_bboxes(cfg=None, rescale=False)``."""
        counts = [p.shape[0] for p in proposals]
        stages = self.stage_outputs(features, semantic, boxes_to_rois(proposals), image_sizes)
        rois, _, deltas = stages[-1]
        # the test score is the softmax of the stages' mean LOGITS
        scores = (sum(logits for _, logits, _ in stages) / len(stages)).softmax(dim=-1)
        return [(self.bbox_heads[-1].decode(r[:, 1:], d, size), s)
                for r, s, d, size in zip(rois.split(counts), scores.split(counts), deltas.split(counts), image_sizes)]

    def forward(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
    ) -> list[dict[str, torch.Tensor]]:
        """Per image {"boxes", "scores", "labels", "masks"}, best score first, boxes in original pixels.

        ``features``: the neck's levels (all of them: the semantic head reads every one);
        ``proposals``: per image (N, >=4) boxes in the batch's pixels (the RPN's output).
        """
        semantic = self.semantic_features(features)
        results, mask_boxes = [], []
        for (boxes, s), size, original in zip(self.candidates(features, semantic, proposals, image_sizes), image_sizes, original_sizes):
            factor = scale_factor(size, original, boxes.device)
            boxes = (boxes.unflatten(1, (-1, 4)) / factor).flatten(1)
            dets, labels = multiclass_soft_nms(boxes, s, self.score_thr, self.max_per_img, **self.soft_nms)
            results.append({"boxes": dets[:, :4], "scores": dets[:, 4], "labels": labels})
            # mmdet reads the masks at the detections mapped back into the batch
            mask_boxes.append(dets[:, :4] * factor)
        counts = [b.shape[0] for b in mask_boxes]
        probs = features[0].new_zeros(0, 0, 0)
        if sum(counts):
            labels = torch.cat([r["labels"] for r in results])
            probs = self.mask_probabilities(features, semantic, boxes_to_rois(mask_boxes), labels)
        for result, p, boxes, size, original in zip(results, probs.split(counts), mask_boxes, image_sizes, original_sizes):
            # pasted at the batch boxes scaled back, as mmdet's get_seg_masks does
            result["masks"] = paste_masks(p, boxes / scale_factor(size, original, boxes.device), original, self.mask_thr_binary)
        return results

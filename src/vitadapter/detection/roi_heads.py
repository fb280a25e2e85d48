"""The RoI stage of Mask R-CNN and Cascade Mask R-CNN at test time (mmdet 2.x's ``StandardRoIHead`` and
``CascadeRoIHead`` with ``simple_test(rescale=True)``): proposals -> detections in original pixels."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .box_head import ConvFCBBoxHead
from .mask_head import FCNMaskHead
from .poolers import RoIPooler
from .postprocess import multiclass_nms, paste_masks

Size = tuple[int, int]


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image (N_i, >=4) boxes -> (sum N_i, 5) RoIs with the image index first (mmdet's ``bbox2roi``)."""
    return torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b[:, :4]], dim=1) for i, b in enumerate(boxes)])


def scale_factor(image_size: Size, original_size: Size, device: torch.device) -> torch.Tensor:
    """(w, h, w, h) factors from the original image to its resized copy in the batch, per axis and in
    float32 as mmdet's ``Resize`` stores them."""
    (h, w), (oh, ow) = image_size, original_size
    return torch.tensor([w / ow, h / oh, w / ow, h / oh], dtype=torch.float32, device=device)


def cascade_stages(
    heads: Sequence[ConvFCBBoxHead],
    pool: Callable[[torch.Tensor], torch.Tensor],
    rois: torch.Tensor,
    image_sizes: Sequence[Size],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per stage: (RoIs fed to it, class logits, deltas), ``pool`` giving each stage's RoI features.
    Between stages each RoI moves by the deltas of that stage's best foreground class, clipped to its
    image; nothing is filtered."""
    counts = torch.bincount(rois[:, 0].long(), minlength=len(image_sizes)).tolist()
    outputs = []
    for k, head in enumerate(heads):
        logits, deltas = head(pool(rois))
        outputs.append((rois, logits, deltas))
        if k + 1 < len(heads):
            labels = logits[:, :-1].argmax(dim=1)
            rois = torch.cat([
                torch.cat([r[:, :1], head.regress_by_class(r[:, 1:], l, d, size)], dim=1)
                for r, l, d, size in zip(rois.split(counts), labels.split(counts), deltas.split(counts), image_sizes)
            ])
    return outputs


def decode_to_original(head: ConvFCBBoxHead, rois: torch.Tensor, deltas: torch.Tensor, image_size: Size, original_size: Size) -> torch.Tensor:
    """One image's (N, 5) RoIs moved by ``head``'s deltas, clipped to ``image_size``, then divided by the
    scale factor (mmdet's ``get_bboxes(rescale=True)``): (N, 4) or (N, 4 * classes) in original pixels."""
    boxes = head.decode(rois[:, 1:], deltas, image_size)
    return (boxes.unflatten(1, (-1, 4)) / scale_factor(image_size, original_size, rois.device)).flatten(1)


class _RoIHeadsBase(nn.Module):
    """Inference shared by one-stage and cascade RoI heads. Subclasses provide ``bbox_heads`` and
    ``mask_heads`` (one per stage); a single stage is the cascade rules with nothing to average."""

    bbox_heads: Sequence[ConvFCBBoxHead]
    mask_heads: Sequence[FCNMaskHead]

    def _init_common(
        self,
        with_mask: bool,
        bbox_roi_extractor: Optional[Mapping[str, Any]],
        mask_roi_extractor: Optional[Mapping[str, Any]],
        score_thr: float,
        iou_threshold: float,
        max_per_img: int,
        mask_thr_binary: float,
    ) -> None:
        self.bbox_roi_extractor = RoIPooler(**{"output_size": 7, **(bbox_roi_extractor or {})})
        self.mask_roi_extractor = RoIPooler(**{"output_size": 14, **(mask_roi_extractor or {})}) if with_mask else None
        self.score_thr = score_thr
        self.iou_threshold = iou_threshold
        self.max_per_img = max_per_img
        self.mask_thr_binary = mask_thr_binary

    @property
    def num_classes(self) -> int:
        return self.bbox_heads[-1].num_classes

    def stage_outputs(
        self, features: Sequence[torch.Tensor], rois: torch.Tensor, image_sizes: Sequence[Size]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per stage: (RoIs fed to it, class logits, deltas); see :func:`cascade_stages`."""
        return cascade_stages(self.bbox_heads, lambda r: self.bbox_roi_extractor(features, r), rois, image_sizes)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
    ) -> list[dict[str, torch.Tensor]]:
        """Per image {"boxes", "scores", "labels"[, "masks"]}, best score first, boxes in original pixels.

        ``proposals``: per image (N, >=4) boxes in the batch's pixels (the RPN's output).
        """
        counts = [p.shape[0] for p in proposals]
        stages = self.stage_outputs(features, boxes_to_rois(proposals), image_sizes)
        rois, _, deltas = stages[-1]
        # the test score is the softmax of the stages' mean LOGITS
        scores = (sum(logits for _, logits, _ in stages) / len(stages)).softmax(dim=-1)
        results, mask_boxes = [], []
        for r, s, d, size, original in zip(rois.split(counts), scores.split(counts), deltas.split(counts), image_sizes, original_sizes):
            factor = scale_factor(size, original, r.device)
            boxes = decode_to_original(self.bbox_heads[-1], r, d, size, original)
            det_boxes, det_scores, det_labels = multiclass_nms(boxes, s, self.score_thr, self.iou_threshold, self.max_per_img)
            results.append({"boxes": det_boxes, "scores": det_scores, "labels": det_labels})
            # mmdet reads the masks at the detections mapped back into the batch
            mask_boxes.append(det_boxes * factor)
        if self.mask_roi_extractor is not None:
            self._add_masks(features, results, mask_boxes, image_sizes, original_sizes)
        return results

    def _add_masks(self, features, results, mask_boxes, image_sizes, original_sizes) -> None:
        counts = [b.shape[0] for b in mask_boxes]
        probs = features[0].new_zeros(sum(counts), 0, 0)
        if sum(counts):
            roi_features = self.mask_roi_extractor(features, boxes_to_rois(mask_boxes))
            labels = torch.cat([r["labels"] for r in results])
            # the stages' sigmoids are averaged, not their logits
            probs = sum(head.label_logits(roi_features, labels).sigmoid() for head in self.mask_heads) / len(self.mask_heads)
        for result, p, boxes, size, original in zip(results, probs.split(counts), mask_boxes, image_sizes, original_sizes):
            paste_boxes = boxes / scale_factor(size, original, boxes.device)
            result["masks"] = paste_masks(p, paste_boxes, original, self.mask_thr_binary)


class RoIHeads(_RoIHeadsBase):
    """Mask R-CNN's RoI stage: ``bbox_head`` (``ConvFCBBoxHead`` kwargs) and optional ``mask_head``
    (``FCNMaskHead`` kwargs) on RoIs pooled by ``bbox_roi_extractor`` / ``mask_roi_extractor``
    (``RoIPooler`` kwargs; 7x7 and 14x14 by default).

    Test settings (``test_cfg.rcnn``): (RoI, class) pairs scoring above ``score_thr``, NMS per class
    at ``iou_threshold`` in original pixels, the ``max_per_img`` best, masks >= ``mask_thr_binary``.
    """

    def __init__(
        self,
        bbox_head: Mapping[str, Any],
        mask_head: Optional[Mapping[str, Any]] = None,
        bbox_roi_extractor: Optional[Mapping[str, Any]] = None,
        mask_roi_extractor: Optional[Mapping[str, Any]] = None,
        score_thr: float = 0.05,
        iou_threshold: float = 0.5,
        max_per_img: int = 100,
        mask_thr_binary: float = 0.5,
    ):
        super().__init__()
        self._init_common(mask_head is not None, bbox_roi_extractor, mask_roi_extractor, score_thr, iou_threshold, max_per_img, mask_thr_binary)
        self.bbox_head = ConvFCBBoxHead(**bbox_head)
        self.mask_head = FCNMaskHead(**mask_head) if mask_head is not None else None

    @property
    def bbox_heads(self) -> list[ConvFCBBoxHead]:
        return [self.bbox_head]

    @property
    def mask_heads(self) -> list[FCNMaskHead]:
        return [] if self.mask_head is None else [self.mask_head]


class CascadeRoIHeads(_RoIHeadsBase):
    """Cascade Mask R-CNN's RoI stage: one box head per stage (``bbox_heads``, each refining the RoIs
    for the next) and optionally one mask head per stage (``mask_heads``); other arguments as ``RoIHeads``.

    Scores average the stages' logits; the final boxes are the last stage's; all mask heads read the
    same final detections and their probabilities are averaged.
    """

    def __init__(
        self,
        bbox_heads: Sequence[Mapping[str, Any]],
        mask_heads: Optional[Sequence[Mapping[str, Any]]] = None,
        bbox_roi_extractor: Optional[Mapping[str, Any]] = None,
        mask_roi_extractor: Optional[Mapping[str, Any]] = None,
        score_thr: float = 0.05,
        iou_threshold: float = 0.5,
        max_per_img: int = 100,
        mask_thr_binary: float = 0.5,
    ):
        super().__init__()
        if len(bbox_heads) < 1:
            raise ValueError("bbox_heads must list at least one stage")
        if mask_heads is not None and len(mask_heads) != len(bbox_heads):
            raise ValueError(f"mask_heads must list one head per stage ({len(bbox_heads)}), got {len(mask_heads)}")
        self._init_common(mask_heads is not None, bbox_roi_extractor, mask_roi_extractor, score_thr, iou_threshold, max_per_img, mask_thr_binary)
        # mmdet's checkpoint keys: roi_head.bbox_head.{stage}.*, roi_head.mask_head.{stage}.*
        self.bbox_head = nn.ModuleList(ConvFCBBoxHead(**kw) for kw in bbox_heads)
        self.mask_head = nn.ModuleList(FCNMaskHead(**kw) for kw in mask_heads) if mask_heads is not None else None

    @property
    def bbox_heads(self) -> list[ConvFCBBoxHead]:
        return list(self.bbox_head)

    @property
    def mask_heads(self) -> list[FCNMaskHead]:
        return [] if self.mask_head is None else list(self.mask_head)

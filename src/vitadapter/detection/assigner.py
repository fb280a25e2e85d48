"""Training: which ground-truth box each anchor or proposal learns from (mmdet 2.x's ``MaxIoUAssigner``),
shared by the RPN and every R-CNN stage."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torchvision.ops import box_area, box_iou


def _iof(boxes: torch.Tensor, regions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, M): the fraction of each box's area inside each region (mmdet's ``mode='iof'``)."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    return inter / box_area(boxes).clamp(min=eps)[:, None]


class MaxIoUAssigner:
    """Each box goes to the ground truth it overlaps most (IoU), if that IoU is >= ``pos_iou_thr``; it is
    background below ``neg_iou_thr`` (a float, or a ``(low, high)`` range) and ignored in between.

    ``match_low_quality``: every gt whose best IoU is >= ``min_pos_iou`` also takes its best box (all boxes
    tied at that IoU with ``gt_max_assign_all``), overriding the rule above; later gts win ties, as in
    mmdet's loop. With ``ignore_iof_thr`` > 0, boxes lying more than that fraction inside an ignore
    region are neither positive nor negative.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: Union[float, tuple[float, float]],
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
        ignore_iof_thr: float = -1.0,
    ):
        if isinstance(neg_iou_thr, (tuple, list)):
            if len(neg_iou_thr) != 2:
                raise ValueError(f"neg_iou_thr must be a float or a (low, high) pair, got {neg_iou_thr!r}")
            self.neg_range = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
        else:
            self.neg_range = (0.0, float(neg_iou_thr))
        self.pos_iou_thr = float(pos_iou_thr)
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = bool(match_low_quality)
        self.gt_max_assign_all = bool(gt_max_assign_all)
        self.ignore_iof_thr = float(ignore_iof_thr)

    def __call__(self, boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_boxes_ignore: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``boxes`` (N, >=4) and ``gt_boxes`` (G, 4), x1y1x2y2 -> (N,) long: 0 background, -1 ignored,
        k >= 1 assigned to ``gt_boxes[k - 1]``."""
        if boxes.dim() != 2 or boxes.shape[1] < 4:
            raise ValueError(f"boxes must be (N, >=4), got {tuple(boxes.shape)}")
        if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
            raise ValueError(f"gt_boxes must be (G, 4), got {tuple(gt_boxes.shape)}")
        boxes = boxes[:, :4].float()
        num_gts, num_boxes = gt_boxes.shape[0], boxes.shape[0]
        if num_gts == 0 or num_boxes == 0:
            return torch.full((num_boxes,), 0 if num_gts == 0 else -1, dtype=torch.long, device=boxes.device)
        overlaps = box_iou(gt_boxes.float(), boxes)
        if self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel():
            ignored = _iof(boxes, gt_boxes_ignore[:, :4].float()).max(dim=1).values > self.ignore_iof_thr
            overlaps[:, ignored] = -1
        max_overlaps, best_gt = overlaps.max(dim=0)
        assigned = torch.full((num_boxes,), -1, dtype=torch.long, device=boxes.device)
        low, high = self.neg_range
        assigned[(max_overlaps >= low) & (max_overlaps < high)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        assigned[positive] = best_gt[positive] + 1
        if self.match_low_quality:
            gt_max, gt_best = overlaps.max(dim=1)
            if self.gt_max_assign_all:
                takes = overlaps == gt_max[:, None]
            else:
                takes = torch.zeros_like(overlaps, dtype=torch.bool)
                takes[torch.arange(num_gts, device=boxes.device), gt_best] = True
            takes &= (gt_max >= self.min_pos_iou)[:, None]
            # the highest gt index taking a box is the one mmdet's sequential loop leaves in place
            last = (takes * torch.arange(1, num_gts + 1, device=boxes.device)[:, None]).max(dim=0).values
            assigned = torch.where(last > 0, last, assigned)
        return assigned

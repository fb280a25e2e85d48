"""Training: which assigned boxes enter the loss (mmdet 2.x's ``RandomSampler``), shared by the RPN and
every R-CNN stage. Draws come from an optional ``torch.Generator`` so a run can be repeated exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingResult:
    """The sampled positives (first) and negatives of one image. Indices refer to the candidates the
    sampler saw: the ground truths first when it added them, then the given boxes."""

    pos_inds: torch.Tensor
    neg_inds: torch.Tensor
    pos_boxes: torch.Tensor
    neg_boxes: torch.Tensor
    pos_is_gt: torch.Tensor
    pos_gt_inds: torch.Tensor
    pos_gt_boxes: torch.Tensor
    pos_gt_labels: Optional[torch.Tensor]

    @property
    def boxes(self) -> torch.Tensor:
        """(num_pos + num_neg, 4): positives then negatives, the order every loss uses."""
        return torch.cat([self.pos_boxes, self.neg_boxes])


class RandomSampler:
    """At most ``num * pos_fraction`` positives drawn uniformly without replacement, then negatives up to
    ``num`` in all (and at most ``neg_pos_ub`` per positive when that is >= 0). With
    ``add_gt_as_proposals`` the ground-truth boxes join the candidates as positives of themselves.
    Indices come back sorted, as mmdet's ``unique()`` leaves them; the generator is drawn from only when
    there are more candidates than wanted (positives first, then negatives)."""

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1, add_gt_as_proposals: bool = True):
        if num < 0 or not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"num must be >= 0 and pos_fraction in [0, 1], got num={num}, pos_fraction={pos_fraction}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = float(neg_pos_ub)
        self.add_gt_as_proposals = bool(add_gt_as_proposals)

    @staticmethod
    def _choose(gallery: torch.Tensor, num: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        if gallery.numel() <= num:
            return gallery
        device = generator.device if generator is not None else gallery.device
        perm = torch.randperm(gallery.numel(), generator=generator, device=device)[:num].to(gallery.device)
        return gallery[perm].unique()

    def __call__(
        self,
        assigned: torch.Tensor,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> SamplingResult:
        """``assigned``: the assigner's (N,) output for ``boxes`` (N, >=4) against ``gt_boxes`` (G, 4);
        ``gt_labels`` (G,) are required when ground truths are added."""
        if assigned.shape != boxes.shape[:1]:
            raise ValueError(f"assigned must hold one entry per box: {tuple(assigned.shape)} for {boxes.shape[0]} boxes")
        boxes = boxes[:, :4]
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        num_gts = gt_boxes.shape[0]
        if self.add_gt_as_proposals and num_gts:
            if gt_labels is None:
                raise ValueError("gt_labels must be given when add_gt_as_proposals is True")
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes])
            assigned = torch.cat([torch.arange(1, num_gts + 1, device=assigned.device), assigned])
            is_gt = torch.cat([torch.ones(num_gts, dtype=torch.bool, device=boxes.device), is_gt])
        pos = self._choose((assigned > 0).nonzero().squeeze(1), int(self.num * self.pos_fraction), generator)
        num_neg = self.num - pos.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos.numel())))
        neg = self._choose((assigned == 0).nonzero().squeeze(1), num_neg, generator)
        pos_gt_inds = assigned[pos] - 1
        return SamplingResult(
            pos_inds=pos, neg_inds=neg, pos_boxes=boxes[pos], neg_boxes=boxes[neg], pos_is_gt=is_gt[pos],
            pos_gt_inds=pos_gt_inds, pos_gt_boxes=gt_boxes[pos_gt_inds].to(boxes.dtype),
            pos_gt_labels=None if gt_labels is None else gt_labels[pos_gt_inds],
        )

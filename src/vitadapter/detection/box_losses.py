"""Training: the box regression losses mmdet's configs name (``L1Loss``, ``SmoothL1Loss``, ``GIoULoss``),
shared by the RPN and every R-CNN stage. Classification losses are plain ``torch.nn.functional``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

KINDS = ("l1", "smooth_l1", "giou")


@dataclass(frozen=True)
class BoxRegressionLoss:
    """``kind`` "l1" or "smooth_l1" (``beta``) on the coded deltas, or "giou" on decoded boxes (mmdet's
    ``reg_decoded_bbox=True``, which its GIoU loss needs), times ``weight``."""

    kind: str = "l1"
    beta: float = 1.0
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")

    @property
    def decoded(self) -> bool:
        """Whether predictions and targets are boxes (x1y1x2y2) rather than deltas."""
        return self.kind == "giou"

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted SUM over the (P, 4) positives; callers divide by mmdet's normaliser."""
        pred, target = pred.float(), target.float()
        if self.kind == "giou":
            loss = generalized_box_iou_loss(pred, target, reduction="sum")
        elif self.kind == "smooth_l1":
            loss = F.smooth_l1_loss(pred, target, beta=self.beta, reduction="sum")
        else:
            loss = F.l1_loss(pred, target, reduction="sum")
        return loss * self.weight

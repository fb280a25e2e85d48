"""Semantic segmentation metrics with mmseg's definitions (``mean_iou``/``intersect_and_union``).

Over a whole dataset, per class: intersection I (pixels predicted and labelled as the class), union
U = predicted + labelled - I, counted on labelled pixels only (the ignore index is left out, and so
is whatever the model predicted there). IoU = I / U and Acc = I / labelled; a class that is neither
labelled nor predicted anywhere has no IoU (NaN), a class that is never labelled has no Acc, and the
means (mIoU, mAcc) skip NaNs. aAcc = all correct pixels / all labelled pixels.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data.folder import IGNORE_INDEX


@dataclass(frozen=True)
class SegmentationScores:
    """Per-class ``iou`` and ``acc`` (NaN where undefined) and the dataset summaries, all in [0, 1]."""

    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float


class SegmentationMetric:
    """Accumulates per-class areas over ``update(pred, label)`` calls; ``compute()`` gives the scores.

    ``pred`` and ``label`` are integer maps of one shape (NumPy arrays or CPU tensors); ``label``
    holds classes ``0..num_classes-1`` or ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.pred_area = np.zeros(num_classes, dtype=np.int64)
        self.label_area = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: Any, label: Any) -> None:
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        labelled = label != self.ignore_index
        pred, label = pred[labelled].astype(np.int64), label[labelled].astype(np.int64)
        for name, values in (("label", label), ("prediction", pred)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                bad = values[(values < 0) | (values >= self.num_classes)][0]
                raise ValueError(
                    f"{name} holds class {bad}, outside 0..{self.num_classes - 1} (ignore index {self.ignore_index}): "
                    "a dataset of other classes than the model's, or labels not reduced (ADE20K's 0 = other)?"
                )
        n = self.num_classes
        self.intersection += np.bincount(label[pred == label], minlength=n)
        self.pred_area += np.bincount(pred, minlength=n)
        self.label_area += np.bincount(label, minlength=n)

    @property
    def union(self) -> np.ndarray:
        return self.pred_area + self.label_area - self.intersection

    def compute(self) -> SegmentationScores:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.intersection / self.union
            acc = self.intersection / self.label_area
            aacc = self.intersection.sum() / self.label_area.sum()
        return SegmentationScores(iou, acc, _nanmean(iou), _nanmean(acc), float(aacc))


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():  # all NaN (nothing labelled yet): NaN, without a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))

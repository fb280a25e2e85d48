"""Upstream's multi-scale flip test of HTC++ (its ``_ms`` configs: detector ``HybridTaskCascadeAug``,
``test_cfg.aug``, ``MultiScaleFlipAug`` over six scales with flips).

Not mmdet's own ``aug_test`` (which averages boxes over shared proposals): every view runs the RPN and
the box cascade on its own, keeps only the boxes whose area in original pixels lies in that scale's
ranges (small objects from the large scales, large ones from the small), and the survivors of all
views, mapped back to the original image, go through one soft-NMS together ("box voting"). The masks
of the final boxes are then read in every view, mapped into it, and the mask probabilities of all
views and stages are averaged, un-flipped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .soft_nms import multiclass_soft_nms

Size = tuple[int, int]

# ``HybridTaskCascadeAug.remove_boxes``: COCO's area ranges (and upstream's finer ones), in pixels²
AREA_RANGES = {
    "s": (None, 32.0**2), "m": (32.0**2, 96.0**2), "l": (96.0**2, None),
    "m-": (32.0**2, 64.0**2), "m+": (64.0**2, 96.0**2), "l-": (96.0**2, 512.0**2), "l+": (512.0**2, None),
}


@dataclass(frozen=True)
class AugTest:
    """One multi-scale flip test: ``scales`` (mmdet ``img_scale`` pairs: the two side limits, each view
    resized to fit as the single-scale test does), ``flip`` (each scale also mirrored left-right),
    ``scale_ranges`` (per scale, the ``AREA_RANGES`` names of the boxes it contributes) and the merged
    boxes' ``score_thr``, ``soft_nms`` (mmcv ``soft_nms`` arguments) and ``max_per_img``."""

    scales: tuple[Size, ...]
    scale_ranges: tuple[tuple[str, ...], ...]
    flip: bool = True
    score_thr: float = 0.001
    soft_nms: Mapping[str, Any] = field(default_factory=lambda: {"iou_threshold": 0.5})
    max_per_img: int = 1000

    def __post_init__(self) -> None:
        scales = tuple(tuple(s) for s in self.scales)
        if not scales or not all(len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in scales):
            raise ValueError(f"scales must be one or more (long, short) pairs of positive ints, got {self.scales!r}")
        ranges = tuple(tuple(r) for r in self.scale_ranges)
        if len(ranges) != len(scales):
            raise ValueError(f"scale_ranges must give one list of area ranges per scale ({len(scales)}), got {len(ranges)}")
        unknown = sorted({name for r in ranges for name in r} - set(AREA_RANGES))
        if unknown:
            raise ValueError(f"scale_ranges: unknown area ranges {', '.join(map(repr, unknown))} (known: {', '.join(AREA_RANGES)})")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "scale_ranges", ranges)
        object.__setattr__(self, "soft_nms", dict(self.soft_nms))

    def views(self) -> list[tuple[Size, bool, tuple[str, ...]]]:
        """(scale, flipped, area ranges) per view, in ``MultiScaleFlipAug``'s order (scale by scale,
        unflipped first)."""
        flips = (False, True) if self.flip else (False,)
        return [(scale, flipped, ranges) for scale, ranges in zip(self.scales, self.scale_ranges) for flipped in flips]


def in_area_ranges(boxes: torch.Tensor, ranges: Sequence[str]) -> torch.Tensor:
    """Which (N, 4) boxes have an area in any of ``ranges`` (``AREA_RANGES`` names; lower bounds
    exclusive, upper inclusive except ``l-``'s, as upstream's ``remove_boxes``)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = area < 0
    for name in ranges:
        low, high = AREA_RANGES[name]
        inside = torch.ones_like(keep) if low is None else area > low
        if high is not None:
            inside &= area < high if name == "l-" else area <= high
        keep |= inside
    return keep


def _factor(image_size: Size, original_size: Size, like: torch.Tensor) -> torch.Tensor:
    (h, w), (oh, ow) = image_size, original_size
    return torch.tensor([w / ow, h / oh, w / ow, h / oh], dtype=torch.float32, device=like.device).to(like.dtype)


def _flip(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def to_original(boxes: torch.Tensor, image_size: Size, original_size: Size, flipped: bool) -> torch.Tensor:
    """(N, 4) boxes of a view (resized to ``image_size``, maybe mirrored) in original pixels: mmdet's
    ``bbox_mapping_back`` (un-mirror within the view's width, then divide by the scale factor)."""
    boxes = _flip(boxes, image_size[1]) if flipped else boxes
    return boxes / _factor(image_size, original_size, boxes)


def to_view(boxes: torch.Tensor, image_size: Size, original_size: Size, flipped: bool) -> torch.Tensor:
    """The inverse, mmdet's ``bbox_mapping``: original pixels -> the view's pixels."""
    boxes = boxes * _factor(image_size, original_size, boxes)
    return _flip(boxes, image_size[1]) if flipped else boxes


def merge_mask_probabilities(probabilities: Sequence[torch.Tensor], flipped: Sequence[bool]) -> torch.Tensor:
    """mmdet's ``merge_aug_masks``: the mean of (N, M, M) RoI mask probabilities, each mirrored back
    where its view was mirrored."""
    return torch.stack([p.flip(-1) if f else p for p, f in zip(probabilities, flipped)]).mean(dim=0)


def merge_views(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    image_sizes: Sequence[Size],
    flipped: Sequence[bool],
    original_size: Size,
    aug: AugTest,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's vote over the views of ``aug.views()``: each view's (N, 4) candidate boxes (in its
    pixels) and (N, classes + 1) scores, mapped back to the original image and kept where their area
    lies in the view's ranges, then all together through multiclass soft-NMS. Returns (dets (K, 5):
    boxes in original pixels and scores, labels (K,)), best first."""
    kept_boxes, kept_scores = [], []
    for view_boxes, view_scores, size, flip, (_, _, ranges) in zip(boxes, scores, image_sizes, flipped, aug.views()):
        view_boxes = to_original(view_boxes, size, original_size, flip)
        keep = in_area_ranges(view_boxes, ranges)
        kept_boxes.append(view_boxes[keep])
        kept_scores.append(view_scores[keep])
    return multiclass_soft_nms(torch.cat(kept_boxes), torch.cat(kept_scores), aug.score_thr, aug.max_per_img, **aug.soft_nms)

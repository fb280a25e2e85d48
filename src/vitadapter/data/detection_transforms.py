"""Training augmentations for detection and instance segmentation, as upstream's Mask R-CNN and Cascade
Mask R-CNN 3x configs chain mmdet 2.x's (the DETR-style multi-scale recipe):

1. horizontal flip with probability 1/2;
2. one of two policies, each with probability 1/2 (``AutoAugment``):
   a. resize keeping the aspect ratio to one (short, 1333) scale of ``scales`` (480, 512, ..., 800);
   b. resize to one of (400 | 500 | 600, 1333), crop a window of sides uniform in [384, 600] (each
      side at most the image's), resize the window to one scale of ``scales``;
3. crop to at most 1024 x 1024 (a uniform window where the image is larger);
4. normalise, pad with zeros at the bottom and right to a multiple of 32.

Boxes, masks and boxes to ignore move with the image: boxes are scaled and clipped to the image,
cropped boxes shifted and clipped to the window, and instances whose box is left empty dropped (an
image may lose all of them, as mmdet's ``allow_negative_crop``); masks are resized by nearest
neighbour and padded as the image. Every random draw comes from the ``numpy.random.Generator``
passed in, so one seed fixes a sample's augmentation whatever process computes it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import resize_image

Size = tuple[int, int]
# upstream's 3x configs: the multi-scale resize's short sides (long side at most 1333)
SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
# the cropping policy's first resize and its crop range
CROP_POLICY_SCALES = (400, 500, 600)
CROP_POLICY_RANGE = (384, 600)


@dataclass(frozen=True)
class DetectionTrainTransform:
    """``transform(image, instances, rng)`` -> ``{"image": float (3, H, W), "image_size": (h, w),
    "boxes", "labels", "masks" (N, H, W) bool, "ignore_boxes"}`` with H, W the image's size ``(h, w)``
    padded to ``size_divisor``.

    ``image``: uint8 (H, W, 3) RGB; ``instances``: ``{"boxes": (N, 4) x1y1x2y2, "labels": (N,), "masks":
    (N, H, W) bool, "ignore_boxes": (M, 4)}`` (``CocoInstances`` items). ``mean`` and ``std`` are per
    channel for pixels in [0, 1] (a model's ``pretrained_cfg``). The sizes default to upstream's.
    """

    mean: Sequence[float]
    std: Sequence[float]
    scales: Sequence[int] = SCALES
    max_size: int = 1333
    crop_policy_scales: Sequence[int] = CROP_POLICY_SCALES
    crop_policy_range: Size = CROP_POLICY_RANGE
    crop_size: Size = (1024, 1024)
    flip_prob: float = 0.5
    size_divisor: int = 32

    def __call__(self, image: np.ndarray, instances: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        masks = instances["masks"]
        if masks.shape[1:] != image.shape[:2] or not len(masks) == len(instances["boxes"]) == len(instances["labels"]):
            raise ValueError(f"instances must hold one (H, W) mask per box and label, got masks {masks.shape} for an image of "
                             f"{image.shape[:2]}, {len(instances['boxes'])} boxes, {len(instances['labels'])} labels")
        sample = dict(instances, image=image)
        if rng.random() < self.flip_prob:
            sample = flip(sample)
        if rng.integers(2) == 0:
            sample = resize(sample, (self.max_size, self.scales[rng.integers(len(self.scales))]))
        else:
            sample = resize(sample, (self.max_size, self.crop_policy_scales[rng.integers(len(self.crop_policy_scales))]))
            sample = random_crop(sample, rng, self.crop_policy_range)
            sample = resize(sample, (self.max_size, self.scales[rng.integers(len(self.scales))]))
        sample = random_crop(sample, rng, self.crop_size)
        return normalize_and_pad(sample, self.mean, self.std, self.size_divisor)


def flip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror the image, its masks and boxes left-right (mmdet: x1' = w - x2, x2' = w - x1)."""
    width = sample["image"].shape[1]

    def mirrored(boxes: np.ndarray) -> np.ndarray:
        return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1).astype(boxes.dtype)

    return dict(sample, image=sample["image"][:, ::-1], masks=sample["masks"][:, :, ::-1],
                boxes=mirrored(sample["boxes"]), ignore_boxes=mirrored(sample["ignore_boxes"]))


def rescaled_size(height: int, width: int, scale: Size) -> Size:
    """(h, w) after mmcv's keep-ratio ``imrescale`` to ``scale`` (the long and short side limits: the
    largest size within both), rounded to the nearest pixel."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize(sample: dict[str, Any], scale: Size) -> dict[str, Any]:
    """Rescale keeping the aspect ratio to fit ``scale``: the image bilinear (as OpenCV), masks nearest,
    boxes by each axis's own ratio of new to old size and clipped to the image."""
    height, width = sample["image"].shape[:2]
    size = rescaled_size(height, width, scale)
    factors = np.array([size[1] / width, size[0] / height] * 2, np.float32)

    def scaled(boxes: np.ndarray) -> np.ndarray:
        return clip_boxes(boxes * factors, size)

    return dict(sample, image=resize_image(sample["image"], size), masks=resize_masks(sample["masks"], size),
                boxes=scaled(sample["boxes"]), ignore_boxes=scaled(sample["ignore_boxes"]))


def resize_masks(masks: np.ndarray, size: Size) -> np.ndarray:
    """(N, H, W) bool -> (N, *size), nearest neighbour (source pixel floor(x * in / out), OpenCV's
    ``INTER_NEAREST``, which mmdet's mask rescale uses)."""
    if masks.shape[1:] == tuple(size):
        return masks
    if masks.shape[0] == 0:
        return np.zeros((0, *size), bool)
    x = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))[:, None]
    return F.interpolate(x, size=size, mode="nearest")[:, 0].numpy().astype(bool)


def clip_boxes(boxes: np.ndarray, size: Size) -> np.ndarray:
    height, width = size
    return np.stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height),
                     boxes[:, 2].clip(0, width), boxes[:, 3].clip(0, height)], axis=1).astype(np.float32)


def random_crop(sample: dict[str, Any], rng: np.random.Generator, crop_range: Size) -> dict[str, Any]:
    """mmdet's ``RandomCrop(crop_type="absolute_range", allow_negative_crop=True)``: a window whose
    height and width are each uniform in ``crop_range`` (capped at the image's side), at a uniform
    position. Boxes are shifted and clipped to it; instances whose box is empty then are dropped
    (boxes to ignore likewise)."""
    height, width = sample["image"].shape[:2]
    low, high = crop_range
    crop_h = int(rng.integers(min(height, low), min(height, high) + 1))
    crop_w = int(rng.integers(min(width, low), min(width, high) + 1))
    top = int(rng.integers(0, max(height - crop_h, 0) + 1))
    left = int(rng.integers(0, max(width - crop_w, 0) + 1))
    offset = np.array([left, top, left, top], np.float32)

    def cropped(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        moved = clip_boxes(boxes - offset, (crop_h, crop_w))
        keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
        return moved[keep], keep

    boxes, keep = cropped(sample["boxes"])
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    return dict(sample, image=sample["image"][window], boxes=boxes, labels=sample["labels"][keep],
                masks=sample["masks"][keep][:, window[0], window[1]], ignore_boxes=cropped(sample["ignore_boxes"])[0])


def normalize_and_pad(sample: dict[str, Any], mean: Sequence[float], std: Sequence[float], size_divisor: int = 32) -> dict[str, Any]:
    """Tensors for the model: the image normalised (``mean``/``std`` of [0, 1] pixels) and padded with
    zeros at the bottom and right to a multiple of ``size_divisor``, masks padded with False."""
    height, width = sample["image"].shape[:2]
    padded = (-(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor)
    pixels = torch.from_numpy(np.ascontiguousarray(sample["image"])).permute(2, 0, 1).float().div_(255)
    pixels = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    image = torch.zeros(3, *padded)
    image[:, :height, :width] = pixels
    masks = torch.zeros(len(sample["masks"]), *padded, dtype=torch.bool)
    masks[:, :height, :width] = torch.from_numpy(np.ascontiguousarray(sample["masks"]))
    return {
        "image": image,
        "image_size": (height, width),
        "boxes": torch.from_numpy(np.ascontiguousarray(sample["boxes"], np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(np.ascontiguousarray(sample["labels"], np.int64)),
        "masks": masks,
        "ignore_boxes": torch.from_numpy(np.ascontiguousarray(sample["ignore_boxes"], np.float32)).reshape(-1, 4),
    }

"""Training augmentations for semantic segmentation, as upstream's ADE20K configs chain mmseg 0.x's:
random resize (ratio 0.5-2.0 of a (2048, crop) scale, keeping the aspect ratio), random crop that
avoids crops dominated by one class, horizontal flip, photometric distortion, normalisation, padding
to the crop (image 0, label ``ignore_index``).

Every random draw comes from the ``numpy.random.Generator`` passed in, so one seed fixes a sample's
augmentation whatever process or data-loader worker computes it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .folder import IGNORE_INDEX

Size = tuple[int, int]


@dataclass(frozen=True)
class SegmentationTrainTransform:
    """``transform(image, label, rng)`` -> ``{"image": float (3, H, W), "label": int64 (H, W)}`` at
    ``crop_size`` (height, width).

    ``image``: PIL RGB or uint8 (H, W, 3) array; ``label``: (H, W) class indices, ``ignore_index``
    where unlabelled. ``mean`` and ``std`` are per channel for pixels in [0, 1] (a model's
    ``pretrained_cfg``). ``scale`` is the (long, short) side the resize ratio applies to; by default
    (2048, crop height), as upstream's configs.
    """

    crop_size: Size
    mean: Sequence[float]
    std: Sequence[float]
    scale: Union[Size, None] = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: Union[Image.Image, np.ndarray], label: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        pixels = np.array(image, dtype=np.uint8)  # a copy: Pillow's buffer is read-only
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[:2] != label.shape:
            raise ValueError(f"expected an RGB image and a label map of its size, got {pixels.shape} and {label.shape}")
        scale = self.scale or (2048, self.crop_size[0])
        pixels, label = random_resize(pixels, label, rng, scale, self.ratio_range)
        pixels, label = random_crop(pixels, label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        pixels, label = random_flip(pixels, label, rng, self.flip_prob)
        if self.photometric:
            pixels = photometric_distortion(pixels, rng)
        return normalize_and_pad(pixels, label, self.mean, self.std, self.crop_size, self.ignore_index)


def random_resize(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale: Size = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale so the image fits ``scale * ratio`` (long side, short side), ratio uniform in
    ``ratio_range``, keeping the aspect ratio: image bilinear, label nearest."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    long_side, short_side = int(max(scale) * ratio), int(min(scale) * ratio)
    height, width = label.shape
    factor = min(long_side / max(height, width), short_side / min(height, width))
    size = (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
    return resize_image(image, size), resize_label(label, size)


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """uint8 (H, W, 3) -> ``size``, bilinear with half-pixel centres and no antialiasing (OpenCV's
    ``INTER_LINEAR``, which mmseg resizes with)."""
    if image.shape[:2] == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """Class indices -> ``size``, nearest neighbour (source pixel floor(x * in / out), as OpenCV's
    ``INTER_NEAREST``)."""
    if label.shape == tuple(size):
        return label
    x = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))[None, None].double()
    return F.interpolate(x, size=size, mode="nearest")[0, 0].long().numpy()


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: Size,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop_size`` window at a uniform position (the whole side where the image is smaller).

    With ``cat_max_ratio < 1`` a window is redrawn, up to 10 times, until it holds at least two
    classes and none covers ``cat_max_ratio`` or more of its labelled pixels; after 10 refusals the
    next window drawn is kept, whatever it holds (mmseg's rule).
    """
    crop_h, crop_w = crop_size
    height, width = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(height - crop_h, 0) + 1)), int(rng.integers(0, max(width - crop_w, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            values, counts = np.unique(label[top:top + crop_h, left:left + crop_w], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    return image[window], label[window]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image and label left-right together with probability ``prob``."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg 0.x's ``PhotoMetricDistortion`` on a uint8 RGB image: each step applies with
    probability 1/2, in this order: brightness (add U(-32, 32)), contrast (multiply by U(0.5, 1.5))
    here or last (a coin decides), saturation (scale S by U(0.5, 1.5)), hue (shift by an integer in
    [-18, 18) of OpenCV's 2-degree hue units). Values are clipped to [0, 255] and truncated to uint8
    after each step, as mmseg does; the HSV round trip is in floating point rather than OpenCV's
    8-bit HSV, so the two differ by a rounding step.
    """

    def affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return affine(x, alpha=rng.uniform(*contrast_range))
        return x

    if rng.integers(2):
        image = affine(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0
    if not contrast_last:
        image = contrast(image)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 255).astype(np.uint8)
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-hue_delta, hue_delta)) % 180
        image = hsv_to_rgb(hsv)
    if contrast_last:
        image = contrast(image)
    return image


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float HSV on OpenCV's 8-bit scales: H in [0, 180) (2-degree units), S and V in [0, 255]."""
    rgb = image.astype(np.float32)
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-6) * 255, 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    degrees = np.where(value == r, (g - b) / safe * 60, np.where(value == g, 120 + (b - r) / safe * 60, 240 + (r - g) / safe * 60))
    degrees = np.where(chroma > 0, degrees % 360, 0)
    return np.stack([degrees / 2, saturation, value], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of ``rgb_to_hsv``, rounded to uint8."""
    sector = (hsv[..., 0] * 2 % 360) / 60
    s, v = hsv[..., 1] / 255, hsv[..., 2]
    index = np.floor(sector).astype(np.int64) % 6
    f = sector - np.floor(sector)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # (r, g, b) for each of the six 60-degree sectors
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ], axis=-2)
    rgb = np.take_along_axis(table, index[..., None, None], axis=-2)[..., 0, :]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def normalize_and_pad(
    image: np.ndarray, label: np.ndarray, mean: Sequence[float], std: Sequence[float], crop_size: Size, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """uint8 (H, W, 3) -> normalised float (3, crop_h, crop_w), zero-padded at the bottom and right
    after normalising; the label padded with ``ignore_index`` so padding adds nothing to the loss."""
    crop_h, crop_w = crop_size
    height, width = label.shape
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    pixels = (pixels - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    padded = pixels.new_zeros((3, max(crop_h, height), max(crop_w, width)))
    padded[:, :height, :width] = pixels
    target = torch.full(padded.shape[1:], ignore_index, dtype=torch.int64)
    target[:height, :width] = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    return {"image": padded, "label": target}

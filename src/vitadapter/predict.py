"""Upstream's test pipeline as a function: an image in, class probabilities or a label map out, at the
image's own size.

mmseg 0.x, as upstream's ADE20K configs set it up, resizes each image keeping its aspect ratio so the
short side is at most S and the long side at most 4 S (S = 512 for the 512-px models: its
``img_scale=(2048, 512)``), then up to the next multiple of 32 (``ResizeToMultiple``), both
bilinearly; normalises; runs the segmentor (sliding windows); resizes the logits bilinearly
(``align_corners=False``) back to the original size and takes the softmax. Multi-scale testing
repeats this with S and 4 S times each of ``MS_RATIOS``, flipped and not, and averages the
probabilities (mmseg's ``aug_test``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

# upstream's multi-scale ratios (the "MS" column of its tables, with flipping)
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
SIZE_DIVISOR = 32
_DEFAULT_SCALE = 512


def default_scale(segmentor: nn.Module) -> tuple[int, int]:
    """The (short, long) side limits a segmentor is tested at: its release's test scale
    (``pretrained_cfg["test_input_size"]``: 512 x 2048 for upstream's 512 models, 1024 x 2048 for
    Cityscapes), else its crop S (slide mode) or input size, with 4 S for the long side."""
    cfg = getattr(segmentor, "pretrained_cfg", None) or {}
    test = cfg.get("test_input_size")
    if test:
        return min(test[1:]), max(test[1:])
    crop = getattr(segmentor, "crop_size", None)
    size = cfg.get("input_size")
    short = min(crop) if crop else min(size[1:]) if size else _DEFAULT_SCALE
    return short, 4 * short


def rescaled_size(
    width: int, height: int, scale: Union[int, tuple[int, int], None], ratio: float = 1.0
) -> tuple[int, int]:
    """(width, height) after mmcv's keep-ratio rescale to fit ``scale`` times ``ratio``: an int S
    means short side <= S and long side <= 4 S, a pair (short, long) both limits, None the original
    size times ``ratio``. ``ResizeToMultiple`` then rounds each side up to a multiple of 32."""
    if scale is None:
        factor = ratio
    else:
        short, long = (scale, 4 * scale) if isinstance(scale, int) else scale
        long_max, short_max = int(long * ratio), int(short * ratio)
        factor = min(long_max / max(width, height), short_max / min(width, height))
    w, h = max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))
    return w, h


def _multiple(size: int) -> int:
    return -(-size // SIZE_DIVISOR) * SIZE_DIVISOR


def _resize_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (1, 3, H, W) values in 0..255, rounded as an 8-bit image (cv2's output)."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    resized = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    return resized.round_().clamp_(0, 255)


@torch.no_grad()
def predict_probs(
    segmentor: nn.Module,
    image: Image.Image,
    scale: Union[int, tuple[int, int], None] = 0,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Class probabilities (num_classes, H, W) at the size of ``image`` (an RGB PIL image), on ``device``.

    ``scale`` is S (short side at most S, long side at most 4 S) or a (short, long) pair; 0 means the
    segmentor's own (``default_scale``), None the image's size. ``ratios`` and ``flip`` give multi-scale and flip testing
    (``ratios=MS_RATIOS, flip=True`` is upstream's "MS"); the passes' softmax outputs are averaged.
    The segmentor should be in eval mode; mean and std come from its ``pretrained_cfg`` (ImageNet's
    without one).
    """
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be positive numbers, got {tuple(ratios)}")
    if scale == 0:
        scale = default_scale(segmentor)
    parameter = next(segmentor.parameters())
    device = torch.device(device) if device is not None else parameter.device
    cfg = getattr(segmentor, "pretrained_cfg", None) or {}
    # upstream's configs all normalise with ImageNet's statistics
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), device=device).view(1, 3, 1, 1) * 255
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).to(device)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)
    height, width = pixels.shape[-2:]

    total: Optional[torch.Tensor] = None
    passes = 0
    for ratio in ratios:
        w, h = rescaled_size(width, height, scale, ratio)
        resized = _resize_pixels(_resize_pixels(pixels, h, w), _multiple(h), _multiple(w))
        normalised = ((resized - mean) / std).to(parameter.dtype)
        for flipped in (False, True) if flip else (False,):
            batch = normalised.flip(-1) if flipped else normalised
            logits = segmentor(batch)
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)[0]
            probs = probs.flip(-1) if flipped else probs
            total = probs if total is None else total.add_(probs)
            passes += 1
    return total.div_(passes)


def predict(
    segmentor: nn.Module,
    image: Image.Image,
    scale: Union[int, tuple[int, int], None] = 0,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """The label map (H, W), int64 on the CPU, of ``predict_probs``: each pixel's most likely class."""
    return predict_probs(segmentor, image, scale, ratios, flip, device).argmax(0).cpu()

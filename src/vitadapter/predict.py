"""Upstream's test pipelines as functions: an image in, class probabilities or a label map out, at the
image's own size; or detections in the image's pixels (``detection_batch``, ``predict_detections``).

mmseg 0.x, as upstream's ADE20K configs set it up, resizes each image keeping its aspect ratio so the
short side is at most S and the long side at most 4 S (S = 512 for the 512-px models: its
``img_scale=(2048, 512)``), then up to the next multiple of 32 (``ResizeToMultiple``), both
bilinearly; normalises; runs the segmentor (sliding windows); resizes the logits bilinearly
(``align_corners=False``) back to the original size and takes the softmax. Multi-scale testing
repeats this with S and 4 S times each of ``MS_RATIOS``, flipped and not, and averages the
probabilities (mmseg's ``aug_test``).

mmdet 2.x, as upstream's COCO configs set it up, resizes each image keeping its aspect ratio to fit
1333 x 800 (long side at most 1333, short side at most 800, up or down), bilinearly; normalises;
pads with zeros to a multiple of 32 at the bottom and right; runs the detector and divides the boxes
by the per-axis scale factors, pasting masks at the original size.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

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
# the most pixels one test pass may have (upstream's largest, 1568 x 6272 with multi-scale, has 9.8 M)
MAX_PASS_PIXELS = 1 << 24


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


def _source_rows(size: int, source: int, top: int, bottom: int) -> torch.Tensor:
    """Where rows ``top:bottom`` of a bilinear resize (``align_corners=False``) of ``source`` rows to
    ``size`` sample the source, in source pixels, clamped to the source as ``F.interpolate`` does."""
    rows = torch.arange(top, bottom, dtype=torch.float64)
    return ((rows + 0.5) * (source / size) - 0.5).clamp_(0, source - 1)


def _sample(values: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (1, C, h, w) ``values`` at rows ``ys`` and columns ``xs`` (source pixels,
    float64, inside the source): ``F.grid_sample``, whose grid is in [-1, 1] of the source's size."""
    h, w = values.shape[-2:]
    grid = torch.stack(torch.broadcast_tensors((2 * xs + 1) / w - 1, ((2 * ys + 1) / h - 1)[:, None]), -1)
    grid = grid.to(values.device, values.dtype)[None]
    return F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rescaled_pixels(image: Image.Image, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``image`` resized bilinearly to (1, 3, height, width) values in 0..255, rounded as an 8-bit image
    (cv2's output). Only the source rows each band of output rows samples are turned into floats:
    the full-size photo never exists as a float tensor."""
    rgb = torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image)).permute(2, 0, 1)
    if tuple(rgb.shape[-2:]) == (height, width):
        return rgb[None].to(device, torch.float32)
    xs = ((torch.arange(width, dtype=torch.float64) + 0.5) * (rgb.shape[-1] / width) - 0.5).clamp_(0, rgb.shape[-1] - 1)
    bands = []
    for top in range(0, height, _PIXEL_BAND):
        ys = _source_rows(height, rgb.shape[-2], top, min(top + _PIXEL_BAND, height))
        first, last = int(ys[0]), min(int(ys[-1]) + 1, rgb.shape[-2] - 1)
        rows = rgb[None, :, first : last + 1].to(device, torch.float32)
        bands.append(_sample(rows, ys - first, xs).round_().clamp_(0, 255))
    return torch.cat(bands, -2)


# output rows of a pixel resize sampled at once
_PIXEL_BAND = 64
# class probabilities held at the photo's size at once (float32): rows x width x classes
_BAND_VALUES = 1 << 22


def _pass_logits(
    segmentor: nn.Module,
    image: Image.Image,
    scale: Union[int, tuple[int, int], None],
    ratios: Sequence[float],
    flip: bool,
    device: Union[str, torch.device, None],
) -> list[torch.Tensor]:
    """The logits (1, C, h, w) of each test pass at its own scale, flipped passes flipped back."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is {image.width}x{image.height} pixels: nothing to segment")
    if not ratios or any(not isinstance(r, (int, float)) or not 0 < r < float("inf") for r in ratios):
        raise ValueError(f"ratios must be positive numbers, got {tuple(ratios)}")
    _check_scale(scale)
    if scale == 0:
        scale = default_scale(segmentor)
    parameter = next(segmentor.parameters())
    device = torch.device(device) if device is not None else parameter.device
    if device.type == "meta":
        raise ValueError("device meta: a model on the meta device has no weights to segment with; load it on cpu or cuda")
    cfg = getattr(segmentor, "pretrained_cfg", None) or {}
    # upstream's configs all normalise with ImageNet's statistics
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), device=device).view(1, 3, 1, 1) * 255
    passes = []
    for ratio in ratios:
        w, h = rescaled_size(image.width, image.height, scale, ratio)
        if _multiple(w) * _multiple(h) > MAX_PASS_PIXELS:
            raise ValueError(
                f"scale {scale!r} (ratio {ratio:g}) resizes the {image.width}x{image.height} image to {w}x{h}, over the "
                f"{MAX_PASS_PIXELS:,} pixels a test pass may have: pass a smaller scale"
            )
        resized = _resize_pixels(_rescaled_pixels(image, h, w, device), _multiple(h), _multiple(w))
        normalised = ((resized - mean) / std).to(parameter.dtype)
        for flipped in (False, True) if flip else (False,):
            logits = segmentor(normalised.flip(-1) if flipped else normalised).float()
            passes.append(logits.flip(-1) if flipped else logits)
    return passes


def _check_scale(scale: Any) -> None:
    def size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if scale is None or scale == 0 and not isinstance(scale, bool) or size(scale):
        return
    if isinstance(scale, (tuple, list)) and len(scale) == 2 and all(size(v) for v in scale):
        return
    raise ValueError(f"scale must be 0 (the model's), None (the image's size), a short side S or (short, long) in pixels, got {scale!r}")


def _band_probs(passes: list[torch.Tensor], height: int, width: int, top: int, bottom: int) -> torch.Tensor:
    """Rows ``top:bottom`` of the class probabilities at the image's size (C, rows, width): each pass's
    logits resized bilinearly (as ``F.interpolate(..., align_corners=False)``), softmaxed, averaged.
    A pixel's value does not depend on the band it is computed in."""
    total: Optional[torch.Tensor] = None
    for logits in passes:
        h, w = logits.shape[-2:]
        xs = _source_rows(width, w, 0, width)
        probs = _sample(logits, _source_rows(height, h, top, bottom), xs)[0].softmax(0)
        total = probs if total is None else total.add_(probs)
    return total.div_(len(passes))


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
    without one). The answer holds num_classes floats per pixel of the photo: ``predict`` needs
    far less memory for the labels alone.
    """
    return _band_probs(_pass_logits(segmentor, image, scale, ratios, flip, device), image.height, image.width, 0, image.height)


@torch.no_grad()
def predict(
    segmentor: nn.Module,
    image: Image.Image,
    scale: Union[int, tuple[int, int], None] = 0,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """The label map (H, W), int64 on the CPU, of ``predict_probs``: each pixel's most likely class.

    The probabilities are computed a band of rows at a time, so the memory beyond the label map is
    bounded by the test scale, not the photo: the passes' logits at their scales and
    ``_BAND_VALUES`` floats. The labels equal ``predict_probs(...).argmax(0)`` exactly.
    """
    passes = _pass_logits(segmentor, image, scale, ratios, flip, device)
    height, width = image.height, image.width
    labels = torch.empty((height, width), dtype=torch.int64)
    rows = max(1, _BAND_VALUES // (passes[0].shape[1] * width))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        labels[top:bottom] = _band_probs(passes, height, width, top, bottom).argmax(0).cpu()
    return labels


# upstream's COCO test scale (mmdet's ``img_scale=(1333, 800)``: the two side limits, in either order)
DETECTION_SCALE = (1333, 800)


def detection_batch(
    images: Sequence[torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[int, int] = DETECTION_SCALE,
    device: Union[str, torch.device, None] = None,
) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Upstream's detection test pipeline up to the model: ``(batch, image_sizes, original_sizes)``
    for ``detector.detect``.

    ``images``: (3, H, W) RGB tensors of any sizes, values 0..255 (float or uint8). Each is resized
    bilinearly keeping its ratio so that its long side is at most ``max(scale)`` and its short side
    at most ``min(scale)`` (mmcv's ``rescale_size``: the larger image that fits), rounded as an
    8-bit image (what mmdet's cv2 resize of a decoded file gives), normalised with ``mean`` and
    ``std`` (timm's 0..1 units, as in ``pretrained_cfg``), and padded with zeros at the bottom and
    right to the batch's largest size rounded up to a multiple of 32. ``image_sizes``: each
    resized (h, w) inside the batch (mmdet's ``img_shape``); ``original_sizes``: each input (h, w).
    """
    if len(scale) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in scale):
        raise ValueError(f"scale must be two positive side limits in pixels, e.g. (1333, 800), got {scale!r}")
    short, long = sorted(scale)
    device = torch.device(device) if device is not None else None
    resized, image_sizes, original_sizes = [], [], []
    for i, image in enumerate(images):
        check_detection_image(image, f"images[{i}]")
        height, width = image.shape[-2:]
        w, h = rescaled_size(width, height, (short, long))
        resized.append(_resize_pixels(image[None].to(device=device, dtype=torch.float32), h, w)[0])
        image_sizes.append((h, w))
        original_sizes.append((int(height), int(width)))
    if not resized:
        return torch.zeros(0, 3, SIZE_DIVISOR, SIZE_DIVISOR, device=device), [], []
    target = resized[0].device
    mean_ = torch.tensor(mean, device=target).view(3, 1, 1) * 255
    std_ = torch.tensor(std, device=target).view(3, 1, 1) * 255
    height = _multiple(max(h for h, _ in image_sizes))
    width = _multiple(max(w for _, w in image_sizes))
    batch = torch.zeros(len(resized), 3, height, width, device=target)
    for out, image, (h, w) in zip(batch, resized, image_sizes):
        out[:, :h, :w] = (image - mean_) / std_
    return batch, image_sizes, original_sizes


def check_detection_image(image: Any, name: str) -> None:
    """A (3, H, W) tensor of pixel values, at least one pixel: else an error naming ``name``."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a (3, H, W) tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, H, W) RGB tensor, got shape {tuple(image.shape)}")
    if image.is_complex() or image.dtype == torch.bool:
        raise TypeError(f"{name} must hold pixel values 0..255, got {image.dtype}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name} is {image.shape[2]}x{image.shape[1]} pixels: nothing to detect in")


def padded_detection_size(height: int, width: int, scale: tuple[int, int] = DETECTION_SCALE) -> tuple[int, int]:
    """The (h, w) an image of ``height`` x ``width`` pixels has in a batch of its own (resized to fit
    ``scale``, padded to 32): images of equal padded sizes batch as they run alone."""
    w, h = rescaled_size(width, height, tuple(sorted(scale)))
    return _multiple(h), _multiple(w)


@torch.no_grad()
def predict_detections(detector: nn.Module, image: Image.Image, aug: bool = False) -> dict[str, torch.Tensor]:
    """The detections of ``detector`` (a ``vitadapter`` detector in eval mode) in an RGB PIL image,
    on the CPU: ``boxes`` (N, 4) x1, y1, x2, y2 in the image's pixels, ``scores`` (N,), ``labels``
    (N,) 0-based (``detector.class_names``), ``masks`` (N, H, W) bool, best score first. ``aug``:
    under the detector's multi-scale flip test (``detector.detect_aug``; upstream's for HTC++)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is {image.width}x{image.height} pixels: nothing to detect in")
    pixels = torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image)).permute(2, 0, 1)
    (result,) = detector.detect_aug([pixels]) if aug else detector([pixels])
    return {k: v.cpu() for k, v in result.items()}

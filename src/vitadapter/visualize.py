"""Pictures of a feature pyramid: each level as the RGB of its first three principal components."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image, ImageDraw

# A component this much weaker than the first is rounding noise, not structure; stretching it to
# full contrast would paint noise as if it were a pattern.
_NEGLIGIBLE = 1e-4
_GAP = 4
_LABEL_HEIGHT = 14


def pca_rgb(feature: torch.Tensor) -> Image.Image:
    """(C, H, W) feature map -> W x H RGB image of its top three principal components."""
    if feature.dim() != 3:
        raise ValueError(f"expected a (C, H, W) feature map, got shape {tuple(feature.shape)}")
    channels, height, width = feature.shape
    x = feature.detach().reshape(channels, height * width).T.double()
    x = x - x.mean(0)
    # Plain SVD rather than pca_lowrank: deterministic, and (H*W, C) is small enough.
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(3, s.numel())
    proj = x @ vh[:k].T
    proj[:, s[:k] <= _NEGLIGIBLE * s[0]] = 0
    # Principal directions have arbitrary sign; fix it so colours are reproducible across runs.
    peak = proj.abs().argmax(0)
    proj = proj * torch.where(proj[peak, torch.arange(k)] < 0, -1.0, 1.0)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    scaled = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    rgb = torch.zeros(height * width, 3, dtype=torch.uint8)
    rgb[:, :k] = (scaled * 255).round().to(torch.uint8)
    return Image.fromarray(rgb.reshape(height, width, 3).numpy(), "RGB")


def pyramid_picture(
    image: Image.Image,
    levels: list[torch.Tensor],
    strides: Sequence[int] = (4, 8, 16, 32),
    height: int = 256,
) -> Image.Image:
    """The input and each (C, H, W) level side by side at ``height`` px, cells aligned to the pixels they cover."""
    if len(levels) != len(strides):
        raise ValueError(f"got {len(levels)} levels for {len(strides)} strides")
    w, h = image.size
    for level, stride in zip(levels, strides):
        expected = (math.ceil(h / stride), math.ceil(w / stride))
        if tuple(level.shape[-2:]) != expected:
            raise ValueError(f"stride-{stride} level is {tuple(level.shape[-2:])}, expected {expected} for a {w}x{h} image")
    scale = height / h
    width = max(1, round(w * scale))
    panels = [("input", image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))]
    for level, stride in zip(levels, strides):
        # Cell (i, j) covers input pixels [i*s, (i+1)*s): upsample by the stride, then crop the
        # part of the last cells that lies in the model's padding.
        cells = pca_rgb(level)
        full = (round(cells.width * stride * scale), round(cells.height * stride * scale))
        panel = cells.resize(full, Image.Resampling.NEAREST).crop((0, 0, width, height))
        panels.append((f"stride {stride}  ({level.shape[0]}x{level.shape[1]}x{level.shape[2]})", panel))

    picture = Image.new("RGB", (len(panels) * (width + _GAP) - _GAP, height + _LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(picture)
    for i, (label, panel) in enumerate(panels):
        left = i * (width + _GAP)
        picture.paste(panel, (left, _LABEL_HEIGHT))
        draw.text((left + 2, 1), label, fill="black")
    return picture

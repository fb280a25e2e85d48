"""Pictures: a feature pyramid (the input and each level coloured by principal components, with labels
and a caption that say what the picture shows), and segmentations (label maps, colour overlays)."""
from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import ade20k, cityscapes, coco_stuff

# A component this much weaker than the first is rounding noise, not structure; stretching it to
# full contrast would paint noise as if it were a pattern.
_NEGLIGIBLE = 1e-4
# Panels fit this box; 3 columns of it suit a 1920-px screen.
_PANEL_BOX = (576, 384)
_COLUMNS = 3
_MARGIN = 16
_GAP = 12
_TITLE_SIZE, _TEXT_SIZE = 26, 16
_ALERT = (200, 0, 0)


def principal_directions(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (k, C) principal directions, k <= 3 and strongest first, shared by (C, H, W) maps.

    Each map is centred on its own mean and counts as much as every other, whatever its size and
    scale: the directions are what the maps vary along together, not the offsets between them, and
    the 16x larger stride-4 map does not outvote the others.
    """
    if not features or any(f.dim() != 3 or f.shape[0] != features[0].shape[0] for f in features):
        raise ValueError(f"expected (C, H, W) maps with one C, got shapes {[tuple(f.shape) for f in features]}")
    covariance = 0
    for feature in features:
        x = feature.detach().reshape(feature.shape[0], -1).T.double()
        x = x - x.mean(0)
        covariance = covariance + x.T @ x / x.square().sum().clamp_min(1e-300)
    variances, vectors = torch.linalg.eigh(covariance)
    k = min(3, variances.numel())
    variances, vectors = variances.flip(0)[:k], vectors.flip(1)[:, :k]
    vectors = vectors[:, variances > _NEGLIGIBLE**2 * variances[0]]
    # Principal directions have arbitrary sign; fix it so colours are reproducible across runs.
    peak = vectors.abs().argmax(0)
    return (vectors * torch.where(vectors[peak, torch.arange(vectors.shape[1])] < 0, -1.0, 1.0)).T


def colour_map(feature: torch.Tensor, directions: torch.Tensor) -> Image.Image:
    """(C, H, W) map -> W x H RGB image: red, green, blue = the map's coordinates along the first,
    second and third direction, each stretched over its 1st-99th percentile in this map."""
    channels, height, width = feature.shape
    x = feature.detach().reshape(channels, height * width).T.double()
    proj = (x - x.mean(0)) @ directions.T
    rgb = torch.zeros(height * width, 3, dtype=torch.uint8)
    if proj.shape[1]:
        lo = torch.quantile(proj, 0.01, dim=0)
        hi = torch.quantile(proj, 0.99, dim=0)
        scaled = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        rgb[:, : proj.shape[1]] = (scaled * 255).round().to(torch.uint8)
    return Image.fromarray(rgb.reshape(height, width, 3).numpy(), "RGB")


def pca_rgb(feature: torch.Tensor) -> Image.Image:
    """(C, H, W) feature map -> W x H RGB image of its own top three principal components."""
    if feature.dim() != 3:
        raise ValueError(f"expected a (C, H, W) feature map, got shape {tuple(feature.shape)}")
    return colour_map(feature, principal_directions([feature]))


def pyramid_picture(
    image: Image.Image,
    levels: Sequence[torch.Tensor],
    strides: Sequence[int] = (4, 8, 16, 32),
    title: str = "",
    caption: Sequence[str] = (),
    alert: str = "",
) -> Image.Image:
    """The input and each (C, H, W) level in a grid, every cell drawn over the input pixels it covers,
    coloured by principal components shared by all levels; ``title`` on top, ``alert`` (in red) and
    ``caption`` paragraphs in the free grid cell."""
    if len(levels) != len(strides):
        raise ValueError(f"got {len(levels)} levels for {len(strides)} strides")
    w, h = image.size
    for level, stride in zip(levels, strides):
        expected = (math.ceil(h / stride), math.ceil(w / stride))
        if level.dim() != 3 or tuple(level.shape[-2:]) != expected:
            raise ValueError(f"stride-{stride} level is {tuple(level.shape)}, expected (C, *{expected}) for a {w}x{h} image")
    scale = _panel_scale(w, h, min(strides))
    width, height = max(1, round(w * scale)), max(1, round(h * scale))
    directions = principal_directions(levels)

    panels = [(("Input", f"{w} x {h} px"), image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))]
    for i, (level, stride) in enumerate(zip(levels, strides)):
        c, rows, cols = level.shape
        # Cell (i, j) covers input pixels [i*s, (i+1)*s): enlarge by the stride, then crop the part of
        # the last cells that lies in the model's padding.
        cells = colour_map(level, directions)
        full = (round(cols * stride * scale), round(rows * stride * scale))
        resample = Image.Resampling.NEAREST if stride * scale >= 1 else Image.Resampling.BOX
        panel = cells.resize(full, resample).crop((0, 0, width, height))
        panels.append(((f"Level {i + 1} · stride {stride}", f"{c} channels x {rows} high x {cols} wide"), panel))

    title_font, text_font = _font(_TITLE_SIZE), _font(_TEXT_SIZE)
    line = _TEXT_SIZE + 6
    label_height = 2 * line
    # a column is as wide as its panel or its widest label, whichever is wider
    column = max([width] + [math.ceil(text_font.getlength(text)) for label, _ in panels for text in label])
    cell_w, cell_h = column + _GAP, label_height + height + _GAP
    # the caption fills the grid cell after the panels, as deep as its text needs
    notes: list[tuple[str, tuple[int, int, int]]] = []
    for paragraph, colour in [(alert, _ALERT)] * bool(alert) + [(text, (0, 0, 0)) for text in caption]:
        notes += [(text, colour) for text in _wrap(paragraph, text_font, column)] + [("", colour)]
    title_lines = _wrap(title, title_font, _COLUMNS * cell_w - _GAP)
    title_height = _MARGIN + len(title_lines) * (_TITLE_SIZE + 6) + _MARGIN // 2 * bool(title_lines)
    last = len(panels)
    notes_top = title_height + (last // _COLUMNS) * cell_h
    bottom = max(title_height + math.ceil((len(panels) + 1) / _COLUMNS) * cell_h - _GAP, notes_top + len(notes) * line)
    picture = Image.new("RGB", (2 * _MARGIN + _COLUMNS * cell_w - _GAP, bottom + _MARGIN), "white")
    draw = ImageDraw.Draw(picture)
    for i, text in enumerate(title_lines):
        draw.text((_MARGIN, _MARGIN + i * (_TITLE_SIZE + 6)), text, fill="black", font=title_font)
    for n, ((heading, detail), panel) in enumerate(panels):
        left, top = _MARGIN + (n % _COLUMNS) * cell_w, title_height + (n // _COLUMNS) * cell_h
        draw.text((left, top), heading, fill="black", font=text_font)
        draw.text((left, top + line), detail, fill=(90, 90, 90), font=text_font)
        picture.paste(panel, (left, top + label_height))
    for i, (text, colour) in enumerate(notes):
        draw.text((_MARGIN + (last % _COLUMNS) * cell_w, notes_top + i * line), text, fill=colour, font=text_font)
    return picture


def _panel_scale(w: int, h: int, finest_stride: int) -> float:
    """Input pixels -> panel pixels: as large as fits the panel box, and when a finest-level cell
    spans at least one panel pixel, the nearest whole number of them, so that equal cells look equal."""
    scale = min(_PANEL_BOX[0] / w, _PANEL_BOX[1] / h)
    cell = scale * finest_stride
    return round(cell) / finest_stride if cell >= 1 else scale


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled scalable font (a fixed-size bitmap font where Pillow lacks FreeType)
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


# ---- segmentation: label maps and overlays ------------------------------------------------------------


def class_palette(num_classes: int, class_names: Sequence[str] | None = None) -> list[tuple[int, int, int]]:
    """An RGB colour per class: the dataset's own palette when the names are a bundled dataset's
    (ADE20K, COCO-Stuff, Cityscapes), else colours spread around the hue circle (golden-ratio steps,
    alternating brightness) so that neighbouring indices differ."""
    for dataset in (ade20k, coco_stuff, cityscapes):
        if class_names is not None and tuple(class_names) == dataset.CLASSES:
            return list(dataset.PALETTE)
    colours = []
    for k in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75 if k % 2 else 0.95, 0.95 if k % 3 else 0.7)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def label_image(labels: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Image.Image:
    """A (H, W) class-index map as a PNG-ready image whose pixel values are the class indices: a
    palette image (shown in the classes' colours) for up to 256 classes, 16-bit grayscale beyond."""
    labels = np.asarray(labels)
    if len(palette) > 256:
        return Image.fromarray(labels.astype(np.uint16))  # mode I;16
    picture = Image.fromarray(labels.astype(np.uint8), "P")
    picture.putpalette([v for colour in palette for v in colour] + [0] * 3 * (256 - len(palette)))
    return picture


def segmentation_overlay(
    image: Image.Image,
    labels: np.ndarray,
    palette: Sequence[tuple[int, int, int]],
    names: Sequence[str],
    alert: str = "",
    opacity: float = 0.5,
) -> Image.Image:
    """``image`` blended with its classes' colours (mmseg's ``opacity`` 0.5), the same size, with a
    legend of the classes present (largest share first; "+N more" where the image is too short) in the
    top-right corner and ``alert`` in red across the top (where it would cover over a third of the
    image, only its part before a colon)."""
    labels = np.asarray(labels)
    width, height = image.size
    if labels.shape != (height, width):
        raise ValueError(f"labels are {labels.shape[1]}x{labels.shape[0]}, the image is {width}x{height}")
    picture = Image.fromarray(_blend(np.asarray(image.convert("RGB")), labels, palette, opacity), "RGB").convert("RGBA")

    size = max(9, min(24, round(min(width, height) / 20)))
    font, pad = _font(size), max(2, size // 4)
    line = size + pad
    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    top = 0
    if alert:
        lines = _wrap(alert, font, width - 2 * pad)
        alert_font, alert_line = font, line
        if len(lines) * line > height / 3:  # a small image: the alert's head (up to a colon), in one line
            head = alert.partition(":")[0]
            alert_size = next((s for s in range(size, 6, -1) if _font(s).getlength(head) <= width - 2 * pad), 7)
            alert_font, alert_line = _font(alert_size), alert_size + pad
            lines = [_fit(head, alert_font, width - 2 * pad)]
        draw.rectangle((0, 0, width, len(lines) * alert_line + pad), fill=(255, 255, 255, 220))
        for i, text in enumerate(lines):
            draw.text((pad, pad + i * alert_line), text, fill=_ALERT + (255,), font=alert_font)
        top = len(lines) * alert_line + pad

    # a count per class: np.unique would sort a copy of a photo-sized label map
    counts = np.bincount(labels.ravel(), minlength=len(palette))
    classes = np.flatnonzero(counts)
    counts = counts[classes]
    order = np.argsort(-counts, kind="stable")
    entries = [(int(classes[i]), f"{names[classes[i]]} {_share(counts[i] / labels.size)}") for i in order]
    rows = max(1, (height - top - 2 * pad) // line)
    if len(entries) > rows:
        rest = counts[order[rows - 1:]].sum() / labels.size
        entries = entries[: rows - 1] + [(-1, f"+{len(entries) - rows + 1} more, {_share(rest)}")]
    text_width = max(1, width // 2 - size - 3 * pad)
    entries = [(k, _fit(text, font, text_width)) for k, text in entries]
    box_w = size + 3 * pad + max(math.ceil(font.getlength(text)) for _, text in entries)
    left = width - box_w - pad
    draw.rectangle((left, top + pad, width - pad, top + 2 * pad + len(entries) * line), fill=(255, 255, 255, 200))
    for i, (k, text) in enumerate(entries):
        y = top + 2 * pad + i * line
        if k >= 0:
            draw.rectangle((left + pad, y, left + pad + size - 1, y + size - 1), fill=tuple(palette[k]) + (255,), outline=(0, 0, 0, 255))
        draw.text((left + size + 2 * pad, y), text, fill=(0, 0, 0, 255), font=font)
    return Image.alpha_composite(picture, layer).convert("RGB")


def _blend(rgb: np.ndarray, labels: np.ndarray, palette: Sequence[tuple[int, int, int]], opacity: float) -> np.ndarray:
    """``rgb * (1 - opacity) + colour * opacity`` as 8-bit values, a band of rows at a time: the float
    arrays of a whole photo would take 24 bytes a pixel."""
    colours = np.asarray(palette, dtype=np.float32)
    out = np.empty_like(rgb)
    rows = max(1, (1 << 20) // max(1, rgb.shape[1]))
    for top in range(0, rgb.shape[0], rows):
        band = slice(top, top + rows)
        blended = rgb[band].astype(np.float32) * (1 - opacity) + colours[labels[band]] * opacity
        out[band] = blended.round()
    return out


def _share(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.01 else "<1%"


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text``, cut with an ellipsis where it is wider than ``width``."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


# ---- detection: instances drawn over the image ----------------------------------------------------------------


def detection_overlay(
    image: Image.Image,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    names: Sequence[str],
    caption: str = "",
    alert: str = "",
    opacity: float = 0.5,
) -> Image.Image:
    """``image`` with each detection drawn in a colour of its own: its mask tinted (mmdet's
    ``opacity`` 0.5), its box outlined, and "class score" on a tag filled with that colour (black or
    white text, whichever stands out more) at the box's top-left corner, so labels read on dark and
    light photos alike. The lowest score is drawn first, so the best lie on top. A white band above
    the image, ruled off from it, holds ``alert`` in red and ``caption`` in black."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores, labels = np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)
    width, height = image.size
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != (len(boxes), height, width):
            raise ValueError(f"masks are {masks.shape}, expected ({len(boxes)}, {height}, {width}) for the {width}x{height} image")
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"got {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    colours = class_palette(len(boxes))
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    order = np.argsort(scores, kind="stable")
    for i in order if masks is not None else ():
        pixels[masks[i]] = pixels[masks[i]] * (1 - opacity) + np.asarray(colours[i], np.float32) * opacity
    drawn = Image.fromarray(pixels.round().astype(np.uint8), "RGB")

    size = max(12, min(22, round(max(width, height) / 40)))
    font, pad = _font(size), max(2, size // 5)
    line_width = max(2, round(max(width, height) / 300))
    draw = ImageDraw.Draw(drawn)
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        draw.rectangle((x1, y1, x2, y2), outline=colours[i], width=line_width)
    for i in order:  # tags after every box, so no box crosses a tag
        x1, y1 = boxes[i][:2]
        text = f"{names[labels[i]]} {scores[i]:.2f}"
        tag_w, tag_h = math.ceil(font.getlength(text)) + 2 * pad, size + 2 * pad
        left = min(max(0.0, x1), max(0.0, width - tag_w))
        top = y1 - tag_h if y1 - tag_h >= 0 else max(0.0, y1)  # above the box, or inside it at the image's top
        draw.rectangle((left, top, left + tag_w, top + tag_h), fill=colours[i], outline=(0, 0, 0))
        draw.text((left + pad, top + pad), text, fill=_contrasting(colours[i]), font=font)

    band_size = max(12, min(20, round(width / 40)))
    band_font, band_pad = _font(band_size), max(3, band_size // 3)
    lines = [(text, _ALERT) for text in _wrap(alert, band_font, width - 2 * band_pad)]
    lines += [(text, (0, 0, 0)) for text in _wrap(caption, band_font, width - 2 * band_pad)]
    band = len(lines) * (band_size + band_pad) + band_pad + 1 if lines else 0
    picture = Image.new("RGB", (width, height + band), "white")
    picture.paste(drawn, (0, band))
    draw = ImageDraw.Draw(picture)
    if lines:  # a rule between band and photo, which may be white too
        draw.line((0, band - 1, width, band - 1), fill=(128, 128, 128))
    for k, (text, colour) in enumerate(lines):
        draw.text((band_pad, band_pad + k * (band_size + band_pad)), text, fill=colour, font=band_font)
    return picture


def _contrasting(colour: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``colour`` (WCAG's relative luminance)."""
    linear = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)

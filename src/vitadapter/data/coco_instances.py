"""A COCO-format instance segmentation set (a folder of images and an instances JSON) as mmdet 2.x's
``CocoDataset`` reads it for training.

Categories become contiguous labels in the order of their ids (COCO's own file gives mmdet's 80
labels); boxes go from x, y, w, h to x1, y1, x2, y2; crowd annotations become boxes to ignore;
polygons and RLE become one bool mask per box. As mmdet, annotations flagged ``ignore``, of width or
height under 1 px, of no area or wholly outside their image are left out, and images smaller than
32 px or with no annotation at all are not trained on. Everything that would stop a run (a missing
image, an annotation of an unknown image or category, a category beyond the model's classes) is
refused here, in one line, before training starts.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from .images import read_rgb

try:  # COCO's own rasteriser and RLE codec when installed (eval-det needs it anyway)
    from pycocotools import mask as coco_mask
except ImportError:  # pragma: no cover - exercised where pycocotools is absent
    coco_mask = None

# mmdet's CocoDataset filter: images whose shorter side is below this are not trained on
MIN_SIZE = 32


class CocoInstances:
    """``dataset[i]``: ``{"image": uint8 (H, W, 3), "boxes": float32 (N, 4) x1y1x2y2, "labels": int64
    (N,), "masks": bool (N, H, W), "ignore_boxes": float32 (M, 4), "file": str}`` for the i-th image
    that has annotations.

    ``image_dir``: the folder the JSON's ``file_name`` entries are relative to; ``ann_file``: the
    instances JSON; ``num_classes``: the model's class count (default: the file's categories), which
    every category's label must be below. ``class_names``: the categories' names, label order.
    """

    def __init__(self, image_dir: Union[str, os.PathLike], ann_file: Union[str, os.PathLike], num_classes: Optional[int] = None):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir}: no such folder (the images of {self.ann_file.name})")
        data = _read_json(self.ann_file)
        categories = sorted(_entries(data, "categories", self.ann_file, ("id", "name")), key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"{self.ann_file}: categories list an id twice")
        self.class_names = [str(c["name"]) for c in categories]
        self.num_classes = len(categories) if num_classes is None else num_classes
        if len(categories) > self.num_classes:
            label = self.num_classes
            raise ValueError(
                f"{self.ann_file}: category {self.category_ids[label]} {self.class_names[label]!r} is label {label} of "
                f"{len(categories)}, not a class of this {self.num_classes}-class model: check --num-classes"
            )
        labels = {cid: label for label, cid in enumerate(self.category_ids)}

        images = _entries(data, "images", self.ann_file, ("id", "file_name", "height", "width"))
        by_id = {}
        for image in images:
            by_id[image["id"]] = image
            path = self.image_dir / image["file_name"]
            if not path.is_file():
                raise FileNotFoundError(f"{self.ann_file}: image {image['id']} is {path}, which does not exist")
        annotations: dict[Any, list[dict[str, Any]]] = {}
        for k, ann in enumerate(_entries(data, "annotations", self.ann_file, ("image_id", "category_id", "bbox"))):
            where = f"{self.ann_file}: annotations[{k}] (id {ann.get('id')})"
            if ann["image_id"] not in by_id:
                raise ValueError(f"{where} is of image_id {ann['image_id']}, which no entry of images has")
            if ann["category_id"] not in labels:
                raise ValueError(f"{where} is of category_id {ann['category_id']}, which categories does not list")
            bbox = ann["bbox"]
            if not (isinstance(bbox, Sequence) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise ValueError(f"{where}: bbox must be 4 numbers x, y, width, height, got {bbox!r}")
            annotations.setdefault(ann["image_id"], []).append(ann)
        self.labels = labels
        # images are trained on in the file's order
        self.samples = [
            (by_id[i], annotations[i]) for i in by_id
            if i in annotations and min(by_id[i]["height"], by_id[i]["width"]) >= MIN_SIZE
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_info, annotations = self.samples[index]
        path = self.image_dir / image_info["file_name"]
        height, width = int(image_info["height"]), int(image_info["width"])
        image = np.array(read_rgb(path))  # writable: the augmentations hand it to torch
        if image.shape[:2] != (height, width):
            raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]} pixels; {self.ann_file.name} says {width}x{height}")
        boxes, labels, masks, ignore = [], [], [], []
        for ann in annotations:
            x, y, w, h = (float(v) for v in ann["bbox"])
            inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
            inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
            if ann.get("ignore", False) or inter_w * inter_h == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                continue
            box = [x, y, x + w, y + h]
            if ann.get("iscrowd", 0):
                ignore.append(box)
                continue
            boxes.append(box)
            labels.append(self.labels[ann["category_id"]])
            masks.append(decode_segmentation(ann.get("segmentation"), height, width, f"{self.ann_file.name} annotation {ann.get('id')}"))
        return {
            "image": image,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "masks": np.stack(masks) if masks else np.zeros((0, height, width), bool),
            "ignore_boxes": np.asarray(ignore, np.float32).reshape(-1, 4),
            "file": str(path),
        }


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """A COCO ``segmentation`` (polygons ``[[x0, y0, x1, y1, ...], ...]``, uncompressed RLE ``{"counts":
    [int, ...], "size": [h, w]}`` or compressed RLE ``{"counts": str, ...}``) as a bool (height, width)
    mask. With pycocotools installed its rasteriser does it, as mmdet's loader; without, Pillow fills
    the polygons (pixel centres inside) and the RLE is decoded here."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if len(polygons) != len(segmentation) or not all(isinstance(v, (int, float)) for p in polygons for v in p):
            raise ValueError(f"{where}: polygons must be lists of at least 3 x, y pairs")
        if coco_mask is not None:
            return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))).astype(bool)
        canvas = Image.new("1", (width, height))
        draw = ImageDraw.Draw(canvas)
        for polygon in polygons:
            draw.polygon(polygon, fill=1)
        return np.asarray(canvas, dtype=bool)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"{where}: RLE of size {segmentation['size']} for an image of {height}x{width}")
        counts = segmentation["counts"]
        if coco_mask is not None:
            rle = coco_mask.frPyObjects(segmentation, height, width) if isinstance(counts, list) else segmentation
            rle = dict(rle, counts=rle["counts"].encode()) if isinstance(rle["counts"], str) else rle
            return coco_mask.decode(rle).astype(bool)
        return rle_decode(counts, height, width)
    raise ValueError(f"{where}: segmentation must be polygons or an RLE dict, got {type(segmentation).__name__}")


def rle_decode(counts: Union[str, bytes, Sequence[int]], height: int, width: int) -> np.ndarray:
    """COCO's run-length encoding (column-major runs, starting with a run of 0s) as a bool mask; a
    string is COCO's compressed form (6 bits a character from 48, a continuation bit, runs after
    the third stored as differences to the run two back)."""
    if isinstance(counts, (str, bytes)):
        counts = _uncompress(counts.encode() if isinstance(counts, str) else counts)
    runs = np.asarray(counts, np.int64)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(f"RLE counts cover {int(runs.sum())} pixels, the mask has {height * width}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def _uncompress(data: bytes) -> list[int]:
    counts: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            chunk = data[position] - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position, shift = position + 1, shift + 1
            if not more and chunk & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO instances file is a JSON object with images, annotations and categories")
    return data


def _entries(data: dict[str, Any], key: str, path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: no {key} list: not a COCO instances file")
    for k, entry in enumerate(entries):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise ValueError(f"{path}: {key}[{k}] lacks {', '.join(missing)}")
    return entries

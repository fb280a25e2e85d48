"""A segmentation dataset on disk in ADE20K's layout: ``images/`` and ``annotations/`` side by side,
one label PNG per image with the same file stem, optionally split into subfolders
(``images/validation/ADE_val_00000001.jpg`` <-> ``annotations/validation/ADE_val_00000001.png``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from .images import read_label, read_rgb

IGNORE_INDEX = 255


class SegmentationFolder:
    """``dataset[i]`` -> ``{"image": PIL RGB, "label": int64 (H, W) array, "name": str}``.

    ``reduce_zero_label`` (ADE20K's convention, on by default): the stored label 0 ("other") becomes
    ``IGNORE_INDEX`` and every other label ``k`` becomes ``k - 1``, so models predict 0..149.
    ``split`` names the subfolder of ``images/`` and ``annotations/`` (``training``, ``validation``).
    Images without an annotation are an error unless ``labels_required=False`` (their label is None).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: Optional[str] = None,
        reduce_zero_label: bool = True,
        labels_required: bool = True,
    ):
        self.root = Path(root)
        image_dir, label_dir = self.root / "images", self.root / "annotations"
        if split:
            image_dir, label_dir = image_dir / split, label_dir / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{self.root} has no {image_dir.relative_to(self.root)}/ folder (expected images/ and annotations/)")
        images = _image_files(image_dir)
        if not images:
            subfolders = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
            hint = f"; pass split= one of {', '.join(subfolders)}" if subfolders else ""
            raise ValueError(f"no image files in {image_dir}{hint}")
        labels = {p.stem: p for p in (label_dir.glob("*.png") if label_dir.is_dir() else [])}
        missing = [p.name for p in images if p.stem not in labels]
        if missing and labels_required:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(f"{len(missing)} image(s) in {image_dir} have no label PNG of the same name in {label_dir}: {shown}")
        self.samples = [(p, labels.get(p.stem)) for p in images]
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.samples[index]
        image = read_rgb(image_path)
        label = None
        if label_path is not None:
            label = read_label(label_path)
            if label.shape != (image.height, image.width):
                raise ValueError(f"{label_path} is {label.shape[1]}x{label.shape[0]}, its image {image_path.name} is {image.width}x{image.height}")
            if self.reduce_zero_label:
                label = reduce_zero_label(label)
        return {"image": image, "label": label, "name": image_path.name}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> ignore, k -> k - 1 (the ignore value itself stays ignored)."""
    reduced = label - 1
    reduced[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced


def _image_files(folder: Path) -> list[Path]:
    Image.init()
    return sorted(p for p in folder.iterdir() if p.is_file() and Image.EXTENSION.get(p.suffix.lower()) in Image.OPEN)

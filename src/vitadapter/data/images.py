"""Reading images and label maps the way a user's files actually come: EXIF-rotated photos,
grayscale, palette and 16-bit PNGs, transparency."""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Source = Union[str, os.PathLike, IO[bytes]]
# the vitadapter command sets PIL.Image.MAX_IMAGE_PIXELS from it
MAX_PIXELS_ENV = "VITADAPTER_MAX_IMAGE_PIXELS"


def read_rgb(source: Source, name: str = "") -> Image.Image:
    """An 8-bit RGB image, upright as a viewer shows it.

    EXIF orientation is applied (as OpenCV's reader, which upstream's pipeline uses, does); 16- and
    32-bit grayscale is scaled to 8 bits by its type's range, not clipped; transparent pixels are
    composited onto white. Raises ``ValueError`` naming the file for anything Pillow cannot decode.
    """
    name = name or str(source)
    try:
        with _open(source) as im:
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(_bomb(name, e)) from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data; SyntaxError: some broken headers
        raise ValueError(f"cannot read image {name}: {' '.join(str(e).split())}") from e


def read_label(source: Source, name: str = "") -> np.ndarray:
    """A label map as stored (the palette index, not its colour), as a 2-D int64 array."""
    name = name or str(source)
    try:
        with _open(source) as im:
            if im.mode in ("RGB", "RGBA"):
                raise ValueError(f"{name}: a label map holds one class index per pixel, this is an {im.mode} image")
            return np.asarray(im if im.mode != "LA" else im.getchannel("L")).astype(np.int64)
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not a label image Pillow can read (PNG)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(_bomb(name, e)) from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read label map {name}: {' '.join(str(e).split())}") from e


def _bomb(name: str, error: Exception) -> str:
    return (
        f"{name}: {' '.join(str(error).split())} Pillow refuses images over twice PIL.Image.MAX_IMAGE_PIXELS "
        f"({Image.MAX_IMAGE_PIXELS:,}); for a file you trust, raise it (the vitadapter command: "
        f"{MAX_PIXELS_ENV}=N)"
    )


def _open(source: Source) -> Image.Image:
    im = Image.open(source if not isinstance(source, (str, os.PathLike)) else Path(source))
    im.load()
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(im, dtype=np.float64)
        if im.mode == "F":  # floats have no fixed range: the largest value becomes white
            top = max(values.max(initial=0.0), 1e-12)
        else:  # 16-bit files (Pillow opens some as 32-bit "I"): their full range
            top = 65535.0 if values.max(initial=0.0) <= 65535 else 2.0**32 - 1
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")

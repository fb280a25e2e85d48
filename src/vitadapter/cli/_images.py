"""The input images of features and segment: the bundled cat, one file or a folder; read upright in
RGB; and the refusal of outputs that would replace one of them."""
from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..weights.staging import inputs_in_the_way
from ._common import UsageError, first_few, one_line

if TYPE_CHECKING:
    from PIL import Image

BUNDLED = "chelsea.png"


def image_files(path: Optional[str]) -> list[tuple[str, Any]]:
    """(name to show, file) of the bundled cat, one image file or each image in a folder."""
    if path is None:
        return [(f"{BUNDLED} (bundled)", importlib.resources.files("vitadapter") / "assets" / BUNDLED)]
    _set_pixel_limit()
    source = Path(path)
    if source.is_dir():
        from PIL import Image  # lazy: startup time

        Image.init()
        # a dangling link or a link loop is listed: reading it names the file as unreadable
        found = sorted(p for p in source.iterdir() if file_or_link(p) and Image.EXTENSION.get(p.suffix.lower()) in Image.OPEN)
        if not found:
            raise UsageError(f"{path} holds no image files Pillow can read")
        return [(str(p), p) for p in found]
    if not source.is_file():
        raise UsageError(f"no image file or folder at {path!r}")
    return [(path, source)]


def check_images(path: Optional[str], images: list[tuple[str, Any]]) -> None:
    """Before any model is built: for a folder, name on stderr the files left out (no image extension
    Pillow reads); for one image, read it (one that cannot be read is the error)."""
    if path is not None and Path(path).is_dir():
        listed = {file for _, file in images}
        others = sorted(p.name for p in Path(path).iterdir()
                        if file_or_link(p) and p not in listed and not p.name.startswith("."))
        if others:
            print(f"vitadapter: left out {len(others)} file(s) without an image extension: {first_few(others)}",
                  file=sys.stderr)
    else:
        read_image(*images[0])


def file_or_link(path: Path) -> bool:
    return path.is_file() or path.is_symlink()


def _set_pixel_limit() -> None:
    """Pillow's guard against decompression bombs, raised by ``$VITADAPTER_MAX_IMAGE_PIXELS``."""
    from ..data.images import MAX_PIXELS_ENV  # lazy: startup time (it imports numpy and Pillow)

    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{MAX_PIXELS_ENV}={text}: expected a positive number of pixels")
    from PIL import Image  # lazy: startup time

    Image.MAX_IMAGE_PIXELS = int(text)


def read_image(name: str, source: Any) -> "Image.Image":
    """An upright 8-bit RGB image from any file Pillow reads; ``ValueError`` naming it otherwise."""
    from ..data.images import read_rgb  # lazy: startup time

    try:
        with source.open("rb") as f:
            return read_rgb(f, name)
    except OSError as e:  # the file itself cannot be opened
        raise ValueError(f"cannot read image {name}: {one_line(e)}") from e


def output_stems(images: list[Path]) -> list[str]:
    """The stems of the images' file names, or where two share one, every full name (unique in a folder)."""
    stems = [p.stem for p in images]
    return stems if len(set(stems)) == len(stems) else [p.name for p in images]


def refuse_replacing_inputs(outputs: list[Path], images: list[tuple[str, Any]], out: Path) -> None:
    """Refuse outputs that are input images of this run (the same file, by any path), before any work."""
    clashes = inputs_in_the_way(outputs, [source for _, source in images if isinstance(source, os.PathLike)])
    if clashes:
        shown = first_few([str(output) if output == source else f"{output} (= {source})" for output, source in clashes])
        raise UsageError(f"--out {out}: the outputs would replace {len(clashes)} input image(s) of this run: {shown}; "
                         "pick another --out")

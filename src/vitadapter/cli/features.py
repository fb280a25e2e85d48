"""``vitadapter features``: run a backbone on an image (or each image of a folder) and write a picture of
its feature pyramid, with a table of the levels' shapes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..weights.staging import check_destination, save_image
from ._common import (
    DEFAULT_BACKBONE, UsageError, check_model_name, check_weights_file, one_line, size_option, subcommand, torch_device,
)
from ._images import image_files, output_stems, read_image, refuse_replacing_inputs
from ._models import model_from_options

if TYPE_CHECKING:
    import torch
    from PIL import Image

PICTURE = "vitadapter_features.png"
PICTURE_FOLDER = "vitadapter_features"
# the largest model input of `features` (4096 x 4096): a long strip resized to a short side of 512
# would otherwise become a picture of millions of pixels a side
MAX_FEATURE_PIXELS = 1 << 24
RANDOM_WEIGHTS = (
    "random initialisation (seed {seed}) - no pretrained weights are loaded; "
    "the picture shows the structure of the pyramid, not learned features"
)


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "features", "run a model on an image (or a folder of images) and picture its feature pyramid")
    p.add_argument("image", nargs="?", help="image file or folder of images (default: the bundled chelsea.png)")
    p.add_argument("--model", default=DEFAULT_BACKBONE, help="model name (default: %(default)s)")
    p.add_argument("--out", metavar="PATH",
                   help=f"picture to write (default: {PICTURE}), or for a folder the folder of pictures (default: {PICTURE_FOLDER}/)")
    p.add_argument("--size", type=size_option, metavar="N|original",
                   help="resize so the short side is N px, or keep the original size (default: the model's input size, 512)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="load the model's weights (its default tag, or NAME.TAG / local-dir: / hf-hub:); may download")
    weights.add_argument("--weights", metavar="FILE", help="load weights from a local file (.safetensors, upstream .pth/.zip)")
    p.set_defaults(run=features)


def features(args: argparse.Namespace) -> int:
    images = image_files(args.image)
    folder = args.image is not None and Path(args.image).is_dir()
    out = Path(args.out or (PICTURE_FOLDER if folder else PICTURE))
    if not folder:
        _check_picture_path(out)
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: for a folder of images this names a folder of pictures, and it is a file")
    targets = _picture_names(out, [Path(name) for name, _ in images]) if folder else [out]
    refuse_replacing_inputs(targets, images, out)
    check_model_name(args.model, "--model", kind="backbone")
    if args.weights is not None:
        check_weights_file(args.weights, "--weights")
    device = torch_device(args.device)
    model, weights = model_from_options(args, device)
    if not folder:
        picture, table = _picture(model, device, args, *images[0], weights)
        save_image(picture, out)
        print(table)
        print(f"wrote {out}")
        return 0

    from huggingface_hub.utils import tqdm  # lazy: startup time

    out.mkdir(parents=True, exist_ok=True)
    # a bar on a terminal only: in a log its redraws would run into one line
    skipped = 0
    with tqdm(total=len(images), unit="image", desc="features", disable=None) as bar:
        for (name, source), target in zip(images, targets):
            try:
                save_image(_picture(model, device, args, name, source, weights)[0], target)
                bar.write(f"wrote {target}")
            except ValueError as e:  # an unreadable file is reported; the other images go on
                bar.write(f"vitadapter: skipped {one_line(e)}", file=sys.stderr)
                skipped += 1
            bar.update()
    print(f"wrote {len(targets) - skipped} pictures into {out}")
    if skipped:
        print(f"vitadapter: {skipped} file(s) could not be read (listed above)", file=sys.stderr)
    return 1 if skipped else 0


def _picture_names(folder: Path, images: list[Path]) -> list[Path]:
    """cat.jpg -> FOLDER/cat.png; where two images share a stem, every picture keeps the suffix too."""
    return [folder / f"{stem}.png" for stem in output_stems(images)]


def _check_picture_path(path: Path) -> None:
    from PIL import Image  # lazy: startup time

    Image.init()
    if Image.EXTENSION.get(path.suffix.lower()) not in Image.SAVE:
        kind = f"'{path.suffix}' files" if path.suffix else "a file name without an extension"
        raise UsageError(f"--out {path}: Pillow cannot write {kind}; name a .png (or .jpg, .webp) file")
    check_destination(path, "--out")


def _picture(
    model: "torch.nn.Module", device: "torch.device", args: argparse.Namespace, name: str, source: Any, weights: Optional[str]
) -> tuple["Image.Image", str]:
    """The pyramid picture of one image and the table of its level shapes."""
    import numpy as np  # lazy: startup time
    import torch
    from PIL import Image

    from ..visualize import pyramid_picture

    cfg = model.pretrained_cfg
    original = read_image(name, source)
    size = cfg["input_size"][-1] if args.size is None else args.size
    width, height = original.size if size == "original" else _short_side_size(original.size, size)
    if width * height > MAX_FEATURE_PIXELS:
        shown = "kept at its size" if size == "original" else f"resized to short side {size}"
        raise ValueError(f"{name} is {original.width}x{original.height}: {shown} it is {width}x{height}, over the "
                         f"{MAX_FEATURE_PIXELS:,} pixels features runs a model on; crop it, or pass a smaller --size")
    image = original if size == "original" else original.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    with torch.inference_mode():
        levels = [level[0].float().cpu() for level in model(((pixels - mean) / std).unsqueeze(0).to(device))]
    strides = [info["reduction"] for info in model.feature_info]

    resized = "" if image.size == original.size else (
        f", resized from {original.width} x {original.height} (short side {size}"
        + (", the model's default; --size changes it)" if args.size is None else ")")
    )
    caption = [
        f"Input: {image.width} x {image.height} px{resized}.",
        f"Weights: {weights}." if weights else "",
        f"Colours: each cell's {levels[0].shape[0]} channels projected on the three directions the "
        "levels vary along most (the same three for every level), as red, green and blue.",
    ]
    alert = ""
    if weights is None:
        alert = (f"Random weights (seed {args.seed}): nothing here is learned. "
                 "Pass --pretrained or --weights FILE for learned features.")
        caption.append(
            "Stride 4: the checkerboard is the untrained 2 x 2 transposed convolution that upsamples "
            "stride 8 (four kernel positions, four random projections)."
        )
    state = "random weights" if weights is None else "learned weights"
    picture = pyramid_picture(
        image, levels, strides, title=f"{args.model} with {state}: feature pyramid of {Path(name).name}",
        caption=[line for line in caption if line], alert=alert,
    )

    from_size = "" if image.size == original.size else f", resized from {original.width}x{original.height}"
    rows = [
        f"model: {args.model}",
        f"weights: {weights or RANDOM_WEIGHTS.format(seed=args.seed)}",
        f"input: {name}, {image.width}x{image.height} (W x H){from_size}",
        "level  stride     C     H     W",
    ]
    for i, (stride, level) in enumerate(zip(strides, levels)):
        c, h, w = level.shape
        rows.append(f"{i + 1:>5}  {stride:>6}  {c:>4}  {h:>4}  {w:>4}")
    return picture, "\n".join(rows)


def _short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    w, h = size
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))

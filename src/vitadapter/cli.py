"""The ``vitadapter`` command: list and describe models, and picture one image's feature pyramid."""
from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import __version__, create_model, list_models
from .visualize import pyramid_picture


def _list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        print(f"vitadapter: no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _describe(args: argparse.Namespace) -> int:
    model = create_model(args.name, pretrained=False)
    total = sum(p.numel() for p in model.parameters())
    vit = sum(p.numel() for p in model.vit.parameters())
    print(args.name)
    print(f"parameters: {total:,} total = {vit:,} ViT (model.vit) + {total - vit:,} adapter")
    print("feature_info:")
    for i, info in enumerate(model.feature_info):
        print(f"  level {i + 1}: {info['num_chs']} channels, reduction {info['reduction']}")
    return 0


def _load_image(path: Optional[str], size: Optional[int]) -> tuple[str, Image.Image]:
    """(name to show, RGB image), read from ``path`` or the bundled cat and optionally resized."""
    if path is None:
        name, source = "chelsea.png (bundled)", importlib.resources.files("vitadapter") / "assets" / "chelsea.png"
    else:
        name, source = path, Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no image file at {path!r}")
    try:
        with source.open("rb") as f, Image.open(f) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {name!r}: {err}") from err
    if size is not None:
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return name, image


def _features(args: argparse.Namespace) -> int:
    name, image = _load_image(args.image, args.size)
    torch.manual_seed(args.seed)
    model = create_model(args.model, pretrained=False).eval()
    cfg = model.pretrained_cfg
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    with torch.inference_mode():
        levels = model(((pixels - mean) / std).unsqueeze(0))

    strides = [info["reduction"] for info in model.feature_info]
    # Write first, so a bad --out fails before anything is reported.
    pyramid_picture(image, [level[0] for level in levels], strides).save(args.out)

    print(f"model: {args.model}")
    print(
        f"weights: random initialisation (seed {args.seed}) - no pretrained weights are loaded; "
        "the picture shows the structure of the pyramid, not learned features"
    )
    print(f"input: {name}, {image.width}x{image.height} (W x H)")
    print("level  stride     C     H     W")
    for i, (stride, level) in enumerate(zip(strides, levels)):
        _, c, h, w = level.shape
        print(f"{i + 1:>5}  {stride:>6}  {c:>4}  {h:>4}  {w:>4}")
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per job."""
    parser = argparse.ArgumentParser(prog="vitadapter", description="ViT-Adapter feature pyramids on timm ViTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="print the registered model names")
    p.add_argument("pattern", nargs="?", default="", help="glob filter, e.g. '*_t'")
    p.set_defaults(run=_list)

    p = sub.add_parser("describe", help="parameter counts and pyramid levels of a model")
    p.add_argument("name", help="model name, see `vitadapter list`")
    p.set_defaults(run=_describe)

    p = sub.add_parser("features", help="run a model on an image and write a PCA picture of the pyramid")
    p.add_argument("image", nargs="?", help="image file (default: the bundled chelsea.png)")
    p.add_argument("--model", default="vit_adapter_t", help="model name (default: %(default)s)")
    p.add_argument("--out", default="vitadapter_features.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--size", type=_positive_int, metavar="N", help="resize so the short side is N px (default: keep the size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.set_defaults(run=_features)
    return parser


def _positive_int(text: str) -> int:
    """argparse type for --size, so a bad value is reported as a usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vitadapter`` script; returns the exit code (2 on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"vitadapter: error: {err}", file=sys.stderr)
        return 2

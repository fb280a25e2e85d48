"""The ``vitadapter`` command: list and describe models, picture one image's feature pyramid and
convert upstream checkpoints into Hub folders."""
from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from huggingface_hub.utils import tqdm
from PIL import Image, UnidentifiedImageError

from . import __version__, create_model, list_models, list_pretrained, load_upstream
from .config_checks import check_pretrained_cfg, input_channels
from .hub import read_weights, save_pretrained
from .staging import staging_folder
from .upstream import Conversion, load_checkpoint, model_kwargs
from .visualize import pyramid_picture


def _list(args: argparse.Namespace) -> int:
    names = (list_pretrained if args.pretrained else list_models)(args.pattern)
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
    pretrained = args.pretrained or args.weights is not None
    overlay = dict(file=args.weights) if args.weights else None
    model = create_model(args.model, pretrained=pretrained, pretrained_cfg_overlay=overlay).eval()
    cfg = model.pretrained_cfg
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    with torch.inference_mode():
        levels = model(((pixels - mean) / std).unsqueeze(0))

    strides = [info["reduction"] for info in model.feature_info]
    # Write first, so a bad --out fails before anything is reported.
    pyramid_picture(image, [level[0] for level in levels], strides).save(args.out)

    print(f"model: {args.model}")
    print(f"weights: {_weights_source(cfg) if pretrained else _RANDOM.format(seed=args.seed)}")
    print(f"input: {name}, {image.width}x{image.height} (W x H)")
    print("level  stride     C     H     W")
    for i, (stride, level) in enumerate(zip(strides, levels)):
        _, c, h, w = level.shape
        print(f"{i + 1:>5}  {stride:>6}  {c:>4}  {h:>4}  {w:>4}")
    print(f"wrote {args.out}")
    return 0


_RANDOM = (
    "random initialisation (seed {seed}) - no pretrained weights are loaded; "
    "the picture shows the structure of the pyramid, not learned features"
)


def _weights_source(cfg: dict) -> str:
    """Where the loaded weights came from, as the pretrained cfg records it."""
    if cfg.get("file"):  # a local file overrides whatever the tag points at
        return str(cfg["file"])
    tag = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag"))))
    source = cfg.get("hf_hub_id") or cfg.get("url") or "the model's folder"
    return f"{tag or 'pretrained'} from {source}"


def _convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if dst.exists():
        raise _exists(dst)
    model, pretrained_cfg = _model_to_convert(args)
    with tqdm(total=3, desc="convert", unit="step", bar_format="{desc}: {n}/{total} steps{postfix}") as bar:
        bar.set_postfix_str(f"reading {args.src}")
        checkpoint = read_weights(args.src)
        bar.update()
        bar.set_postfix_str("converting keys")
        conversion = load_checkpoint(model, checkpoint)
        bar.update()
        bar.set_postfix_str(f"writing {dst}")
        _save_new_folder(model, dst, pretrained_cfg)
        bar.update()
    _print_summary(model, conversion, dst)
    return 0


def _model_to_convert(args: argparse.Namespace) -> tuple[torch.nn.Module, Optional[dict[str, Any]]]:
    """The model the checkpoint is converted for, and pretrained_cfg entries for its config.json."""
    if args.arch:
        return create_model(args.arch, pretrained=False), None
    path = Path(args.upstream_config)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no upstream config file at {path}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), dict) or "codebase" not in spec:
        shape = '{"codebase": ..., "backbone": {...}} (and optionally "pretrained_cfg": {...})'
        raise ValueError(f"{path} must hold a JSON object {shape}")
    unknown = sorted(set(spec) - {"codebase", "backbone", "pretrained_cfg"})
    if unknown:
        raise ValueError(f"{path} has unknown entries: {', '.join(unknown)}")
    # every value is checked before the model is built
    channels = input_channels(model_kwargs(spec["backbone"], spec["codebase"]))
    check_pretrained_cfg(spec.get("pretrained_cfg", {}), str(path), channels)
    return load_upstream(spec["backbone"], spec["codebase"]), spec.get("pretrained_cfg")


def _save_new_folder(model: torch.nn.Module, dst: Path, pretrained_cfg: Optional[dict[str, Any]]) -> None:
    """Write into a staging folder beside ``dst`` and rename it: an error leaves no partial ``dst``, and
    a killed run's staging folder is removed by the next run (``vitadapter.staging``)."""
    with staging_folder(dst) as staging:
        save_pretrained(model, staging, pretrained_cfg)
        try:
            staging.rename(dst)
        except OSError as e:
            if dst.exists():  # another convert to the same destination finished first
                raise _exists(dst) from e
            raise


def _exists(dst: Path) -> ValueError:
    return ValueError(f"{dst} already exists: convert writes a new folder, pick another name or remove it")


def _print_summary(model: torch.nn.Module, conversion: Conversion, dst: Path) -> None:
    state, fresh = model.state_dict(), set(conversion.initialised)
    kept = [k for k in state if k not in fresh]
    params = sum(state[k].numel() for k in kept if state[k].is_floating_point())
    print(f"kept {len(kept)} tensors ({params:,} values) from the checkpoint")
    if conversion.initialised:
        print(f"initialised fresh (not in the checkpoint): {len(conversion.initialised)} adapter tensors")
    groups = Counter(key.split(".", 1)[0] for key in conversion.dropped)
    dropped = ", ".join(f"{group} ({n})" for group, n in sorted(groups.items())) or "nothing"
    print(f"dropped {len(conversion.dropped)} keys: {dropped}")
    print(f"wrote {dst}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per job."""
    parser = argparse.ArgumentParser(prog="vitadapter", description="ViT-Adapter feature pyramids on timm ViTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="print the registered model names")
    p.add_argument("pattern", nargs="?", default="", help="glob filter, e.g. '*_t'")
    p.add_argument("--pretrained", action="store_true", help="list arch.tag names that come with weights")
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
    p.add_argument("--pretrained", action="store_true",
                   help="load the model's weights (its default tag, or NAME.TAG / local-dir: / hf-hub:); may download")
    p.add_argument("--weights", metavar="FILE", help="load weights from a local file (.safetensors, upstream .pth/.zip)")
    p.set_defaults(run=_features)

    p = sub.add_parser("convert", help="turn an upstream checkpoint into a folder of config.json + model.safetensors")
    p.add_argument("src", help="upstream checkpoint (.pth, .pth.tar or release .zip)")
    p.add_argument("dst", help="folder to create; load it with create_model('local-dir:DST', pretrained=True)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="registered architecture (or arch.tag) the checkpoint belongs to")
    which.add_argument(
        "--upstream-config",
        metavar="FILE",
        help='JSON {"codebase": "segmentation"|"detection", "backbone": {upstream model.backbone}}',
    )
    p.set_defaults(run=_convert)
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

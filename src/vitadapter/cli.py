"""The ``vitadapter`` command: list and describe models, picture the feature pyramid of an image (or a
folder of them), segment images, measure a segmentor's mIoU, fine-tune a segmentor, convert
upstream checkpoints into Hub folders and export models to ONNX.

Only the commands that run models import torch, inside their functions: ``--help``, ``list``,
``describe`` and usage errors answer at once, from ``catalog.json``. Every error is one line on
stderr; ``--debug`` (or ``VITADAPTER_DEBUG=1``) shows its traceback instead.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.resources
import os
import sys
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import __version__, _json, catalog
from .weights.staging import check_destination, inputs_in_the_way, save_image, staging_folder

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .converters.backbone import Conversion

DEBUG_ENV = "VITADAPTER_DEBUG"
# Errors whose message says all a user needs (a bad file, name, option, no network); other types
# are bugs and say so.
_USER_ERRORS = (OSError, ValueError, TypeError, KeyError)
_BUNDLED = "chelsea.png"
_PICTURE = "vitadapter_features.png"
_PICTURE_FOLDER = "vitadapter_features"
_SEGMENT_FOLDER = "vitadapter_segment"
_DEFAULT_BACKBONE = "vit_adapter_t"
_DEFAULT_SEGMENTOR = "upernet_vit_adapter_t"


class UsageError(ValueError):
    """A command line that cannot work, found before any model is built."""


# ---- list and describe: from the catalog, without torch ---------------------------------------------


def _list(args: argparse.Namespace) -> int:
    entries = catalog.load()
    if not args.pretrained:
        names = [name for name in entries["architectures"] if fnmatch.fnmatchcase(name, args.pattern or "*")]
        if names:
            print("\n".join(names))
    else:
        # as timm's list_pretrained: a pattern without a tag also matches every tag of the names
        patterns = [args.pattern or "*"] + ([f"{args.pattern}.*"] if args.pattern and "." not in args.pattern else [])
        names = [name for name in entries["weights"] if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        defaults = {f"{arch}.{entry['default_tag']}" for arch, entry in entries["architectures"].items() if entry["default_tag"]}
        width = max(map(len, names), default=0)
        for name in names:
            marks = ("default" if name in defaults else "", "cached" if _cached_weights(entries["weights"][name]) else "")
            print(f"{name:<{width}}  {marks[0]:<7}  {marks[1]}".rstrip())
    if not names:
        command = "vitadapter list" + " --pretrained" * args.pretrained
        print(f"vitadapter: nothing matches {args.pattern!r}; `{command}` shows every name", file=sys.stderr)
        return 1
    return 0


def _describe(args: argparse.Namespace) -> int:
    if ":" in args.name:
        raise UsageError(f"describe {args.name}: describe takes a registered name, see `vitadapter list`")
    _check_model_name(args.name, "describe")
    entries = catalog.load()
    arch, _, tag = args.name.partition(".")
    entry = entries["architectures"][arch]
    if "requires" in entry:
        print(f"{args.name} is built from arguments, not a fixed configuration: {entry['requires']}")
        return 0
    name = f"{arch}.{tag or entry['default_tag']}"
    weights = entries["weights"][name]
    total, vit = entry["parameters"], entry["vit_parameters"]
    _, height, width = entry["input_size"]
    others = [n.partition(".")[2] for n in entries["weights"] if n.startswith(f"{arch}.") and n != name]
    print(args.name)
    if "num_classes" in entry:
        print(f"parameters:  {total:,} = {vit:,} ViT (model.backbone.vit) + adapter and heads; {entry['num_classes']} classes")
    else:
        print(f"parameters:  {total:,} = {vit:,} ViT (model.vit) + {total - vit:,} adapter")
    print(f"compute:     {entry['flops'] / 2e9:.1f} GMACs for one {width}x{height} image")
    print(f"input:       RGB in [0, 1], normalised with mean {_numbers(weights['mean'])} and std "
          f"{_numbers(weights['std'])}; default size {width}x{height}, any size >= 32x32 works")
    default = "  (the default tag)" if name == f"{arch}.{entry['default_tag']}" else ""
    print(f"weights:     {name}{default} from {_source(weights)}, {'cached' if _cached_weights(weights) else 'not cached yet'}")
    if others:
        print(f"other tags:  {', '.join(others)}")
    print("levels (backbone.feature_info):" if "num_classes" in entry else "levels (feature_info):")
    for i, level in enumerate(entry["levels"]):
        print(f"  level {i + 1}: {level['channels']} channels, reduction {level['stride']}")
    return 0


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _source(weights: dict[str, Any]) -> str:
    if weights["hf_hub_id"]:
        from huggingface_hub import constants  # its endpoint: HF_ENDPOINT or the Hub

        return f"{constants.ENDPOINT}/{weights['hf_hub_id']} ({weights['hf_hub_filename']})"
    return weights["url"]


def _cached_weights(weights: dict[str, Any]) -> Optional[str]:
    """Where the download cache already holds these weights, if it does (nothing is fetched)."""
    if weights["hf_hub_id"]:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = weights["hf_hub_id"].partition("@")
        found = try_to_load_from_cache(repo, weights["hf_hub_filename"], revision=revision or None)
        return found if isinstance(found, str) else None
    path = torch_hub_dir() / "checkpoints" / Path(urllib.parse.urlparse(weights["url"]).path).name
    return str(path) if path.is_file() else None


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` as a fresh process sees it, without importing torch."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


# ---- features -----------------------------------------------------------------------------------------


def _features(args: argparse.Namespace) -> int:
    images = _image_files(args.image)
    folder = args.image is not None and Path(args.image).is_dir()
    out = Path(args.out or (_PICTURE_FOLDER if folder else _PICTURE))
    if not folder:
        _check_picture_path(out)
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: for a folder of images this names a folder of pictures, and it is a file")
    targets = _picture_names(out, [Path(name) for name, _ in images]) if folder else [out]
    _refuse_replacing_inputs(targets, images, out)
    _check_model_name(args.model, "--model", kind="backbone")
    if args.weights is not None:
        _check_weights_file(args.weights, "--weights")
    device = _device(args.device)
    model, weights = _features_model(args, device)
    if not folder:
        picture, table = _picture(model, device, args, *images[0], weights)
        save_image(picture, out)
        print(table)
        print(f"wrote {out}")
        return 0

    from huggingface_hub.utils import tqdm

    out.mkdir(parents=True, exist_ok=True)
    # a bar on a terminal only: in a log its redraws would run into one line
    skipped = 0
    with tqdm(total=len(images), unit="image", desc="features", disable=None) as bar:
        for (name, source), target in zip(images, targets):
            try:
                save_image(_picture(model, device, args, name, source, weights)[0], target)
                bar.write(f"wrote {target}")
            except ValueError as e:  # an unreadable file is reported; the other images go on
                bar.write(f"vitadapter: skipped {_one_line(e)}", file=sys.stderr)
                skipped += 1
            bar.update()
    print(f"wrote {len(targets) - skipped} pictures into {out}")
    if skipped:
        print(f"vitadapter: {skipped} file(s) could not be read (listed above)", file=sys.stderr)
    return 1 if skipped else 0


def _refuse_replacing_inputs(outputs: list[Path], images: list[tuple[str, Any]], out: Path) -> None:
    """Refuse outputs that are input images of this run (the same file, by any path), before any work."""
    clashes = inputs_in_the_way(outputs, [source for _, source in images if isinstance(source, os.PathLike)])
    if clashes:
        shown = _few([str(output) if output == source else f"{output} (= {source})" for output, source in clashes])
        raise UsageError(f"--out {out}: the outputs would replace {len(clashes)} input image(s) of this run: {shown}; "
                         "pick another --out")


def _picture_names(folder: Path, images: list[Path]) -> list[Path]:
    """cat.jpg -> FOLDER/cat.png; where two images share a stem, every picture keeps the suffix too."""
    return [folder / f"{stem}.png" for stem in _output_stems(images)]


def _output_stems(images: list[Path]) -> list[str]:
    """The stems of the images' file names, or where two share one, every full name (unique in a folder)."""
    stems = [p.stem for p in images]
    return stems if len(set(stems)) == len(stems) else [p.name for p in images]


def _image_files(path: Optional[str]) -> list[tuple[str, Any]]:
    """(name to show, file) of the bundled cat, one image file or each image in a folder."""
    if path is None:
        return [(f"{_BUNDLED} (bundled)", importlib.resources.files("vitadapter") / "assets" / _BUNDLED)]
    _set_pixel_limit()
    source = Path(path)
    if source.is_dir():
        from PIL import Image

        Image.init()
        # a dangling link or a link loop is listed: reading it names the file as unreadable
        found = sorted(p for p in source.iterdir() if _file_or_link(p) and Image.EXTENSION.get(p.suffix.lower()) in Image.OPEN)
        if not found:
            raise UsageError(f"{path} holds no image files Pillow can read")
        return [(str(p), p) for p in found]
    if not source.is_file():
        raise UsageError(f"no image file or folder at {path!r}")
    return [(path, source)]


def _file_or_link(path: Path) -> bool:
    return path.is_file() or path.is_symlink()


def _set_pixel_limit() -> None:
    """Pillow's guard against decompression bombs, raised by ``$VITADAPTER_MAX_IMAGE_PIXELS``."""
    from .data.images import MAX_PIXELS_ENV

    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{MAX_PIXELS_ENV}={text}: expected a positive number of pixels")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = int(text)


def _check_picture_path(path: Path) -> None:
    from PIL import Image

    Image.init()
    if Image.EXTENSION.get(path.suffix.lower()) not in Image.SAVE:
        kind = f"'{path.suffix}' files" if path.suffix else "a file name without an extension"
        raise UsageError(f"--out {path}: Pillow cannot write {kind}; name a .png (or .jpg, .webp) file")
    check_destination(path, "--out")


def _device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown name, or a device this torch cannot use
        raise UsageError(f"--device {name}: {_one_line(e)}; try --device cpu") from e
    if device.type == "meta":
        raise UsageError(f"--device {name}: the meta device holds shapes, not values, so nothing can run on it; try --device cpu")
    return device


def _features_model(args: argparse.Namespace, device: "torch.device") -> tuple["torch.nn.Module", Optional[str]]:
    """The model on ``device`` in eval mode, and where its weights came from (None: random)."""
    import torch

    from . import create_model

    torch.manual_seed(args.seed)
    if args.weights is not None:
        model = create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.weights))
        return model.eval().to(device), args.weights
    if not args.pretrained:
        return create_model(args.model).eval().to(device), None
    model, weights = _pretrained_model(args.model)
    return model.eval().to(device), weights


def _pretrained_model(name: str) -> tuple["torch.nn.Module", str]:
    """``create_model(name, pretrained=True)``, saying on stderr when it downloads, and where the weights
    came from. Weights that cannot be had raise an ``OSError`` that says how to get them."""
    from . import create_model

    download = _download_to_come(name)
    if download is None:
        model = create_model(name, pretrained=True)
    else:
        tag, source = download
        from huggingface_hub import constants
        from huggingface_hub.utils import logging

        advice = f"download {source} on a machine with network access and pass the file with --weights FILE"
        if constants.HF_HUB_OFFLINE:
            raise OSError(f"the weights of {tag} are not cached and HF_HUB_OFFLINE is set: {advice}")
        print(f"fetching the weights of {tag} from {source}", file=sys.stderr)
        logging.set_verbosity_error()  # its retry notices; a failure ends in the one line below
        try:
            model = create_model(name, pretrained=True)
        except OSError as e:
            raise OSError(f"cannot fetch the weights of {tag} ({_one_line(_root_cause(e))}): {advice}") from e
    cfg = model.pretrained_cfg
    tag_name = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag"))))
    return model, f"{tag_name or name} from {cfg.get('hf_hub_id') or cfg.get('url') or name}"


def _download_to_come(model: str) -> Optional[tuple[str, str]]:
    """(arch.tag, source) when ``model`` names registered weights that are not in the cache yet."""
    entries = catalog.load()
    arch, _, tag = model.partition(".")
    default = entries["architectures"].get(arch, {}).get("default_tag")
    if default is None:
        return None
    name = f"{arch}.{tag or default}"
    weights = entries["weights"].get(name)
    if weights is None or _cached_weights(weights):
        return None
    return name, _source(weights)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _picture(
    model: "torch.nn.Module", device: "torch.device", args: argparse.Namespace, name: str, source: Any, weights: Optional[str]
) -> tuple["Image.Image", str]:
    """The pyramid picture of one image and the table of its level shapes."""
    import numpy as np
    import torch
    from PIL import Image

    from .visualize import pyramid_picture

    cfg = model.pretrained_cfg
    original = _read_image(name, source)
    size = cfg["input_size"][-1] if args.size is None else args.size
    width, height = original.size if size == "original" else _short_side_size(original.size, size)
    if width * height > _MAX_FEATURE_PIXELS:
        shown = "kept at its size" if size == "original" else f"resized to short side {size}"
        raise ValueError(f"{name} is {original.width}x{original.height}: {shown} it is {width}x{height}, over the "
                         f"{_MAX_FEATURE_PIXELS:,} pixels features runs a model on; crop it, or pass a smaller --size")
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
        f"weights: {weights or _RANDOM.format(seed=args.seed)}",
        f"input: {name}, {image.width}x{image.height} (W x H){from_size}",
        "level  stride     C     H     W",
    ]
    for i, (stride, level) in enumerate(zip(strides, levels)):
        c, h, w = level.shape
        rows.append(f"{i + 1:>5}  {stride:>6}  {c:>4}  {h:>4}  {w:>4}")
    return picture, "\n".join(rows)


_RANDOM = (
    "random initialisation (seed {seed}) - no pretrained weights are loaded; "
    "the picture shows the structure of the pyramid, not learned features"
)


def _read_image(name: str, source: Any) -> "Image.Image":
    """An upright 8-bit RGB image from any file Pillow reads; ``ValueError`` naming it otherwise."""
    from .data.images import read_rgb

    try:
        with source.open("rb") as f:
            return read_rgb(f, name)
    except OSError as e:  # the file itself cannot be opened
        raise ValueError(f"cannot read image {name}: {_one_line(e)}") from e


def _short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    w, h = size
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


# the largest model input of `features` (4096 x 4096): a long strip resized to a short side of 512
# would otherwise become a picture of millions of pixels a side
_MAX_FEATURE_PIXELS = 1 << 24


# ---- segment and eval-seg -----------------------------------------------------------------------------


def _segment(args: argparse.Namespace) -> int:
    images = _image_files(args.image)
    out = Path(args.out or _SEGMENT_FOLDER)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: names the folder for the label maps and overlays, and it is a file")
    _check_segmentor_options(args)
    folder = args.image is not None and Path(args.image).is_dir()
    if folder:
        listed = {path for _, path in images}
        others = sorted(p.name for p in Path(args.image).iterdir() if _file_or_link(p) and p not in listed and not p.name.startswith("."))
        if others:
            print(f"vitadapter: left out {len(others)} file(s) without an image extension: {_few(others)}", file=sys.stderr)
    else:  # one image: one that cannot be read is the error, before any model is built
        _read_image(*images[0])
    stems = _output_stems([Path(name) for name, _ in images])
    _refuse_replacing_inputs([out / f"{stem}.{kind}.png" for stem in stems for kind in ("label", "overlay")], images, out)
    device = _device(args.device)
    model, weights = _segmentor_model(args, device, fall_back=True)

    from huggingface_hub.utils import tqdm

    from .visualize import class_palette, label_image, segmentation_overlay

    names = _class_names(model)
    palette = class_palette(model.num_classes, model.class_names)
    alert = "" if weights else "RANDOM WEIGHTS: untrained model, the labels mean nothing"
    ratios, flip = _test_passes(args.aug)
    out.mkdir(parents=True, exist_ok=True)
    skipped = 0
    with tqdm(total=len(images), unit="image", desc="segment", disable=None) as bar:
        for (name, source), stem in zip(images, stems):
            try:
                image = _read_image(name, source)
            except ValueError as e:  # reported; the other images go on
                bar.write(f"vitadapter: skipped {_one_line(e)}", file=sys.stderr)
                skipped += 1
                bar.update()
                continue
            labels = _predict(model, image, args, ratios, flip, device).numpy()
            label_path, overlay_path = out / f"{stem}.label.png", out / f"{stem}.overlay.png"
            save_image(label_image(labels, palette), label_path)
            save_image(segmentation_overlay(image, labels, palette, names, alert=alert), overlay_path)
            bar.write(f"wrote {label_path} and {overlay_path}")
            bar.update()
    done = len(images) - skipped
    print(f"segmented {done} of {len(images)} image(s) into {out} ({_weights_line(weights)})")
    if skipped:
        print(f"vitadapter: {skipped} file(s) could not be read (listed above)", file=sys.stderr)
    return 1 if skipped else 0


def _eval_seg(args: argparse.Namespace) -> int:
    _check_segmentor_options(args)
    root = Path(args.data)
    if not root.is_dir():
        raise UsageError(f"no folder at {args.data!r}: expected a dataset folder with images/ and annotations/")
    split = args.split
    if split is None and (root / "images" / "validation").is_dir():  # ADEChallengeData2016's layout
        split = "validation"
    from .data.folder import SegmentationFolder

    dataset = SegmentationFolder(root, split, reduce_zero_label=args.reduce_zero_label)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    device = _device(args.device)
    model, weights = _segmentor_model(args, device, fall_back=False)

    from huggingface_hub.utils import tqdm

    from .metrics import SegmentationMetric

    ratios, flip = _test_passes(args.aug)
    metric = SegmentationMetric(model.num_classes)
    with tqdm(total=count, unit="image", desc="eval-seg", disable=None) as bar:
        for index in range(count):
            item = dataset[index]
            metric.update(_predict(model, item["image"], args, ratios, flip, device).numpy(), item["label"])
            bar.update()
    scores = metric.compute()

    images = root / "images" / (split or "")
    passes = f"multi-scale {', '.join(map(str, ratios))} + flip" if args.aug else "single scale"
    print(f"model:   {args.model} ({_weights_line(weights)})")
    print(f"data:    {count} of {len(dataset)} images in {images}, {passes}, short side {_scale_text(model, args)}")
    names = _class_names(model)
    width = max(len("class"), *map(len, names))
    print(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for name, iou, acc in zip(names, scores.iou, scores.acc):
        print(f"{name:<{width}}  {_percent(iou)}  {_percent(acc)}")
    print(f"aAcc {_percent(scores.aacc).strip()}  mIoU {_percent(scores.miou).strip()}  mAcc {_percent(scores.macc).strip()}")
    return 0


def _check_segmentor_options(args: argparse.Namespace) -> None:
    """``--model`` and ``--weights`` of segment and eval-seg, checked before torch loads. A folder of
    weights (``save_pretrained``, ``vitadapter convert``) brings its own model: ``--model`` becomes
    ``local-dir:FOLDER``."""
    if args.weights is not None and Path(args.weights).is_dir():
        folder = Path(args.weights)
        if not (folder / "config.json").is_file():
            raise UsageError(f"--weights {folder}: a folder of weights holds config.json and model.safetensors "
                             "(written by vitadapter.save_pretrained or vitadapter convert); this one has no config.json")
        if args.model is not None:
            raise UsageError(f"--weights {folder} holds its own model (config.json): leave out --model {args.model}")
        args.model = f"local-dir:{folder}"
        return
    args.model = args.model or _DEFAULT_SEGMENTOR
    _check_model_name(args.model, "--model", kind="segmentor")
    if args.weights is not None:
        _check_weights_file(args.weights, "--weights")


def _segmentor_model(args: argparse.Namespace, device: "torch.device", fall_back: bool) -> tuple["torch.nn.Module", Optional[str]]:
    """The segmentor on ``device`` in eval mode and where its weights came from: ``--weights FOLDER``
    (the folder's model), ``--weights FILE`` (built for the file's class count), else the name's
    weights; with ``fall_back``, weights that cannot be had are reported in one line and the model
    runs on random weights (None)."""
    import torch

    from . import create_model

    if args.weights is not None and Path(args.weights).is_dir():
        model = create_model(args.model, pretrained=True)
        _check_segmentor(model, args.model)
        weights: Optional[str] = args.weights
    elif args.weights is not None:
        from .converters.mmseg import checkpoint_num_classes
        from .models.checkpoints import load_segmentor_checkpoint
        from .weights.read import read_weights

        checkpoint = read_weights(args.weights)
        classes = checkpoint_num_classes(checkpoint)
        model = create_model(args.model, **({} if classes is None else {"num_classes": classes}))
        _check_segmentor(model, args.model)
        load_segmentor_checkpoint(model, checkpoint)
        weights = args.weights
    else:
        try:
            model, weights = _pretrained_model(args.model)
        except OSError as e:
            if not fall_back:
                raise
            print(f"vitadapter: {_one_line(e)}; running on random weights instead", file=sys.stderr)
            torch.manual_seed(0)
            model, weights = create_model(args.model), None
        _check_segmentor(model, args.model)
    return model.eval().to(device), weights


def _check_segmentor(model: "torch.nn.Module", name: str) -> None:
    """A ``local-dir:`` or ``hf-hub:`` name can hold any model: refuse one without classes."""
    if not isinstance(getattr(model, "num_classes", None), int) or not hasattr(model, "class_names"):
        raise UsageError(f"--model {name} is not a segmentor (image -> class labels); `vitadapter features` takes backbones")


def _predict(model: "torch.nn.Module", image: "Image.Image", args: argparse.Namespace, ratios: Any, flip: bool, device: "torch.device") -> "torch.Tensor":
    from .predict import predict

    scale = None if args.size == "original" else (args.size or 0)
    return predict(model, image, scale, ratios, flip, device)


def _test_passes(aug: bool) -> tuple[tuple[float, ...], bool]:
    from .predict import MS_RATIOS

    return (MS_RATIOS, True) if aug else ((1.0,), False)


def _class_names(model: "torch.nn.Module") -> list[str]:
    return list(model.class_names) if model.class_names is not None else [f"class {k}" for k in range(model.num_classes)]


def _scale_text(model: "torch.nn.Module", args: argparse.Namespace) -> str:
    from .predict import default_scale

    if args.size == "original":
        return "as stored"
    short, long = (args.size, 4 * args.size) if args.size else default_scale(model)
    return f"<= {short}, long side <= {long}" + ("" if args.size else " (the model's; --size changes it)")


def _weights_line(weights: Optional[str]) -> str:
    return f"weights: {weights}" if weights else "random weights: the labels mean nothing"


def _percent(value: float) -> str:
    return f"{100 * value:6.2f}" if value == value else "   nan"


def _few(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ---- convert ------------------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    _check_weights_file(args.src, "convert")
    if args.arch:
        _check_model_name(args.arch, "--arch")
    elif args.model_kwargs is not None:
        raise UsageError("--model-kwargs goes with --arch: an --upstream-config file holds the whole configuration")
    model_kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    dst = Path(args.dst)
    if dst.exists():
        raise _exists(dst)
    if args.arch and _is_segmentor(args.arch):
        return _convert_segmentor(args.src, args.arch, model_kwargs, dst)
    from .weights.read import read_weights
    from .models.checkpoints import load_checkpoint

    model, pretrained_cfg = _model_to_convert(args, model_kwargs)
    # One line per step on stderr: readable in a terminal and in a log file alike.
    _step(1, f"reading {args.src}")
    checkpoint = read_weights(args.src)
    _step(2, "converting keys")
    conversion = load_checkpoint(model, checkpoint)
    _step(3, f"writing {dst}")
    _save_new_folder(model, dst, pretrained_cfg)
    _print_summary(model, conversion, dst)
    return 0


def _convert_segmentor(src: str, arch: str, model_kwargs: dict[str, Any], dst: Path) -> int:
    """A whole segmentation checkpoint (backbone.*, decode_head.*, auxiliary_head.*) into the folder of
    registered segmentor ``arch``, built for the checkpoint's class count and loaded strictly."""
    from . import create_model
    from .converters.mmseg import checkpoint_num_classes
    from .models.checkpoints import load_segmentor_checkpoint
    from .weights.read import read_weights
    from .converters.backbone import Conversion

    _step(1, f"reading {src}")
    checkpoint = read_weights(src)
    classes = checkpoint_num_classes(checkpoint)
    model = create_model(arch, **dict({} if classes is None else {"num_classes": classes}, **model_kwargs))
    _step(2, "converting keys")
    dropped = load_segmentor_checkpoint(model, checkpoint)
    _step(3, f"writing {dst}")
    _save_new_folder(model, dst, None)
    _print_summary(model, Conversion(model.state_dict(), dropped, []), dst)
    return 0


def _is_segmentor(name: str) -> bool:
    """Whether a registered ``name`` (or ``name.tag``) gives class logits (from the catalog, without torch)."""
    return "num_classes" in catalog.load()["architectures"][name.partition(".")[0]]


def _check_model_name(name: str, option: str, kind: Optional[str] = None) -> None:
    """Refuse an unknown architecture or tag from the catalog, or one of another ``kind`` ("backbone":
    image -> pyramid, "segmentor": image -> class logits), before torch loads (seconds)."""
    if ":" in name:  # local-dir: and hf-hub: folders are read when the model is built
        return
    entries = catalog.load()
    arch, _, tag = name.partition(".")
    if arch not in entries["architectures"]:
        raise UsageError(f"{option} {name}: unknown model; `vitadapter list` shows the architectures")
    if tag and name not in entries["weights"]:
        tags = ", ".join(n.partition(".")[2] for n in entries["weights"] if n.startswith(f"{arch}."))
        raise UsageError(f"{option} {name}: {arch} has no tag {tag!r}; it has: {tags or 'none'}")
    segmentor = _is_segmentor(name)
    if kind == "backbone" and segmentor:
        raise UsageError(f"{option} {name} is a segmentor (it gives class labels, not a feature pyramid): "
                         f"`vitadapter segment --model {name}` runs it; features takes a backbone such as {_DEFAULT_BACKBONE}")
    if kind == "segmentor" and not segmentor:
        raise UsageError(f"{option} {name} is a backbone (a feature pyramid, no classes): `vitadapter features --model {name}` "
                         f"pictures it; segmentors are the upernet_* and mask2former_* models (`vitadapter list '*former*'`, "
                         f"`vitadapter list 'upernet*'`), "
                         f"e.g. {_DEFAULT_SEGMENTOR}")


def _check_weights_file(path: str, option: str) -> None:
    """Refuse a missing file, or one that cannot be a checkpoint, before any work (the readers would
    fail later, on a mere pickle opcode)."""
    if not Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    with open(path, "rb") as f:
        start = f.read(9)
    # a zip (torch.save, an upstream release), a pickle (legacy torch.save), or safetensors (an
    # 8-byte header length, then its JSON)
    if not (start.startswith(b"PK") or start.startswith(b"\x80") or start[8:] == b"{"):
        raise UsageError(
            f"{option} {path} is not a checkpoint: expected a torch.save file (.pth, .pth.tar), an upstream "
            "release .zip or a .safetensors file"
        )


def _step(n: int, what: str) -> None:
    print(f"convert [{n}/3] {what}", file=sys.stderr, flush=True)


def _model_to_convert(
    args: argparse.Namespace, arch_kwargs: dict[str, Any]
) -> tuple["torch.nn.Module", Optional[dict[str, Any]]]:
    """The backbone the checkpoint is converted for, and pretrained_cfg entries for its config.json."""
    from . import create_model, load_upstream
    from .models.config_checks import check_pretrained_cfg, input_channels
    from .models.from_upstream import model_kwargs

    if args.arch:
        return create_model(args.arch, pretrained=False, **arch_kwargs), None
    path = Path(args.upstream_config)
    try:
        spec = _json.loads(path.read_text(), f"--upstream-config {path}")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--upstream-config {path}: no such file") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--upstream-config {path} is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), dict) or "codebase" not in spec:
        shape = '{"codebase": ..., "backbone": {...}} (and optionally "pretrained_cfg": {...})'
        raise ValueError(f"--upstream-config {path} must hold a JSON object {shape}")
    unknown = sorted(set(spec) - {"codebase", "backbone", "pretrained_cfg"})
    if unknown:
        raise ValueError(f"--upstream-config {path} has unknown entries: {', '.join(unknown)}")
    # every value is checked before the model is built
    channels = input_channels(model_kwargs(spec["backbone"], spec["codebase"]))
    check_pretrained_cfg(spec.get("pretrained_cfg", {}), f"--upstream-config {path}", channels)
    return load_upstream(spec["backbone"], spec["codebase"]), spec.get("pretrained_cfg")


def _save_new_folder(model: "torch.nn.Module", dst: Path, pretrained_cfg: Optional[dict[str, Any]]) -> None:
    """Write into a staging folder beside ``dst`` and rename it: an error leaves no partial ``dst``, and
    a killed run's staging folder is removed by the next run (``vitadapter.weights.staging``)."""
    from .hub import save_pretrained

    with staging_folder(dst) as staging:
        save_pretrained(model, staging, pretrained_cfg)
        try:
            staging.rename(dst)
        except OSError as e:
            if dst.exists():  # another convert to the same destination finished first
                raise _exists(dst) from e
            raise


def _exists(dst: Path) -> ValueError:
    return UsageError(f"{dst} already exists: convert writes a new folder, pick another name or remove it")


def _print_summary(model: "torch.nn.Module", conversion: "Conversion", dst: Path) -> None:
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


# ---- train-seg ----------------------------------------------------------------------------------------


def _train_seg(args: argparse.Namespace) -> int:
    _check_segmentor_name(args.model)
    if "." in args.model and (args.weights is not None or args.random_init):
        option = "--weights" if args.weights is not None else "--random-init"
        raise UsageError(f"--model {args.model} starts from that release; {option} needs the bare name {args.model.partition('.')[0]}")
    if args.weights is not None:
        _check_weights_file(args.weights, "--weights")
    for option, value, valid, expected in (
        ("--lr", args.lr, lambda v: v > 0, "a positive learning rate"),
        ("--weight-decay", args.weight_decay, lambda v: v >= 0, "a weight decay >= 0"),
        ("--layer-decay", args.layer_decay, lambda v: 0 < v <= 1, "a rate in (0, 1]"),
        ("--warmup-iters", args.warmup_iters, lambda v: v >= 0, "a count >= 0"),
        ("--workers", args.workers, lambda v: v >= 0, "a count >= 0"),
    ):
        if value is not None and not valid(value):
            raise UsageError(f"{option} {value}: expected {expected}")
    model_kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: it names the run's folder")
    if args.resume and not (out / "last.pth").is_file():
        raise UsageError(f"--resume: no last.pth in {out} to continue from")
    if not args.resume and (out / "last.pth").exists():
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or pick another folder")
    if not Path(args.data_dir).is_dir():
        raise UsageError(f"{args.data_dir}: no such folder (expected images/ and annotations/ inside)")
    from .data.folder import SegmentationFolder

    # lists the files and pairs images with labels: a wrong layout is reported before torch loads
    SegmentationFolder(args.data_dir, args.split, reduce_zero_label=not args.no_reduce_zero_label)
    if args.device != "auto":
        _device(args.device)  # a name torch knows, usable here
    from .train import TrainOptions, train_segmentation

    options = TrainOptions(
        data_dir=args.data_dir, model=args.model, out=args.out, split=args.split, num_classes=args.num_classes,
        reduce_zero_label=not args.no_reduce_zero_label, model_kwargs=model_kwargs, weights=args.weights,
        pretrained_backbone=not args.random_init, crop_size=args.crop, batch_size=args.batch_size, iters=args.iters,
        warmup_iters=args.warmup_iters, lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
        grad_checkpointing=args.grad_checkpointing, fp32=args.fp32, workers=args.workers, seed=args.seed,
        save_every=args.save_every, log_every=args.log_every, resume=args.resume, device=args.device,
    )
    train_segmentation(options)
    return 0


def _check_segmentor_name(name: str) -> None:
    if ":" in name:
        raise UsageError(f"--model {name}: train-seg takes a registered segmentor name (see `vitadapter list 'upernet*'`)")
    _check_model_name(name, "--model")
    architectures = catalog.load()["architectures"]
    if "num_classes" not in architectures[name.partition(".")[0]]:
        segmentors = [a for a, entry in architectures.items() if "num_classes" in entry]
        raise UsageError(f"--model {name} is a backbone; train-seg trains a segmentor: {', '.join(segmentors)}")


def _json_object(text: Optional[str], option: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = _json.loads(text, option)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not isinstance(value, dict):
        raise UsageError(f"{option}: expected a JSON object such as '{{\"drop_path_rate\": 0.2}}'")
    return value


# ---- export-onnx ----------------------------------------------------------------------------------------


def _export_onnx(args: argparse.Namespace) -> int:
    _check_model_name(args.model, "export-onnx")
    if args.weights is not None:
        _check_weights_file(args.weights, "--weights")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"export-onnx {out}: name a .onnx file")
    check_destination(out, "export-onnx")
    if args.size is not None and min(args.size) < _MIN_ONNX_SIZE:
        raise UsageError(f"--size {args.size[0]} {args.size[1]}: height and width must be at least {_MIN_ONNX_SIZE}")
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise UsageError("export-onnx needs the onnx and onnxscript packages: pip install 'vitadapter[onnx]'") from e
    import torch

    from .integrations.onnx import export_onnx

    model, weights = _features_model(args, torch.device("cpu"))
    path = export_onnx(model, out, size=args.size, dynamic=not args.static)
    height, width = args.size or tuple(model.pretrained_cfg.get("input_size", (3, 512, 512)))[-2:]
    sizes = f"batch 1 x {height} x {width} only" if args.static else f"any batch, height and width (at least {_MIN_ONNX_SIZE})"
    print(f"model: {args.model}, weights: {weights or 'random initialisation (no pretrained weights)'}")
    print(f"wrote {path}: input 'image', outputs 'stride4' ... 'stride32'; takes {sizes}")
    return 0


_MIN_ONNX_SIZE = 32


# ---- push ---------------------------------------------------------------------------------------------


def _push(args: argparse.Namespace) -> int:
    from . import hub

    folder = Path(args.folder)
    files = hub.check_upload(folder)
    print(f"uploading to {args.repo}:")
    for name, size in files:
        print(f"  {folder / name} ({size:,} bytes)")
    others = sorted(p.name for p in folder.iterdir() if p.name not in hub.UPLOADED)
    if others:
        print(f"  not uploaded (not part of the format): {', '.join(others)}")
    url = hub.push_to_hub(folder, args.repo, private=True if args.private else None)
    print(f"committed {url}")
    return 0


# ---- the parser and the entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per job."""
    parser = argparse.ArgumentParser(prog="vitadapter", description="ViT-Adapter feature pyramids and segmentation on timm ViTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "list", "print the registered model names, or with --pretrained the weight tags")
    p.add_argument("pattern", nargs="?", default="", help="glob filter, e.g. 'vit_adapter_b*'")
    p.add_argument("--pretrained", action="store_true",
                   help="list arch.tag names that come with weights, marking each architecture's default and what is cached")
    p.set_defaults(run=_list)

    p = _subcommand(sub, "describe", "parameters, compute, preprocessing and weights of a model")
    p.add_argument("name", help="model name or name.tag, see `vitadapter list`")
    p.set_defaults(run=_describe)

    p = _subcommand(sub, "features", "run a model on an image (or a folder of images) and picture its feature pyramid")
    p.add_argument("image", nargs="?", help="image file or folder of images (default: the bundled chelsea.png)")
    p.add_argument("--model", default=_DEFAULT_BACKBONE, help="model name (default: %(default)s)")
    p.add_argument("--out", metavar="PATH",
                   help=f"picture to write (default: {_PICTURE}), or for a folder the folder of pictures (default: {_PICTURE_FOLDER}/)")
    p.add_argument("--size", type=_size, metavar="N|original",
                   help="resize so the short side is N px, or keep the original size (default: the model's input size, 512)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="load the model's weights (its default tag, or NAME.TAG / local-dir: / hf-hub:); may download")
    weights.add_argument("--weights", metavar="FILE", help="load weights from a local file (.safetensors, upstream .pth/.zip)")
    p.set_defaults(run=_features)

    p = _subcommand(sub, "segment", "label every pixel of an image (or a folder of images) with a segmentor: label map and overlay PNGs")
    p.add_argument("image", nargs="?", help="image file or folder of images (default: the bundled chelsea.png)")
    _add_segmentor_options(p)
    p.add_argument("--out", metavar="FOLDER", help=f"folder for NAME.label.png and NAME.overlay.png (default: {_SEGMENT_FOLDER}/)")
    p.set_defaults(run=_segment)

    p = _subcommand(sub, "eval-seg", "mIoU of a segmentor on a dataset folder in ADE20K's layout (images/, annotations/)")
    p.add_argument("data", metavar="DATA_DIR", help="folder holding images/ and annotations/ (e.g. ADEChallengeData2016)")
    _add_segmentor_options(p)
    p.add_argument("--split", help="subfolder of images/ and annotations/ (default: validation where it exists, else none)")
    p.add_argument("--limit", type=_positive, metavar="N", help="evaluate the first N images only")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=True,
                   help="label 0 is 'other' (ignored) and k is class k-1, as in ADE20K (default: on)")
    p.set_defaults(run=_eval_seg)

    p = _subcommand(sub, "convert", "turn an upstream checkpoint into a folder of config.json + model.safetensors")
    p.add_argument("src", help="upstream checkpoint (.pth, .pth.tar or release .zip)")
    p.add_argument("dst", help="folder to create; load it with create_model('local-dir:DST', pretrained=True)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="registered architecture (or arch.tag) the checkpoint belongs to: a backbone "
                                      "(task heads dropped) or a segmentor (upernet_*, mask2former_*: the whole model)")
    which.add_argument(
        "--upstream-config",
        metavar="FILE",
        help='JSON {"codebase": "segmentation"|"detection", "backbone": {upstream model.backbone}}',
    )
    p.add_argument("--model-kwargs", metavar="JSON",
                   help='with --arch: other create_model arguments, e.g. \'{"head_channels": 256}\' (a segmentor\'s '
                        'class count comes from the checkpoint)')
    p.set_defaults(run=_convert)

    p = _subcommand(sub, "train-seg", "fine-tune a segmentor on a folder of images and label PNGs (upstream's recipe)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder with images/ and annotations/ (ADE20K's layout)")
    p.add_argument("--model", required=True, help="segmentor, e.g. upernet_vit_adapter_b (or NAME.TAG to start from that release)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for last.pth (resumable), model.pth and log.jsonl")
    p.add_argument("--split", default="training", help="subfolder of images/ and annotations/ (default: %(default)s; '' for none)")
    p.add_argument("--num-classes", type=_positive, default=150, help="classes to predict (default: %(default)s)")
    p.add_argument("--no-reduce-zero-label", action="store_true",
                   help="keep label 0 as a class (default: ADE20K's convention, 0 = ignore and k -> k-1)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", metavar="FILE", help="start from a whole segmentor checkpoint (a fresh classifier if the classes differ)")
    start.add_argument("--random-init", action="store_true", help="random weights (default: the backbone's ImageNet trunk; downloads once)")
    p.add_argument("--model-kwargs", metavar="JSON", help='extra create_model arguments, e.g. \'{"drop_path_rate": 0.2}\'')
    p.add_argument("--crop", type=_positive, help="square crop size (default: the model's input size, 512 or 640)")
    p.add_argument("--batch-size", type=_positive, default=2, help="images per process and step (default: %(default)s)")
    p.add_argument("--iters", type=_positive, default=160_000, help="iterations (default: %(default)s)")
    p.add_argument("--warmup-iters", type=int, default=1500, help="linear warm-up iterations (default: %(default)s)")
    p.add_argument("--lr", type=float, help="base learning rate (default: upstream's for the model)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: upstream's for the model)")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay rate (default: upstream's for the model)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (the CPU always trains in fp32)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per training process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentation (default: %(default)s)")
    p.add_argument("--save-every", type=_positive, default=1000, help="write last.pth every N iterations (default: %(default)s)")
    p.add_argument("--log-every", type=_positive, default=50, help="print the mean losses every N iterations (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pth")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available; torchrun: each process's GPU)")
    p.set_defaults(run=_train_seg)

    p = _subcommand(sub, "push", "upload a folder of config.json + model.safetensors (convert, save_pretrained) to a Hub model repo")
    p.add_argument("folder", help="the folder; only its config.json and model.safetensors are uploaded, once checked to load")
    p.add_argument("repo", help="Hub model repo, org/name (created if needed; the token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.set_defaults(run=_push)

    p = _subcommand(sub, "export-onnx", "write a model as an ONNX file (dynamic batch, height and width)")
    p.add_argument("model", help="model name (or name.tag, local-dir:, hf-hub:), see `vitadapter list`")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--size", type=_side, nargs=2, metavar=("H", "W"),
                   help="example image size to trace (default: the model's input size); with --static the only size")
    p.add_argument("--static", action="store_true", help="fix batch 1 and --size instead of dynamic sizes")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="export the model's weights (may download)")
    weights.add_argument("--weights", metavar="FILE", help="load weights from a local file (.safetensors, upstream .pth/.zip)")
    p.set_defaults(run=_export_onnx, seed=0)
    return parser


def _add_segmentor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model",
                   help=f"segmentor name or name.tag; its weights load (downloading once) unless --weights (default: {_DEFAULT_SEGMENTOR})")
    p.add_argument("--weights", metavar="FILE|FOLDER",
                   help="whole segmentor checkpoint (upstream .pth/.pth.tar/.zip or .safetensors), or a folder of "
                        "config.json + model.safetensors (save_pretrained, convert), which brings its own model")
    p.add_argument("--size", type=_size, metavar="N|original",
                   help="test scale: short side <= N and long side <= 4N (default: the model's own test scale, e.g. 512 and 2048)")
    p.add_argument("--aug", action="store_true", help="multi-scale (0.5 to 1.75) and flip testing, upstream's 'MS' (12 passes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def _subcommand(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before the subcommand
    _add_debug(p, default=argparse.SUPPRESS)
    return p


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")


def _size(text: str) -> Any:
    """argparse type for --size, so a bad value is reported as a usage error before any work."""
    if text == "original":
        return text
    value = _positive(text, alternative=" or 'original'")
    if value > _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a side of at most {_MAX_SIZE} px, got {text!r}")
    return value


# the largest --size: 16 x upstream's 512-px scale
_MAX_SIZE = 8192


def _side(text: str) -> int:
    """argparse type for export-onnx's --size H W."""
    value = _positive(text)
    if value > _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a side of at most {_MAX_SIZE} px, got {text!r}")
    return value


def _positive(text: str, alternative: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer{alternative}, got {text!r}")
    return value


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vitadapter`` script; returns the exit code (2 on an error)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader of stdout left (`vitadapter list | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("vitadapter: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, _USER_ERRORS):
            print(f"vitadapter: error: {_one_line(err)}", file=sys.stderr)
        else:
            print(f"vitadapter: error: {type(err).__name__}: {_one_line(err)} "
                  f"(a bug: --debug shows the traceback to report)", file=sys.stderr)
        return 2

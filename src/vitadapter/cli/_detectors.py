"""What detect and eval-det share: their model options, the detector those options build (at the test
scale asked for), and COCO's category ids of its labels."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ._common import DEFAULT_DETECTOR, UsageError, check_task_model_options, positive_int
from ._models import released_or_random

if TYPE_CHECKING:
    import torch

# upstream's COCO test scale: long side at most 1333, short side at most 800
_LONG, _SHORT = 1333, 800


def add_detector_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model",
                   help=f"detector name or name.tag; its weights load (downloading once) unless --weights (default: {DEFAULT_DETECTOR})")
    p.add_argument("--weights", metavar="FILE|FOLDER",
                   help="whole detector checkpoint (upstream .pth/.pth.tar or .safetensors), or a folder of "
                        "config.json + model.safetensors (save_pretrained, convert), which brings its own model")
    p.add_argument("--size", type=size_option, metavar="N",
                   help=f"test scale: short side <= N, long side in the model's own ratio (default: the model's own, "
                        f"upstream's: {_LONG} x {_SHORT} for Mask R-CNN, 1600 x 1400 for HTC++); smaller is faster and "
                        "finds fewer small objects")
    p.add_argument("--aug", action="store_true",
                   help="upstream's multi-scale flip test (HTC++ detectors: its _ms configs, 6 scales x 2 flips, "
                        "12 passes per image): slower, higher AP")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def size_option(text: str) -> int:
    value = positive_int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"expected a short side of at least 32 px, got {text!r}")
    if value > 4 * _SHORT:
        raise argparse.ArgumentTypeError(f"expected a short side of at most {4 * _SHORT} px, got {text!r}")
    return value


def test_scale(model_scale: tuple[int, int], size: Optional[int]) -> tuple[int, int]:
    """(long, short) limits of ``--size``: the model's own test scale, or it scaled to the short side asked for."""
    if size is None:
        return model_scale
    long, short = max(model_scale), min(model_scale)
    return int(size * long / short + 0.5), size


def check_detector_options(args: argparse.Namespace) -> None:
    """``--model`` and ``--weights`` of detect and eval-det, checked before torch loads. A folder of
    weights brings its own model: ``--model`` becomes ``local-dir:FOLDER``."""
    if args.aug and args.size is not None:
        raise UsageError("--aug runs upstream's own scales: leave out --size")
    check_task_model_options(args, DEFAULT_DETECTOR, "detector")


def detector_model(args: argparse.Namespace, device: "torch.device", fall_back: bool) -> tuple["torch.nn.Module", Optional[str]]:
    """The detector on ``device`` in eval mode at ``--size``'s test scale, and where its weights came
    from: ``--weights FOLDER`` (the folder's model), ``--weights FILE`` (built for the file's class
    count), else the name's weights; with ``fall_back``, weights that cannot be had are reported in
    one line and the model runs on random weights (None)."""
    from .. import create_model  # lazy: startup time

    if args.weights is not None and Path(args.weights).is_dir():
        model = create_model(args.model, pretrained=True)
        _check_detector(model, args.model)
        weights: Optional[str] = args.weights
    elif args.weights is not None:
        from ..converters.mmdet import checkpoint_num_classes  # lazy: startup time
        from ..models.checkpoints import load_detector_checkpoint
        from ..weights.read import as_dict, read_weights, unwrap

        checkpoint = read_weights(args.weights)
        classes = checkpoint_num_classes(unwrap(as_dict(checkpoint, args.weights), split_backbone=False)[0])
        model = create_model(args.model, **({} if classes is None else {"num_classes": classes}))
        load_detector_checkpoint(model, checkpoint)
        weights = args.weights
    else:
        model, weights = released_or_random(args.model, fall_back)
        _check_detector(model, args.model)
    model.test_scale = test_scale(model.test_scale, args.size)
    if args.aug and model.aug_test is None:
        raise UsageError(f"--aug: upstream has a multi-scale flip test for its HTC++ detectors only, not for {args.model}")
    return model.eval().to(device), weights


def _check_detector(model: "torch.nn.Module", name: str) -> None:
    """A ``local-dir:`` or ``hf-hub:`` name can hold any model: refuse one that is not a detector."""
    from ..models.detector import Detector  # lazy: startup time

    if not isinstance(model, Detector):
        raise UsageError(f"--model {name} is not a detector (image -> boxes, classes, masks): "
                         "`vitadapter segment` takes segmentors, `vitadapter features` backbones")


def class_names(model: "torch.nn.Module") -> list[str]:
    return list(model.class_names) if model.class_names is not None else [f"class {k}" for k in range(model.num_classes)]


def category_ids(model: "torch.nn.Module") -> list[int]:
    """COCO's category id of each label: COCO's own ids for COCO's 80 classes, else label + 1 (COCO
    numbers categories from 1)."""
    from ..data import coco  # lazy: startup time

    if model.class_names is not None and tuple(model.class_names) == coco.CLASSES:
        return list(coco.CATEGORY_IDS)
    return list(range(1, model.num_classes + 1))


def scale_text(model: "torch.nn.Module", args: argparse.Namespace) -> str:
    if args.aug:
        scales = ", ".join(f"{long} x {short}" for long, short in model.aug_test.scales)
        return f"multi-scale{' flip' if model.aug_test.flip else ''} test ({len(model.aug_test.views())} views: {scales})"
    long, short = model.test_scale
    return f"test scale {long} x {short}" + ("" if args.size else " (upstream's; --size changes it)")


def weights_line(weights: Optional[str]) -> str:
    return f"weights: {weights}" if weights else "random weights: the detections mean nothing"

"""What segment and eval-seg share: their model options, the segmentor those options build, and its
prediction for one image at the test scales asked for."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ._common import DEFAULT_SEGMENTOR, UsageError, check_task_model_options, size_option
from ._models import released_or_random

if TYPE_CHECKING:
    import torch
    from PIL import Image


def add_segmentor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model",
                   help=f"segmentor name or name.tag; its weights load (downloading once) unless --weights (default: {DEFAULT_SEGMENTOR})")
    p.add_argument("--weights", metavar="FILE|FOLDER",
                   help="whole segmentor checkpoint (upstream .pth/.pth.tar/.zip or .safetensors), or a folder of "
                        "config.json + model.safetensors (save_pretrained, convert), which brings its own model")
    p.add_argument("--size", type=size_option, metavar="N|original",
                   help="test scale: short side <= N and long side <= 4N (default: the model's own test scale, e.g. 512 and 2048)")
    p.add_argument("--aug", action="store_true", help="multi-scale (0.5 to 1.75) and flip testing, upstream's 'MS' (12 passes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def check_segmentor_options(args: argparse.Namespace) -> None:
    """``--model`` and ``--weights`` of segment and eval-seg, checked before torch loads. A folder of
    weights (``save_pretrained``, ``vitadapter convert``) brings its own model: ``--model`` becomes
    ``local-dir:FOLDER``."""
    check_task_model_options(args, DEFAULT_SEGMENTOR, "segmentor")


def segmentor_model(args: argparse.Namespace, device: "torch.device", fall_back: bool) -> tuple["torch.nn.Module", Optional[str]]:
    """The segmentor on ``device`` in eval mode and where its weights came from: ``--weights FOLDER``
    (the folder's model), ``--weights FILE`` (built for the file's class count), else the name's
    weights; with ``fall_back``, weights that cannot be had are reported in one line and the model
    runs on random weights (None)."""
    from .. import create_model  # lazy: startup time

    if args.weights is not None and Path(args.weights).is_dir():
        model = create_model(args.model, pretrained=True)
        _check_segmentor(model, args.model)
        weights: Optional[str] = args.weights
    elif args.weights is not None:
        from ..converters.mmseg import checkpoint_num_classes  # lazy: startup time
        from ..models.checkpoints import load_segmentor_checkpoint
        from ..weights.read import read_weights

        checkpoint = read_weights(args.weights)
        classes = checkpoint_num_classes(checkpoint)
        model = create_model(args.model, **({} if classes is None else {"num_classes": classes}))
        _check_segmentor(model, args.model)
        load_segmentor_checkpoint(model, checkpoint)
        weights = args.weights
    else:
        model, weights = released_or_random(args.model, fall_back)
        _check_segmentor(model, args.model)
    return model.eval().to(device), weights


def _check_segmentor(model: "torch.nn.Module", name: str) -> None:
    """A ``local-dir:`` or ``hf-hub:`` name can hold any model: refuse one without classes, or a
    detector (it has classes too, but gives boxes)."""
    from ..models.detector import Detector  # lazy: startup time

    if isinstance(model, Detector):
        raise UsageError(f"--model {name} is a detector (image -> boxes, classes, masks): `vitadapter detect` runs it")
    if not isinstance(getattr(model, "num_classes", None), int) or not hasattr(model, "class_names"):
        raise UsageError(f"--model {name} is not a segmentor (image -> class labels); `vitadapter features` takes backbones")


def predict_labels(model: "torch.nn.Module", image: "Image.Image", args: argparse.Namespace, ratios: Any, flip: bool, device: "torch.device") -> "torch.Tensor":
    """The class of each pixel of ``image`` (H x W) at the test scale of ``--size``."""
    from ..predict import predict  # lazy: startup time (it imports torch)

    scale = None if args.size == "original" else (args.size or 0)
    return predict(model, image, scale, ratios, flip, device)


def scales_and_flip(aug: bool) -> tuple[tuple[float, ...], bool]:
    """The scale ratios and whether to flip: upstream's multi-scale + flip with ``--aug``, else one pass."""
    from ..predict import MS_RATIOS  # lazy: startup time (it imports torch)

    return (MS_RATIOS, True) if aug else ((1.0,), False)


def class_names(model: "torch.nn.Module") -> list[str]:
    return list(model.class_names) if model.class_names is not None else [f"class {k}" for k in range(model.num_classes)]


def weights_line(weights: Optional[str]) -> str:
    return f"weights: {weights}" if weights else "random weights: the labels mean nothing"

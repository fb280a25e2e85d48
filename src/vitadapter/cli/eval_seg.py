"""``vitadapter eval-seg``: a segmentor's mIoU (with per-class IoU and accuracy) on a dataset folder in
ADE20K's layout (images/ and annotations/)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import UsageError, positive_int, subcommand, torch_device
from ._segmentors import (
    add_segmentor_options, check_segmentor_options, class_names, predict_labels, scales_and_flip, segmentor_model,
    weights_line,
)

if TYPE_CHECKING:
    import torch


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "eval-seg", "mIoU of a segmentor on a dataset folder in ADE20K's layout (images/, annotations/)")
    p.add_argument("data", metavar="DATA_DIR", help="folder holding images/ and annotations/ (e.g. ADEChallengeData2016)")
    add_segmentor_options(p)
    p.add_argument("--split", help="subfolder of images/ and annotations/ (default: validation where it exists, else none)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=True,
                   help="label 0 is 'other' (ignored) and k is class k-1, as in ADE20K (default: on)")
    p.set_defaults(run=eval_seg)


def eval_seg(args: argparse.Namespace) -> int:
    check_segmentor_options(args)
    root = Path(args.data)
    if not root.is_dir():
        raise UsageError(f"no folder at {args.data!r}: expected a dataset folder with images/ and annotations/")
    split = args.split
    if split is None and (root / "images" / "validation").is_dir():  # ADEChallengeData2016's layout
        split = "validation"
    from ..data.folder import SegmentationFolder  # lazy: startup time

    dataset = SegmentationFolder(root, split, reduce_zero_label=args.reduce_zero_label)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    device = torch_device(args.device)
    model, weights = segmentor_model(args, device, fall_back=False)

    from huggingface_hub.utils import tqdm  # lazy: startup time

    from ..metrics import SegmentationMetric

    ratios, flip = scales_and_flip(args.aug)
    metric = SegmentationMetric(model.num_classes)
    with tqdm(total=count, unit="image", desc="eval-seg", disable=None) as bar:
        for index in range(count):
            item = dataset[index]
            metric.update(predict_labels(model, item["image"], args, ratios, flip, device).numpy(), item["label"])
            bar.update()
    scores = metric.compute()

    images = root / "images" / (split or "")
    passes = f"multi-scale {', '.join(map(str, ratios))} + flip" if args.aug else "single scale"
    print(f"model:   {args.model} ({weights_line(weights)})")
    print(f"data:    {count} of {len(dataset)} images in {images}, {passes}, short side {_scale_text(model, args)}")
    names = class_names(model)
    width = max(len("class"), *map(len, names))
    print(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for name, iou, acc in zip(names, scores.iou, scores.acc):
        print(f"{name:<{width}}  {_percent(iou)}  {_percent(acc)}")
    print(f"aAcc {_percent(scores.aacc).strip()}  mIoU {_percent(scores.miou).strip()}  mAcc {_percent(scores.macc).strip()}")
    return 0


def _scale_text(model: "torch.nn.Module", args: argparse.Namespace) -> str:
    from ..predict import default_scale  # lazy: startup time (it imports torch)

    if args.size == "original":
        return "as stored"
    short, long = (args.size, 4 * args.size) if args.size else default_scale(model)
    return f"<= {short}, long side <= {long}" + ("" if args.size else " (the model's; --size changes it)")


def _percent(value: float) -> str:
    return f"{100 * value:6.2f}" if value == value else "   nan"

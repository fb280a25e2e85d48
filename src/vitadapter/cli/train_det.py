"""``vitadapter train-det``: fine-tune a detector (Mask R-CNN, Cascade Mask R-CNN, HTC++) on a COCO-format
folder with upstream's recipe; every option is checked before torch loads, the annotation file read
(a missing image or an unknown image or category is named), then ``vitadapter.train_det`` runs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import catalog
from ._common import UsageError, check_model_name, positive_int, subcommand, torch_device
from ._training import add_run_options, add_start_options, check_run_args


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "train-det", "fine-tune a detector on a COCO-format folder (upstream's recipe)")
    p.add_argument("--model", required=True, help="detector, e.g. mask_rcnn_vit_adapter_s (or NAME.TAG to start from that release)")
    p.add_argument("--data", required=True, metavar="FOLDER", help="the images the annotation file's file_name entries name")
    p.add_argument("--ann", required=True, metavar="FILE", help="COCO instances JSON (images, annotations, categories)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for last.pth (resumable), model.pth and log.jsonl")
    p.add_argument("--num-classes", type=positive_int, help="classes to predict (default: the annotation file's categories)")
    add_start_options(p, "start from a whole detector checkpoint (class-specific layers fresh if the classes differ)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per process and step (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, help="iterations (default: the schedule's 12 or 36 epochs over the data)")
    p.add_argument("--schedule", choices=("1x", "3x", "poly"),
                   help="lr steps tenfold at epochs 8, 11 of 12 (1x) or 27, 33 of 36 (3x), or poly decay (default: the release's, 3x)")
    p.add_argument("--warmup-iters", type=int, default=500, help="linear warm-up iterations from 0.001 of the lr (default: %(default)s)")
    p.add_argument("--scales", metavar="S,S,...", help="short sides of the multi-scale resize (default: 480,512,...,800, upstream's)")
    p.add_argument("--max-size", type=positive_int, default=1333, help="long side limit of the resize (default: %(default)s)")
    add_run_options(p, workers=2)
    p.set_defaults(run=train_det)


def train_det(args: argparse.Namespace) -> int:
    _check_detector_name(args.model)
    model_kwargs = check_run_args(args)
    scales = _scales(args.scales)
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    if not Path(args.ann).is_file():
        raise UsageError(f"--ann {args.ann}: no such file")
    from ..data.coco_instances import CocoInstances  # lazy: startup time

    # reads the annotations and looks for every image: bad data is reported before torch loads
    CocoInstances(args.data, args.ann, args.num_classes)
    if args.device != "auto":
        torch_device(args.device)  # a name torch knows, usable here
    from ..train_det import DetTrainOptions, train_detection  # lazy: startup time

    options = DetTrainOptions(
        data_dir=args.data, ann_file=args.ann, model=args.model, out=args.out, num_classes=args.num_classes,
        model_kwargs=model_kwargs, weights=args.weights, pretrained_backbone=not args.random_init, batch_size=args.batch_size,
        iters=args.iters, schedule=args.schedule, warmup_iters=args.warmup_iters, lr=args.lr, weight_decay=args.weight_decay,
        layer_decay=args.layer_decay, max_size=args.max_size, grad_checkpointing=args.grad_checkpointing, fp32=args.fp32,
        workers=args.workers, seed=args.seed, save_every=args.save_every, log_every=args.log_every, resume=args.resume,
        device=args.device, **({"scales": scales} if scales else {}),
    )
    train_detection(options)
    return 0


def _scales(text: Any) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        scales = tuple(int(part) for part in text.split(","))
    except ValueError:
        scales = ()
    if not scales or min(scales) < 1:
        raise UsageError(f"--scales {text}: expected short sides in pixels separated by commas, e.g. 480,640,800")
    return scales


def _check_detector_name(name: str) -> None:
    if ":" in name:
        raise UsageError(f"--model {name}: train-det takes a registered detector name (see `vitadapter list '*rcnn*'`)")
    check_model_name(name, "--model")
    architectures = catalog.load()["architectures"]
    if architectures[name.partition(".")[0]].get("task") != "detection":
        detectors = [a for a, entry in architectures.items() if entry.get("task") == "detection"]
        raise UsageError(f"--model {name} is not a detector; train-det trains one of: {', '.join(detectors)}")

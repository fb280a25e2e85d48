"""``vitadapter train-seg``: fine-tune a segmentor on a folder of images and label PNGs with upstream's
recipe; every option is checked before torch loads, then ``vitadapter.train`` runs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import catalog
from ._common import UsageError, check_model_name, is_detector, is_segmentor, positive_int, subcommand, torch_device
from ._training import add_run_options, add_start_options, check_run_args


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "train-seg", "fine-tune a segmentor on a folder of images and label PNGs (upstream's recipe)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder with images/ and annotations/ (ADE20K's layout)")
    p.add_argument("--model", required=True, help="segmentor, e.g. upernet_vit_adapter_b (or NAME.TAG to start from that release)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for last.pth (resumable), model.pth and log.jsonl")
    p.add_argument("--split", default="training", help="subfolder of images/ and annotations/ (default: %(default)s; '' for none)")
    p.add_argument("--num-classes", type=positive_int, default=150, help="classes to predict (default: %(default)s)")
    p.add_argument("--no-reduce-zero-label", action="store_true",
                   help="keep label 0 as a class (default: ADE20K's convention, 0 = ignore and k -> k-1)")
    add_start_options(p, "start from a whole segmentor checkpoint (a fresh classifier if the classes differ)")
    p.add_argument("--crop", type=positive_int, help="square crop size (default: the model's input size, 512 or 640)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per process and step (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=160_000, help="iterations (default: %(default)s)")
    p.add_argument("--warmup-iters", type=int, default=1500, help="linear warm-up iterations (default: %(default)s)")
    add_run_options(p, workers=4)
    p.set_defaults(run=train_seg)


def train_seg(args: argparse.Namespace) -> int:
    _check_segmentor_name(args.model)
    model_kwargs = check_run_args(args)
    if not Path(args.data_dir).is_dir():
        raise UsageError(f"{args.data_dir}: no such folder (expected images/ and annotations/ inside)")
    from ..data.folder import SegmentationFolder  # lazy: startup time

    # lists the files and pairs images with labels: a wrong layout is reported before torch loads
    SegmentationFolder(args.data_dir, args.split, reduce_zero_label=not args.no_reduce_zero_label)
    if args.device != "auto":
        torch_device(args.device)  # a name torch knows, usable here
    from ..train import TrainOptions, train_segmentation  # lazy: startup time

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
    check_model_name(name, "--model")
    architectures = catalog.load()["architectures"]
    if not is_segmentor(name):
        segmentors = [a for a in architectures if is_segmentor(a)]
        kind = "a detector" if is_detector(name) else "a backbone"
        raise UsageError(f"--model {name} is {kind}; train-seg trains a segmentor: {', '.join(segmentors)}")

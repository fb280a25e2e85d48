"""``vitadapter train-seg``: fine-tune a segmentor on a folder of images and label PNGs with upstream's
recipe; every option is checked before torch loads, then ``vitadapter.train`` runs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import catalog
from ._common import UsageError, check_model_name, check_weights_file, is_detector, is_segmentor, json_object, positive_int, subcommand, torch_device


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "train-seg", "fine-tune a segmentor on a folder of images and label PNGs (upstream's recipe)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder with images/ and annotations/ (ADE20K's layout)")
    p.add_argument("--model", required=True, help="segmentor, e.g. upernet_vit_adapter_b (or NAME.TAG to start from that release)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for last.pth (resumable), model.pth and log.jsonl")
    p.add_argument("--split", default="training", help="subfolder of images/ and annotations/ (default: %(default)s; '' for none)")
    p.add_argument("--num-classes", type=positive_int, default=150, help="classes to predict (default: %(default)s)")
    p.add_argument("--no-reduce-zero-label", action="store_true",
                   help="keep label 0 as a class (default: ADE20K's convention, 0 = ignore and k -> k-1)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", metavar="FILE", help="start from a whole segmentor checkpoint (a fresh classifier if the classes differ)")
    start.add_argument("--random-init", action="store_true", help="random weights (default: the backbone's ImageNet trunk; downloads once)")
    p.add_argument("--model-kwargs", metavar="JSON", help='extra create_model arguments, e.g. \'{"drop_path_rate": 0.2}\'')
    p.add_argument("--crop", type=positive_int, help="square crop size (default: the model's input size, 512 or 640)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per process and step (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=160_000, help="iterations (default: %(default)s)")
    p.add_argument("--warmup-iters", type=int, default=1500, help="linear warm-up iterations (default: %(default)s)")
    p.add_argument("--lr", type=float, help="base learning rate (default: upstream's for the model)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: upstream's for the model)")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay rate (default: upstream's for the model)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (the CPU always trains in fp32)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per training process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentation (default: %(default)s)")
    p.add_argument("--save-every", type=positive_int, default=1000, help="write last.pth every N iterations (default: %(default)s)")
    p.add_argument("--log-every", type=positive_int, default=50, help="print the mean losses every N iterations (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pth")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available; torchrun: each process's GPU)")
    p.set_defaults(run=train_seg)


def train_seg(args: argparse.Namespace) -> int:
    _check_segmentor_name(args.model)
    if "." in args.model and (args.weights is not None or args.random_init):
        option = "--weights" if args.weights is not None else "--random-init"
        raise UsageError(f"--model {args.model} starts from that release; {option} needs the bare name {args.model.partition('.')[0]}")
    if args.weights is not None:
        check_weights_file(args.weights, "--weights")
    for option, value, valid, expected in (
        ("--lr", args.lr, lambda v: v > 0, "a positive learning rate"),
        ("--weight-decay", args.weight_decay, lambda v: v >= 0, "a weight decay >= 0"),
        ("--layer-decay", args.layer_decay, lambda v: 0 < v <= 1, "a rate in (0, 1]"),
        ("--warmup-iters", args.warmup_iters, lambda v: v >= 0, "a count >= 0"),
        ("--workers", args.workers, lambda v: v >= 0, "a count >= 0"),
    ):
        if value is not None and not valid(value):
            raise UsageError(f"{option} {value}: expected {expected}")
    model_kwargs = json_object(args.model_kwargs, "--model-kwargs")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: it names the run's folder")
    if args.resume and not (out / "last.pth").is_file():
        raise UsageError(f"--resume: no last.pth in {out} to continue from")
    if not args.resume and (out / "last.pth").exists():
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or pick another folder")
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

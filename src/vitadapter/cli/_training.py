"""The options and checks ``train-seg`` and ``train-det`` share: the optimiser, the run's folder,
resuming, devices and where the weights start from."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import UsageError, check_weights_file, json_object, positive_int


def add_start_options(p: argparse.ArgumentParser, weights_help: str) -> None:
    """Where the weights start: a whole checkpoint (``weights_help`` says what it holds), random, or
    (neither) the backbone's ImageNet trunk; and extra ``create_model`` arguments."""
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", metavar="FILE", help=weights_help)
    start.add_argument("--random-init", action="store_true", help="random weights (default: the backbone's ImageNet trunk; downloads once)")
    p.add_argument("--model-kwargs", metavar="JSON", help='extra create_model arguments, e.g. \'{"drop_path_rate": 0.2}\'')


def add_run_options(p: argparse.ArgumentParser, workers: int) -> None:
    """The optimiser's overrides, precision, data loading, seeding, checkpoints, logging and device."""
    p.add_argument("--lr", type=float, help="base learning rate (default: upstream's for the model)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: upstream's for the model)")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay rate (default: upstream's for the model)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (the CPU always trains in fp32)")
    p.add_argument("--workers", type=int, default=workers, help="data-loading processes per training process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random in the run: initialisation, data order, augmentation (default: %(default)s)")
    p.add_argument("--save-every", type=positive_int, default=1000, help="write last.pth every N iterations (default: %(default)s)")
    p.add_argument("--log-every", type=positive_int, default=50, help="print the mean losses every N iterations (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pth")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available; torchrun: each process's GPU)")


def check_run_args(args: argparse.Namespace) -> dict[str, Any]:
    """Refuse, before torch loads, what the shared options cannot mean; returns ``--model-kwargs`` parsed."""
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
    return model_kwargs

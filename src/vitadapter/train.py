"""Fine-tuning a segmentor on a folder dataset with upstream's recipe, in plain PyTorch.

One loop, iteration-based as mmseg's ``IterBasedRunner``: augmented crops (``data.transforms``),
AdamW with layer-wise lr decay (the model's ``group_matcher``), a poly schedule after a linear
warm-up, bf16 autocast on CUDA, optional gradient checkpointing, and DDP when started by
``torchrun``. ``RUN_DIR/last.pth`` holds everything a resumed run needs (weights, optimizer,
schedule, iteration, RNG state, options) and is replaced atomically; ``RUN_DIR/model.pth`` is the
final model, loadable with ``create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=...))``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ._factory import create_model
from .data.folder import IGNORE_INDEX, SegmentationFolder
from .data.transforms import SegmentationTrainTransform
from .models.segmentor import Segmentor
from .weights.staging import append_line, folder_lock, write_atomically

CHECKPOINT = "last.pth"
FINAL = "model.pth"
LOG = "log.jsonl"


@dataclass(frozen=True)
class Recipe:
    lr: float
    weight_decay: float
    layer_decay: float


# upstream's configs (AdamW, betas 0.9/0.999, layer-wise decay over the ViT blocks). Its
# AugReg-B run used another scheme (heads at 10x lr, no layer decay); B's recipe stands in for it.
RECIPES = {
    "upernet_vit_adapter_t": Recipe(12e-5, 0.01, 0.95),
    "upernet_vit_adapter_s": Recipe(6e-5, 0.01, 0.95),
    "upernet_vit_adapter_b": Recipe(6e-5, 0.01, 0.95),
    "upernet_vit_adapter_b_384": Recipe(6e-5, 0.01, 0.95),
    "upernet_vit_adapter_l": Recipe(2e-5, 0.05, 0.95),
    "upernet_beit_adapter_l": Recipe(2e-5, 0.05, 0.90),
    "upernet_beit_adapter_l_512": Recipe(2e-5, 0.05, 0.90),
    "mask2former_beit_adapter_l": Recipe(2e-5, 0.05, 0.90),
    "mask2former_beit_adapter_l_512": Recipe(2e-5, 0.05, 0.90),
    "mask2former_beit_adapter_l_896": Recipe(2e-5, 0.05, 0.90),
    "mask2former_beitv2_adapter_l_896": Recipe(2e-5, 0.05, 0.90),
    "mask2former_beit_adapter_b_512": Recipe(3e-5, 0.05, 0.95),
}
_FALLBACK = RECIPES["upernet_vit_adapter_b"]


@dataclass
class TrainOptions:
    """What a run is; ``None`` entries take the model's recipe (``RECIPES``) or input size."""

    data_dir: str
    model: str
    out: str
    split: Optional[str] = "training"
    num_classes: int = 150
    reduce_zero_label: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # a whole segmentor checkpoint to start from
    pretrained_backbone: bool = True  # else random initialisation (ignored with weights or NAME.TAG)
    crop_size: Optional[int] = None
    batch_size: int = 2  # per process
    iters: int = 160_000
    warmup_iters: int = 1500
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    layer_decay: Optional[float] = None
    grad_checkpointing: bool = False
    fp32: bool = False  # on CUDA: no bf16 autocast (the CPU always trains in fp32)
    workers: int = 4
    seed: int = 0
    save_every: int = 1000
    log_every: int = 50
    resume: bool = False
    device: str = "auto"


# options that may differ between a run and its resumption: where things are and how they are shown
_RUNTIME = {"data_dir", "out", "resume", "device", "workers", "log_every", "save_every"}


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def train_segmentation(options: TrainOptions) -> Path:
    """Train as ``options`` say; returns the path of the final model. Under ``torchrun`` every process
    calls this; rank 0 alone writes."""
    rank, world, device = _start_processes(options.device)
    try:
        return _train(options, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(options: TrainOptions, rank: int, world: int, device: torch.device) -> Path:
    synced = world if device.type == "cuda" else 1  # SyncBatchNorm pools the batches of the GPUs
    if options.batch_size * synced < 2:
        raise ValueError("--batch-size 1: the heads' BatchNorm needs 2 or more images per batch (or several GPUs under torchrun)")
    if rank != 0:
        return _run(options, rank, world, device)
    # one run per folder: a second one would interleave the log and overwrite the checkpoints
    run_dir = Path(options.out)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(run_dir, "train-seg run"):
            return _run(options, rank, world, device)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only while empty: nothing of the run is lost
                run_dir.rmdir()
        raise


def _run(options: TrainOptions, rank: int, world: int, device: torch.device) -> Path:
    run_dir = Path(options.out)
    resumed = _read_checkpoint(run_dir, options, world) if options.resume else None
    if resumed is None and (run_dir / CHECKPOINT).exists():
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or pick another --out")
    options = _with_recipe(options)
    if rank == 0:
        _check_writable(run_dir)
    torch.manual_seed(options.seed)  # the same on every process, as mmseg seeds them
    segmentor = build_segmentor(options, initial_weights=resumed is None)
    crop = _crop_size(options, segmentor)
    folder = SegmentationFolder(options.data_dir, options.split, reduce_zero_label=options.reduce_zero_label)
    transform = SegmentationTrainTransform(crop, segmentor.pretrained_cfg["mean"], segmentor.pretrained_cfg["std"])
    start = resumed["iteration"] if resumed else 0
    loader = DataLoader(
        AugmentedFolder(folder, transform, options.num_classes),
        batch_size=options.batch_size,
        sampler=InfiniteSampler(len(folder), options.seed, rank, world, start=start * options.batch_size),
        num_workers=options.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(options.seed),  # keeps the global RNG out of the loader
    )

    if options.grad_checkpointing:
        segmentor.set_grad_checkpointing(True)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only; gloo on CPU keeps BatchNorm
        segmentor = nn.SyncBatchNorm.convert_sync_batchnorm(segmentor)
    segmentor.to(device).train()
    optimizer = build_optimizer(segmentor, options.lr, options.weight_decay, options.layer_decay)
    scheduler = poly_schedule(optimizer, options.iters, options.warmup_iters)
    if resumed:
        _load_resumed(resumed, run_dir / CHECKPOINT, segmentor, optimizer, scheduler)
    step = LossForward(segmentor)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" and not options.fp32 else contextlib.nullcontext()
    if resumed:  # last: building the model above drew from it
        _set_rng_state(resumed["rng"], device)
    log = _Log(run_dir if rank == 0 else None, options.iters)
    if rank == 0:
        log.start(options, start, world, len(folder), crop)

    batches = iter(loader)
    for iteration in range(start + 1, options.iters + 1):
        batch = next(batches)
        with autocast:
            losses = step(batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.add(losses)
        if iteration % options.log_every == 0 or iteration == options.iters:
            log.write(iteration, max(group["lr"] for group in optimizer.param_groups))
        if rank == 0 and (iteration % options.save_every == 0 or iteration == options.iters):
            save_checkpoint(run_dir / CHECKPOINT, segmentor, optimizer, scheduler, iteration, options, world, device)
    if rank == 0:
        save_model(run_dir / FINAL, segmentor, options)
        log.finish(run_dir / FINAL)
    return run_dir / FINAL


# ---- model, optimizer, schedule -------------------------------------------------------------------


def build_segmentor(options: TrainOptions, initial_weights: bool = True) -> Segmentor:
    """The segmentor to train. Initial weights, first that applies: ``weights`` (a whole segmentor
    file; a classifier for another class count is left fresh), ``NAME.TAG`` (that release), the
    backbone's ImageNet trunk (``pretrained_backbone``), random."""
    kwargs = dict(options.model_kwargs, num_classes=options.num_classes)
    if not initial_weights:  # resuming: the checkpoint brings the weights (the tag, its preprocessing)
        return create_model(options.model, **kwargs)
    if options.weights:
        return create_model(options.model, pretrained=True, pretrained_cfg_overlay=dict(file=options.weights), **kwargs)
    if "." in options.model:
        return create_model(options.model, pretrained=True, **kwargs)
    return create_model(options.model, pretrained_backbone=options.pretrained_backbone, **kwargs)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay groups: the stem at ``layer_decay ** (depth + 1)`` of ``lr``, ViT
    block i at ``layer_decay ** (depth - i)``, adapter and heads at ``lr`` (upstream's
    LayerDecayOptimizerConstructor). No weight decay on 1-d parameters (norms, biases) and the
    model's ``no_weight_decay`` names."""
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def poly_schedule(optimizer: torch.optim.Optimizer, iters: int, warmup_iters: int, warmup_ratio: float = 1e-6, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """mmcv's poly policy (min lr 0) with linear warm-up, per iteration: at iteration ``i`` (from 0) a
    group's lr is its initial lr times ``(1 - i / iters) ** power``, and during the warm-up also times
    ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)``, so it starts at ``warmup_ratio``."""

    def factor(i: int) -> float:
        poly = (1 - min(i, iters) / iters) ** power
        if i < warmup_iters:
            poly *= 1 - (1 - i / warmup_iters) * (1 - warmup_ratio)
        return poly

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _with_recipe(options: TrainOptions) -> TrainOptions:
    recipe = RECIPES.get(options.model.partition(".")[0], _FALLBACK)
    resolved = dict(
        lr=options.lr if options.lr is not None else recipe.lr,
        weight_decay=options.weight_decay if options.weight_decay is not None else recipe.weight_decay,
        layer_decay=options.layer_decay if options.layer_decay is not None else recipe.layer_decay,
    )
    return TrainOptions(**{**asdict(options), **resolved})


def _crop_size(options: TrainOptions, segmentor: Segmentor) -> tuple[int, int]:
    if options.crop_size is not None:
        return (options.crop_size, options.crop_size)
    _, height, width = segmentor.pretrained_cfg["input_size"]
    return (height, width)


class LossForward(nn.Module):
    """``segmentor.loss`` as a module's forward, so DDP sees the call and synchronises gradients."""

    def __init__(self, segmentor: Segmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.segmentor.loss(images, labels)


# ---- data -------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A sample that cannot be trained on (an unreadable file, a label that is no class).

    A DataLoader worker's exception reaches the training process rebuilt from its whole traceback
    text; this keeps only the message, so the error stays one line naming the file."""

    def __init__(self, message: str):
        last = message.rstrip().splitlines()[-1] if message.strip() else message
        marker = f"{type(self).__name__}: "
        super().__init__(last.partition(marker)[2] if marker in last else message)


class AugmentedFolder(Dataset):
    """``dataset[(index, seed)]``: sample ``index`` of ``folder`` through ``transform``, drawing from
    ``numpy.random.default_rng(seed)``; the sampler chooses both. Labels must be classes below
    ``num_classes`` or the ignore index."""

    def __init__(self, folder: SegmentationFolder, transform: SegmentationTrainTransform, num_classes: int):
        self.folder = folder
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        index, seed = key
        try:
            item = self.folder[index]
        except ValueError as e:
            raise DataError(" ".join(str(e).split())) from e
        label = item["label"]
        wrong = (label >= self.num_classes) & (label != IGNORE_INDEX) | (label < 0)
        if wrong.any():
            value = int(label[wrong][0])
            stored = f"stored {value + 1}, " if self.folder.reduce_zero_label else ""
            raise DataError(
                f"{self.folder.samples[index][1]} holds label {value} ({stored}{int(wrong.sum())} pixels), not a class of "
                f"this {self.num_classes}-class model (0 to {self.num_classes - 1}, or {IGNORE_INDEX} to ignore): "
                "check --num-classes and --no-reduce-zero-label"
            )
        return self.transform(item["image"], label, np.random.default_rng(list(seed)))


class InfiniteSampler(Sampler):
    """Endless ``(index, seed)`` keys, epoch after epoch, for iteration-based training.

    Each epoch is a permutation drawn from ``(seed, epoch)``, the same on every process, padded by
    its own start to a multiple of ``world_size`` (as ``DistributedSampler``); process ``rank`` takes
    every ``world_size``-th entry from ``rank``. A key's seed, ``(seed, epoch, position)``, fixes the
    sample's augmentation. ``start`` skips that many keys of this process's stream (resuming).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int]]]:
        per_process = math.ceil(self.size / self.world_size)
        epoch, skip = divmod(self.start, per_process)
        while True:
            order = np.resize(np.random.default_rng([self.seed, epoch]).permutation(self.size), per_process * self.world_size)
            for position in range(self.rank + skip * self.world_size, len(order), self.world_size):
                yield int(order[position]), (self.seed, epoch, position)
            epoch, skip = epoch + 1, 0


# ---- checkpoints --------------------------------------------------------------------------------


def _check_writable(run_dir: Path) -> None:
    """Create the run's folder and write a file there now, not after hours of training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as e:
        raise OSError(f"--out {run_dir}: cannot write there ({e.strerror or e}): pick a folder this user can write to") from e


def _save(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` through a staging file; a failed write (a full disk) is one line naming ``path``."""
    try:
        write_atomically(path, lambda staging: torch.save(state, staging))
    except (OSError, RuntimeError) as e:
        raise OSError(f"cannot write {path}: {' '.join(str(e).split())[:200]} (is the disk full?); "
                      f"the previous {path.name}, if any, is kept") from e


def save_checkpoint(
    path: Path,
    segmentor: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    options: TrainOptions,
    world_size: int,
    device: torch.device,
) -> None:
    """Everything a resumed run needs, written beside ``path`` and renamed over it."""
    state = {
        "model": segmentor.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "rng": _rng_state(device),
        "options": asdict(options),
        "world_size": world_size,
    }
    _save(path, state)


def save_model(path: Path, segmentor: nn.Module, options: TrainOptions) -> None:
    """The trained model as ``{"state_dict": ..., "meta": ...}``, what the segmentation loaders read."""
    meta = {"architecture": options.model.partition(".")[0], "num_classes": options.num_classes,
            "model_kwargs": options.model_kwargs, "iterations": options.iters}
    state = {"state_dict": segmentor.state_dict(), "meta": meta}
    _save(path, state)


def _read_checkpoint(run_dir: Path, options: TrainOptions, world_size: int) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {run_dir} to continue from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume: cannot read {path} ({' '.join(str(e).split())[:200]})") from e
    _check_checkpoint(checkpoint, path)
    saved = checkpoint["options"]
    current = asdict(_with_recipe(options))
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if k not in _RUNTIME and saved.get(k) != v]
    if changed:
        raise ValueError(f"--resume: {path} was trained with other settings: {'; '.join(changed)}")
    if checkpoint["world_size"] != world_size:
        raise ValueError(f"--resume: {path} was trained by {checkpoint['world_size']} process(es), this run has {world_size}")
    return checkpoint


# what save_checkpoint writes: key -> (type, what it is)
_CHECKPOINT_ENTRIES = {
    "model": (dict, "the weights"),
    "optimizer": (dict, "the optimizer state"),
    "scheduler": (dict, "the schedule"),
    "iteration": (int, "the iteration"),
    "rng": (dict, "the random state"),
    "options": (dict, "the run's options"),
    "world_size": (int, "the process count"),
}


def _check_checkpoint(checkpoint: Any, path: Path) -> None:
    """Refuse a file that is not a train-seg ``last.pth``, naming what is missing or of the wrong kind."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--resume: {path} is not a train-seg checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    missing = [f"{key} ({what})" for key, (_, what) in _CHECKPOINT_ENTRIES.items() if key not in checkpoint]
    if missing:
        raise ValueError(f"--resume: {path} is not a train-seg checkpoint: it lacks {', '.join(missing)}")
    for key, (kind, what) in _CHECKPOINT_ENTRIES.items():
        value = checkpoint[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"--resume: {path}: {key} ({what}) should be a {kind.__name__}, it is a {type(value).__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint["model"].items()):
        raise ValueError(f"--resume: {path}: model should map parameter names to tensors")
    rng, reference = checkpoint["rng"].get("torch"), torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != reference.dtype or rng.shape != reference.shape:
        raise ValueError(f"--resume: {path}: rng lacks torch's random state (a {tuple(reference.shape)} uint8 tensor)")
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise ValueError(f"--resume: {path}: optimizer is not an optimizer's state_dict (state and param_groups)")


def _load_resumed(resumed: dict[str, Any], path: Path, segmentor: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The weights, optimizer and schedule of a checked checkpoint; one line naming the file when they
    do not fit this run's model."""
    state = segmentor.state_dict()
    missing = sorted(set(state) - set(resumed["model"]))
    unexpected = sorted(set(resumed["model"]) - set(state))
    shapes = [f"{k} {tuple(v.shape)} (the model's: {tuple(state[k].shape)})" for k, v in resumed["model"].items()
              if k in state and v.shape != state[k].shape]
    problems = [f"{len(missing)} weights missing, e.g. {missing[0]}" if missing else "",
                f"{len(unexpected)} unknown weights, e.g. {unexpected[0]}" if unexpected else "",
                f"other shapes: {shapes[0]}" + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else "") if shapes else ""]
    if any(problems):
        raise ValueError(f"--resume: {path} does not fit the model: {'; '.join(p for p in problems if p)}")
    segmentor.load_state_dict(resumed["model"])
    try:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise ValueError(f"--resume: {path}: its optimizer state does not fit the model ({' '.join(str(e).split())[:200]})") from e
    # load_state_dict takes moments of any shape: step() would fail on them
    for parameter, moments in optimizer.state.items():
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                raise ValueError(f"--resume: {path}: its optimizer's {name} of shape {tuple(value.shape)} belongs to "
                                 f"no parameter of the model (one of shape {tuple(parameter.shape)} sits there)")


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG training draws from (dropout, drop path): the data pipeline seeds its own."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- processes and logging --------------------------------------------------------------------------


def _start_processes(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process, or one of ``torchrun``'s (its environment variables
    say which; each takes the GPU of its local rank, or the CPU with gloo)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


class _Log:
    """Averages of the losses over each interval (this process's batches), printed and appended to
    ``RUN_DIR/log.jsonl`` by rank 0."""

    def __init__(self, run_dir: Optional[Path], iters: int):
        self.run_dir, self.iters = run_dir, iters
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.since = time.perf_counter()

    def start(self, options: TrainOptions, start: int, world: int, images: int, crop: tuple[int, int]) -> None:
        what = f"resuming at iteration {start}" if start else "starting"
        print(f"train-seg: {what}: {options.model}, {images} images, {crop[0]}x{crop[1]} crops, "
              f"batch {options.batch_size} x {world} process(es), {options.iters} iterations, lr {options.lr:g}, "
              f"weight decay {options.weight_decay:g}, layer decay {options.layer_decay:g}", flush=True)
        self.since = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.count += 1

    def write(self, iteration: int, lr: float) -> None:
        means = {name: (total / self.count).item() for name, total in self.sums.items()}
        loss = sum(means.values())
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss is {loss} at iteration {iteration}: lower --lr, or check the labels")
        seconds = (time.perf_counter() - self.since) / self.count
        self.sums, self.count, self.since = {}, 0, time.perf_counter()
        if self.run_dir is None:
            return
        eta = seconds * (self.iters - iteration)
        # the terminal shows the final prediction's losses; log.jsonl keeps every term (Mask2Former
        # adds one set per decoder layer, "d0." ... "d8.")
        shown = {name: value for name, value in means.items() if not re.match(r"d\d+\.", name)}
        parts = "  ".join(f"{name} {value:.4f}" for name, value in shown.items())
        print(f"iter {iteration}/{self.iters}  loss {loss:.4f}  ({parts})  lr {lr:.3g}  {seconds:.2f} s/iter  "
              f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m", flush=True)
        append_line(self.run_dir / LOG, json.dumps({"iteration": iteration, "loss": loss, **means, "lr": lr}))

    def finish(self, model: Path) -> None:
        print(f"wrote {model}", flush=True)

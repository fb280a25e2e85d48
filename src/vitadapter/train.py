"""Fine-tuning a segmentor on a folder dataset with upstream's recipe, in plain PyTorch.

One loop, iteration-based as mmseg's ``IterBasedRunner`` (``vitadapter.trainer``, shared with
``train-det``): augmented crops (``data.transforms``), AdamW with layer-wise lr decay (the model's
``group_matcher``), a poly schedule after a linear warm-up, bf16 autocast on CUDA, optional
gradient checkpointing, and DDP when started by ``torchrun``. ``RUN_DIR/last.pth`` holds everything
a resumed run needs (weights, optimizer, schedule, iteration, RNG state, options) and is replaced
atomically; ``RUN_DIR/model.pth`` is the final model, loadable with ``create_model(NAME,
pretrained=True, pretrained_cfg_overlay=dict(file=...))``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._factory import create_model
from .data.folder import IGNORE_INDEX, SegmentationFolder
from .data.transforms import SegmentationTrainTransform
from .models.segmentor import Segmentor
from .trainer import (
    CHECKPOINT,
    FINAL,
    DataError,
    InfiniteSampler,
    Log,
    Recipe,
    build_optimizer,
    fit,
    in_processes,
    load_resumed,
    locked,
    open_run,
    poly_schedule,
    prepare_model,
    save_file,
)


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


def train_segmentation(options: TrainOptions) -> Path:
    """Train as ``options`` say; returns the path of the final model. Under ``torchrun`` every process
    calls this; rank 0 alone writes."""
    return in_processes(options.device, lambda rank, world, device: _train(options, rank, world, device))


def _train(options: TrainOptions, rank: int, world: int, device: torch.device) -> Path:
    synced = world if device.type == "cuda" else 1  # SyncBatchNorm pools the batches of the GPUs
    if options.batch_size * synced < 2:
        raise ValueError("--batch-size 1: the heads' BatchNorm needs 2 or more images per batch (or several GPUs under torchrun)")
    return locked(Path(options.out), "train-seg", rank, lambda: _run(options, rank, world, device))


def _run(options: TrainOptions, rank: int, world: int, device: torch.device) -> Path:
    run_dir = Path(options.out)
    options = _with_recipe(options)
    resumed = open_run(run_dir, "train-seg", asdict(options), world, options.resume, rank)
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

    segmentor = prepare_model(segmentor, options.grad_checkpointing, world, device)
    optimizer = build_optimizer(segmentor, options.lr, options.weight_decay, options.layer_decay)
    scheduler = poly_schedule(optimizer, options.iters, options.warmup_iters)
    if resumed:
        load_resumed(resumed, run_dir / CHECKPOINT, segmentor, optimizer, scheduler)
    log = Log(run_dir if rank == 0 else None, options.iters)
    what = f"resuming at iteration {start}" if start else "starting"
    log.start(f"train-seg: {what}: {options.model}, {len(folder)} images, {crop[0]}x{crop[1]} crops, "
              f"batch {options.batch_size} x {world} process(es), {options.iters} iterations, lr {options.lr:g}, "
              f"weight decay {options.weight_decay:g}, layer decay {options.layer_decay:g}")
    fit(segmentor, optimizer, scheduler, loader, _inputs, options, start, rank, world, device, log, resumed and resumed["rng"])
    if rank == 0:
        save_model(run_dir / FINAL, segmentor, options)
        log.finish(run_dir / FINAL)
    return run_dir / FINAL


def _inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)


# ---- model and recipe -------------------------------------------------------------------------------


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


# ---- data ------------------------------------------------------------------------------------------


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


# ---- the final model ----------------------------------------------------------------------------


def save_model(path: Path, segmentor: torch.nn.Module, options: TrainOptions) -> None:
    """The trained model as ``{"state_dict": ..., "meta": ...}``, what the segmentation loaders read."""
    meta = {"architecture": options.model.partition(".")[0], "num_classes": options.num_classes,
            "model_kwargs": options.model_kwargs, "iterations": options.iters}
    state = {"state_dict": segmentor.state_dict(), "meta": meta}
    save_file(path, state)

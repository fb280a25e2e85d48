"""Fine-tuning a detector (Mask R-CNN, Cascade Mask R-CNN, HTC++) on a COCO-format folder with upstream's
recipe, in plain PyTorch, through the loop ``train-seg`` uses (``vitadapter.trainer``).

Each sample goes through upstream's 3x augmentation (``data.detection_transforms``: flip,
multi-scale resize or resize-crop-resize, crop to 1024, normalise, pad to 32); the loss is mmdet's
``forward_train`` (``Detector.loss``: RPN and per-stage assignment, sampling, box and mask losses;
HTC++'s semantic loss only where the data has semantic maps, which a COCO instances file has not);
AdamW with upstream's lr, weight decay and layer-wise decay for the model; mmdet's 1x or 3x step
schedule (or poly) after a linear warm-up of 500 iterations from 0.001. ``RUN_DIR/last.pth`` makes a
run resumable bit for bit; ``RUN_DIR/model.pth`` is the final model with the class names in its meta,
``RUN_DIR/hub`` the same as a ``save_pretrained`` folder (``create_model("local-dir:RUN_DIR/hub",
pretrained=True)``, ``detect --weights``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._factory import create_model
from .data.coco_instances import MIN_SIZE, CocoInstances
from .data.detection_transforms import SCALES, DetectionTrainTransform
from .models.checkpoints import load_detector_checkpoint
from .hub import save_pretrained
from .models.detector import Detector
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
    step_schedule,
)

# the run's final model as a Hub folder: create_model("local-dir:RUN_DIR/hub", pretrained=True)
HUB = "hub"
# mmdet's step schedules: epochs, and the epochs after which the lr drops tenfold
SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}
# mmcv's linear warm-up of every upstream detection config
WARMUP_RATIO = 1e-3

# upstream's detection configs: AdamW, and LayerDecayOptimizerConstructor where they use it (the DeiT
# and cascade configs exclude only norms, biases and embeddings from weight decay: rate 1 here)
RECIPES = {
    "mask_rcnn_vit_adapter_t": Recipe(1e-4, 0.05, 1.0),
    "mask_rcnn_vit_adapter_t.coco_1x": Recipe(2e-4, 0.01, 1.0),
    "mask_rcnn_vit_adapter_s": Recipe(1e-4, 0.05, 1.0),
    "mask_rcnn_vit_adapter_b": Recipe(1e-4, 0.05, 1.0),
    "mask_rcnn_vit_adapter_l": Recipe(1e-4, 0.05, 0.80),
    "mask_rcnn_vit_adapter_s_nofpn": Recipe(1e-4, 0.05, 1.0),
    "mask_rcnn_uniperceiver_adapter_b": Recipe(1e-4, 0.05, 0.65),
    "mask_rcnn_dinov2_adapter_s": Recipe(1e-4, 0.05, 0.70),
    "mask_rcnn_dinov2_adapter_b": Recipe(1e-4, 0.05, 0.70),
    "mask_rcnn_dinov2_adapter_l": Recipe(1e-4, 0.05, 0.80),
    "cascade_mask_rcnn_vit_adapter_s": Recipe(1e-4, 0.05, 1.0),
    "cascade_mask_rcnn_vit_adapter_b": Recipe(1e-4, 0.05, 1.0),
    # detection/configs/htc++: layer decay 0.9 over 24 layers (0.8 for the Objects365 recipe)
    "htc_augreg_adapter_l": Recipe(1e-4, 0.05, 0.90),
    "htc_beit_adapter_l": Recipe(1e-4, 0.05, 0.90),
    "htc_beitv2_adapter_l": Recipe(1e-4, 0.05, 0.90),
    "htc_beitv2_adapter_l_gn": Recipe(1e-4, 0.05, 0.80),
}
_FALLBACK = RECIPES["mask_rcnn_vit_adapter_b"]


@dataclass
class DetTrainOptions:
    """What a run is; ``None`` entries take the model's recipe (``RECIPES``), the data's categories
    (``num_classes``) or the schedule's epochs over the data (``iters``)."""

    data_dir: str  # the folder the annotation file's file_name entries are relative to
    ann_file: str  # COCO instances JSON
    model: str
    out: str
    num_classes: Optional[int] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # a whole detector checkpoint to start from
    pretrained_backbone: bool = True  # else random initialisation (ignored with weights or NAME.TAG)
    batch_size: int = 2  # per process
    iters: Optional[int] = None
    schedule: Optional[str] = None  # "1x", "3x" (mmdet's step schedules) or "poly"; default: the release's
    warmup_iters: int = 500
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    layer_decay: Optional[float] = None
    scales: tuple[int, ...] = SCALES  # the multi-scale resize's short sides
    max_size: int = 1333  # its long side limit
    grad_checkpointing: bool = False
    fp32: bool = False  # on CUDA: no bf16 autocast (the CPU always trains in fp32)
    workers: int = 2
    seed: int = 0
    save_every: int = 1000
    log_every: int = 50
    resume: bool = False
    device: str = "auto"


def train_detection(options: DetTrainOptions) -> Path:
    """Train as ``options`` say; returns the path of the final model. Under ``torchrun`` every process
    calls this; rank 0 alone writes."""
    return in_processes(options.device, lambda rank, world, device: locked(
        Path(options.out), "train-det", rank, lambda: _run(options, rank, world, device)))


def _run(options: DetTrainOptions, rank: int, world: int, device: torch.device) -> Path:
    run_dir = Path(options.out)
    data = CocoInstances(options.data_dir, options.ann_file, options.num_classes)
    if len(data) == 0:
        raise ValueError(f"{options.ann_file}: no image of {MIN_SIZE} px or more has an annotation: nothing to train on")
    options = resolve(options, data, world)
    resumed = open_run(run_dir, "train-det", asdict(options), world, options.resume, rank)
    torch.manual_seed(options.seed)  # the same on every process, as mmdet seeds them
    detector = build_detector(options, initial_weights=resumed is None)
    if len(data.class_names) == detector.num_classes:
        detector.class_names = tuple(data.class_names)
    transform = DetectionTrainTransform(detector.mean, detector.std, scales=options.scales, max_size=options.max_size)
    start = resumed["iteration"] if resumed else 0
    loader = DataLoader(
        AugmentedInstances(data, transform),
        batch_size=options.batch_size,
        sampler=InfiniteSampler(len(data), options.seed, rank, world, start=start * options.batch_size),
        num_workers=options.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(options.seed),  # keeps the global RNG out of the loader
    )

    detector = prepare_model(detector, options.grad_checkpointing, world, device)
    optimizer = build_optimizer(detector, options.lr, options.weight_decay, options.layer_decay)
    if options.schedule == "poly":
        scheduler = poly_schedule(optimizer, options.iters, options.warmup_iters, WARMUP_RATIO)
    else:
        epochs, steps = SCHEDULES[options.schedule]
        scheduler = step_schedule(optimizer, [options.iters * s // epochs for s in steps], options.warmup_iters, WARMUP_RATIO)
    if resumed:
        load_resumed(resumed, run_dir / CHECKPOINT, detector, optimizer, scheduler)
    log = Log(run_dir if rank == 0 else None, options.iters)
    what = f"resuming at iteration {start}" if start else "starting"
    log.start(f"train-det: {what}: {options.model}, {len(data)} images, {detector.num_classes} classes, "
              f"batch {options.batch_size} x {world} process(es), {options.iters} iterations ({options.schedule} schedule), "
              f"lr {options.lr:g}, weight decay {options.weight_decay:g}, layer decay {options.layer_decay:g}")
    fit(detector, optimizer, scheduler, loader, _inputs, options, start, rank, world, device, log, resumed and resumed["rng"])
    if rank == 0:
        save_model(run_dir / FINAL, detector, options, data)
        log.finish(run_dir / FINAL)
        save_pretrained(detector, run_dir / HUB)
        log.finish(run_dir / HUB)
    return run_dir / FINAL



def resolve(options: DetTrainOptions, data: CocoInstances, world: int) -> DetTrainOptions:
    """``options`` with every ``None`` replaced: the recipe of the release (``NAME.TAG``) or the
    architecture, 3x (1x for the 1x release), the class count of ``data``, and the schedule's epochs
    over ``data`` in batches of ``batch_size`` per process."""
    recipe = RECIPES.get(options.model, RECIPES.get(options.model.partition(".")[0], _FALLBACK))
    schedule = options.schedule or ("1x" if options.model.endswith("_1x") else "3x")
    if schedule not in (*SCHEDULES, "poly"):
        raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}, poly")
    if options.iters is not None:
        iters = options.iters
    else:
        epochs = SCHEDULES[schedule][0] if schedule in SCHEDULES else SCHEDULES["3x"][0]
        iters = epochs * math.ceil(len(data) / (options.batch_size * world))
    return replace(
        options,
        num_classes=data.num_classes,
        iters=iters,
        schedule=schedule,
        lr=options.lr if options.lr is not None else recipe.lr,
        weight_decay=options.weight_decay if options.weight_decay is not None else recipe.weight_decay,
        layer_decay=options.layer_decay if options.layer_decay is not None else recipe.layer_decay,
        scales=tuple(options.scales),
    )


def build_detector(options: DetTrainOptions, initial_weights: bool = True) -> Detector:
    """The detector to train (``options`` resolved). Initial weights, first that applies: ``weights`` (a
    whole detector file; class-specific layers for another class count are left fresh), ``NAME.TAG``
    (that release, likewise), the backbone's ImageNet trunk (``pretrained_backbone``), random."""
    kwargs = dict(options.model_kwargs, num_classes=options.num_classes)
    if not initial_weights:  # resuming: the checkpoint brings the weights
        return create_model(options.model, **kwargs)
    if options.weights:
        detector = create_model(options.model, **kwargs)
        load_detector_checkpoint(detector, options.weights, keep_classifier=False)
        return detector
    if "." in options.model:
        return create_model(options.model, pretrained=True, **kwargs)
    return create_model(options.model, pretrained_backbone=options.pretrained_backbone, **kwargs)


# ---- data -------------------------------------------------------------------------------------------


class AugmentedInstances(Dataset):
    """``dataset[(index, seed)]``: image ``index`` of ``data`` through ``transform``, drawing from
    ``numpy.random.default_rng(seed)``; the sampler chooses both."""

    def __init__(self, data: CocoInstances, transform: DetectionTrainTransform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> dict[str, Any]:
        index, seed = key
        try:
            item = self.data[index]
        except ValueError as e:
            raise DataError(" ".join(str(e).split())) from e
        return self.transform(item["image"], item, np.random.default_rng(list(seed)))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Transformed samples as one batch: images padded with zeros to the largest (each is a multiple of
    32 already), their sizes inside it, and per image the targets ``Detector.loss`` takes (masks at
    the image's own padded size, as mmdet pads them)."""
    height = max(s["image"].shape[1] for s in samples)
    width = max(s["image"].shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, height, width)
    for image, sample in zip(images, samples):
        image[:, : sample["image"].shape[1], : sample["image"].shape[2]] = sample["image"]
    targets = [{k: s[k] for k in ("boxes", "labels", "masks", "ignore_boxes")} for s in samples]
    return {"images": images, "image_sizes": [s["image_size"] for s in samples], "targets": targets}


def _inputs(batch: dict[str, Any], device: torch.device) -> tuple[Any, ...]:
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
    return batch["images"].to(device, non_blocking=True), batch["image_sizes"], targets


# ---- the final model ----------------------------------------------------------------------------


def save_model(path: Path, detector: torch.nn.Module, options: DetTrainOptions, data: CocoInstances) -> None:
    """The trained model as ``{"state_dict": ..., "meta": ...}`` (mmdet's keys, what the detector loaders
    read); ``meta`` records the architecture, classes (names and the file's category ids, label
    order) and ``model_kwargs`` to rebuild it with."""
    meta = {"architecture": options.model.partition(".")[0], "num_classes": options.num_classes,
            "class_names": list(data.class_names), "category_ids": list(data.category_ids),
            "model_kwargs": options.model_kwargs, "iterations": options.iters}
    save_file(path, {"state_dict": detector.state_dict(), "meta": meta})

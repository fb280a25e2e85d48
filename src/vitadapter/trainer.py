"""What ``train-seg`` (``vitadapter.train``) and ``train-det`` (``vitadapter.train_det``) share: one
iteration-based loop in plain PyTorch and everything around it.

AdamW with layer-wise lr decay (the model's ``group_matcher``), mmcv's poly and step schedules
after a linear warm-up, bf16 autocast on CUDA, optional gradient checkpointing, DDP when started by
``torchrun``, endless sharded sampling whose every sample carries its own augmentation seed,
``RUN_DIR/last.pth`` (weights, optimizer, schedule, iteration, RNG state, options: everything a
resumed run needs to equal an uninterrupted one) replaced atomically, the mean of every loss term
in ``RUN_DIR/log.jsonl``, and one run per folder (a lock). The task modules bring the model, the
data and what ``model.loss(*inputs)`` takes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import Sampler

from .weights.staging import append_line, folder_lock, write_atomically

CHECKPOINT = "last.pth"
FINAL = "model.pth"
LOG = "log.jsonl"

# options that may differ between a run and its resumption: where things are and how they are shown
RUNTIME = {"data_dir", "ann_file", "out", "resume", "device", "workers", "log_every", "save_every"}

T = TypeVar("T")


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


class DataError(ValueError):
    """A sample that cannot be trained on (an unreadable file, a label that is no class).

    A DataLoader worker's exception reaches the training process rebuilt from its whole traceback
    text; this keeps only the message, so the error stays one line naming the file."""

    def __init__(self, message: str):
        last = message.rstrip().splitlines()[-1] if message.strip() else message
        marker = f"{type(self).__name__}: "
        super().__init__(last.partition(marker)[2] if marker in last else message)


# ---- optimizer and schedules --------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Upstream's AdamW settings for a model (betas 0.9/0.999; ``layer_decay`` 1 for none)."""

    lr: float
    weight_decay: float
    layer_decay: float


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay groups: the stem at ``layer_decay ** (depth + 1)`` of ``lr``, ViT
    block i at ``layer_decay ** (depth - i)``, adapter and heads at ``lr`` (upstream's
    LayerDecayOptimizerConstructor). No weight decay on 1-d parameters (norms, biases) and the
    model's ``no_weight_decay`` names."""
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def _warmup(i: int, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv's linear warm-up factor at iteration ``i`` (from 0): ``warmup_ratio`` at 0, 1 from ``warmup_iters``."""
    return 1 - (1 - i / warmup_iters) * (1 - warmup_ratio) if i < warmup_iters else 1.0


def poly_schedule(optimizer: torch.optim.Optimizer, iters: int, warmup_iters: int, warmup_ratio: float = 1e-6, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """mmcv's poly policy (min lr 0) with linear warm-up, per iteration: at iteration ``i`` (from 0) a
    group's lr is its initial lr times ``(1 - i / iters) ** power``, and during the warm-up also times
    ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)``, so it starts at ``warmup_ratio``."""

    def factor(i: int) -> float:
        return (1 - min(i, iters) / iters) ** power * _warmup(i, warmup_iters, warmup_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_schedule(
    optimizer: torch.optim.Optimizer, milestones: Sequence[int], warmup_iters: int, warmup_ratio: float = 1e-3, gamma: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """mmcv's step policy with linear warm-up (mmdet's 1x/3x schedules), per iteration: from iteration
    ``milestones[k]`` (from 0) on, a group's lr is its initial lr times ``gamma ** (k + 1)``; during the
    warm-up the lr so far is scaled as in :func:`poly_schedule` (mmcv scales the regular lr)."""
    milestones = sorted(int(m) for m in milestones)

    def factor(i: int) -> float:
        return gamma ** sum(i >= m for m in milestones) * _warmup(i, warmup_iters, warmup_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- sampling ---------------------------------------------------------------------------------------


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


# ---- processes, the run's folder ----------------------------------------------------------------------


def start_processes(device_name: str) -> tuple[int, int, torch.device]:
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


def in_processes(device_name: str, body: Callable[[int, int, torch.device], T]) -> T:
    """``body(rank, world, device)`` in this process's place among ``torchrun``'s, then leave the group."""
    rank, world, device = start_processes(device_name)
    try:
        return body(rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def locked(run_dir: Path, command: str, rank: int, body: Callable[[], T]) -> T:
    """``body()``, on rank 0 holding the lock of ``run_dir`` (created if missing): a second run into
    the folder would interleave the log and overwrite the checkpoints. A folder this call created is
    removed again if the run fails while it is still empty. Other ranks write nothing: no lock."""
    if rank != 0:
        return body()
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(run_dir, f"{command} run"):
            return body()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only while empty: nothing of the run is lost
                run_dir.rmdir()
        raise


def check_writable(run_dir: Path) -> None:
    """Create the run's folder and write a file there now, not after hours of training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as e:
        raise OSError(f"--out {run_dir}: cannot write there ({e.strerror or e}): pick a folder this user can write to") from e


def prepare_model(model: nn.Module, grad_checkpointing: bool, world: int, device: torch.device) -> nn.Module:
    """The model as it trains: gradient checkpointing if asked, SyncBatchNorm across GPUs (gloo on the
    CPU keeps each process's BatchNorm), on ``device``, in train mode."""
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device).train()


class LossForward(nn.Module):
    """``model.loss(*inputs)`` as a module's forward, so DDP sees the call and synchronises gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> dict[str, torch.Tensor]:
        return self.model.loss(*inputs)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[Any],
    inputs: Callable[[Any, torch.device], Sequence[Any]],
    options: Any,
    start: int,
    rank: int,
    world: int,
    device: torch.device,
    log: Log,
    resumed_rng: Optional[dict[str, Any]] = None,
) -> None:
    """Iterations ``start + 1`` to ``options.iters`` of ``model.loss(*inputs(batch, device))`` summed over
    its terms, one batch each: AdamW step, schedule step, the terms' means logged every
    ``options.log_every`` and ``last.pth`` written by rank 0 every ``options.save_every`` iterations
    and at the end. ``resumed_rng``: the random state to continue from, set just before the loop."""
    run_dir = Path(options.out)
    step: nn.Module = LossForward(model)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" and not options.fp32 else contextlib.nullcontext()
    if resumed_rng is not None:  # last: building the model drew from it
        set_rng_state(resumed_rng, device)
    stream = iter(batches)
    for iteration in range(start + 1, options.iters + 1):
        with autocast:
            losses = step(*inputs(next(stream), device))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.add(losses)
        if iteration % options.log_every == 0 or iteration == options.iters:
            log.write(iteration, max(group["lr"] for group in optimizer.param_groups))
        if rank == 0 and (iteration % options.save_every == 0 or iteration == options.iters):
            save_checkpoint(run_dir / CHECKPOINT, model, optimizer, scheduler, iteration, options, world, device)


# ---- checkpoints --------------------------------------------------------------------------------


def save_file(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` through a staging file; a failed write (a full disk) is one line naming ``path``."""
    try:
        write_atomically(path, lambda staging: torch.save(state, staging))
    except (OSError, RuntimeError) as e:
        raise OSError(f"cannot write {path}: {' '.join(str(e).split())[:200]} (is the disk full?); "
                      f"the previous {path.name}, if any, is kept") from e


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    options: Any,
    world_size: int,
    device: torch.device,
) -> None:
    """Everything a resumed run needs, written beside ``path`` and renamed over it."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "rng": rng_state(device),
        "options": asdict(options),
        "world_size": world_size,
    }
    save_file(path, state)


def open_run(run_dir: Path, command: str, resolved: dict[str, Any], world_size: int, resume: bool,
             rank: int) -> dict[str, Any] | None:
    """The checkpoint a ``resume`` run continues from, or None for a new run, refused where a run's
    checkpoint already is; rank 0 also checks now that the folder takes files."""
    resumed = read_checkpoint(run_dir, command, resolved, world_size) if resume else None
    if resumed is None and (run_dir / CHECKPOINT).exists():
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or pick another --out")
    if rank == 0:
        check_writable(run_dir)
    return resumed


def read_checkpoint(run_dir: Path, command: str, resolved: dict[str, Any], world_size: int) -> dict[str, Any]:
    """``run_dir``'s checked ``last.pth``, refused when its run had other ``resolved`` options (those
    that change the computation) or another process count."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {run_dir} to continue from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume: cannot read {path} ({' '.join(str(e).split())[:200]})") from e
    check_checkpoint(checkpoint, path, command)
    saved = checkpoint["options"]
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in resolved.items() if k not in RUNTIME and saved.get(k) != v]
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


def check_checkpoint(checkpoint: Any, path: Path, command: str) -> None:
    """Refuse a file that is not a ``last.pth`` of ``command``, naming what is missing or of the wrong kind."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--resume: {path} is not a {command} checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    missing = [f"{key} ({what})" for key, (_, what) in _CHECKPOINT_ENTRIES.items() if key not in checkpoint]
    if missing:
        raise ValueError(f"--resume: {path} is not a {command} checkpoint: it lacks {', '.join(missing)}")
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


def load_resumed(resumed: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The weights, optimizer and schedule of a checked checkpoint; one line naming the file when they
    do not fit this run's model."""
    state = model.state_dict()
    missing = sorted(set(state) - set(resumed["model"]))
    unexpected = sorted(set(resumed["model"]) - set(state))
    shapes = [f"{k} {tuple(v.shape)} (the model's: {tuple(state[k].shape)})" for k, v in resumed["model"].items()
              if k in state and v.shape != state[k].shape]
    problems = [f"{len(missing)} weights missing, e.g. {missing[0]}" if missing else "",
                f"{len(unexpected)} unknown weights, e.g. {unexpected[0]}" if unexpected else "",
                f"other shapes: {shapes[0]}" + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else "") if shapes else ""]
    if any(problems):
        raise ValueError(f"--resume: {path} does not fit the model: {'; '.join(p for p in problems if p)}")
    model.load_state_dict(resumed["model"])
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


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG training draws from (dropout, drop path, the detectors' samplers): the data
    pipeline seeds its own."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- logging ------------------------------------------------------------------------------------------


class Log:
    """Averages of the losses over each interval (this process's batches), printed and appended to
    ``RUN_DIR/log.jsonl`` by rank 0 (``run_dir`` None on the other ranks)."""

    def __init__(self, run_dir: Optional[Path], iters: int):
        self.run_dir, self.iters = run_dir, iters
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.since = time.perf_counter()

    def start(self, line: str) -> None:
        if self.run_dir is not None:
            print(line, flush=True)
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

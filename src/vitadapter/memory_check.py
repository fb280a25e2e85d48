"""How much memory a model described by a file would take, known before it is built.

A ``config.json`` (``local-dir:``, ``hf-hub:``) can name any timm trunk (``vit_7b_patch16_dinov3``),
resize one (``img_size`` 2048 with ``patch_size`` 1: four million position embeddings) or widen the
heads; the field checks of ``config_checks`` cannot see what these add up to. The model is built on
the meta device (no memory) and run on fake tensors (shapes only) to count its parameters and find
its largest activation for one image of its input size; a model over vitadapter's parameter
ceiling, or over the memory this machine has free, is refused with the numbers before anything is
allocated. ``VITADAPTER_ALLOW_LARGE_MODELS=1`` builds it anyway.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import timm
import torch
from torch import nn

from ._meta import meta_device
from .models import Detector
from .models.config_checks import MAX_PARAMETERS
from .predict import padded_detection_size

ALLOW_ENV = "VITADAPTER_ALLOW_LARGE_MODELS"
# live activations at once, in units of the largest one (a block's input, output and residual)
_LIVE_ACTIVATIONS = 4
# above the zoo's largest: BEiT-L adapters (1.3 GB of weights) at 896 x 896, detectors at 800 x 1344
_KNOWN_WEIGHTS = 2 << 30
_KNOWN_PIXELS = 1344 * 800


def check_model_memory(source: str, config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse (``ValueError`` naming ``source`` and the numbers) the model ``create_model`` would build
    from a checked ``config.json`` (with ``kwargs``, the caller's model arguments) when it has over
    ``MAX_PARAMETERS`` parameters or would need more memory than is free here;
    ``$VITADAPTER_ALLOW_LARGE_MODELS=1`` skips the check."""
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        return
    with meta_device():
        model = timm.create_model(config["architecture"], pretrained=False, **{**config.get("model_args", {}), **kwargs})
    parameters = sum(p.numel() for p in model.parameters())
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    override = f"set {ALLOW_ENV}=1 to build it anyway"
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"{source} describes a model of {parameters / 1e9:.2f} B parameters, over vitadapter's "
                         f"ceiling of {MAX_PARAMETERS / 1e9:g} B for models from files; {override}")
    size = input_size(model, config)
    # the zoo's models are known to run at their input sizes: the fake forward (about a second) is
    # for heavier weights or larger inputs
    if weights <= _KNOWN_WEIGHTS and size[-1] * size[-2] <= _KNOWN_PIXELS:
        return
    activation = largest_activation(model, size)
    needed, free = weights + _LIVE_ACTIVATIONS * activation, available_memory()
    if free is not None and needed > free:
        raise ValueError(
            f"{source} describes a model that needs about {needed / 2**30:.1f} GiB ({parameters / 1e6:,.0f} M parameters: "
            f"{weights / 2**30:.1f} GiB; largest activation for one {size[-1]}x{size[-2]} image: {activation / 2**30:.1f} GiB), "
            f"more than the {free / 2**30:.1f} GiB of memory free here; {override}"
        )


def input_size(model: nn.Module, config: Mapping[str, Any]) -> tuple[int, ...]:
    """The (C, H, W) of the largest image ``model`` runs on: a detector resizes every image to fit its
    test scale (padded to 32), whatever its config says; other models run at their input size."""
    if isinstance(model, Detector):
        scale = model.test_scale
        return (3, *padded_detection_size(min(scale), max(scale), scale))
    return tuple(config.get("pretrained_cfg", {}).get("input_size") or model.pretrained_cfg.get("input_size") or (3, 512, 512))


def largest_activation(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Bytes of the largest tensor a module of ``model`` (built on the meta device) returns for one
    image of ``input_size`` (C, H, W), found on fake tensors. A detector runs its dense part
    (backbone, neck, RPN maps; its RoI heads see at most 1000 proposals of 7 x 7 or 14 x 14): the
    proposals' count depends on the values, which fake tensors do not have."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    largest = 0

    def record(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal largest
        for t in output if isinstance(output, (list, tuple)) else (output,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        # no_grad, not inference_mode: trunks key caches on buffers' version counters, which inference
        # tensors lack
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            model = model.to_empty(device="cpu").requires_grad_(False).eval()
            (model.dense_forward if isinstance(model, Detector) else model)(torch.empty(1, *input_size))
    finally:
        handle.remove()
    return largest


def available_memory() -> int | None:
    """Bytes of memory free for a new allocation (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

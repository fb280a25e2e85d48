"""Per-family drivers that run a timm ViT block by block between the adapter's interactions.

``driver_for(module)`` picks the driver of a module's family; ``create_trunk(name)`` builds a timm
ViT by name for the adapter. Each driver file knows one timm family and nothing else.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import timm
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..weights.fetch import fetch_weights
from . import uniperceiver  # noqa: F401  (registers Uni-Perceiver's encoders with timm)
from .base import TrunkDriver
from .beit import BeitTrunk
from .eva import EvaTrunk
from .vit import VisionTransformerTrunk, create_vit, trunk_state_from_timm

DRIVERS: dict[type, type[TrunkDriver]] = {VisionTransformer: VisionTransformerTrunk, Beit: BeitTrunk, Eva: EvaTrunk}


def driver_for(model: nn.Module, window_sizes: Optional[Sequence[Optional[int]]] = None) -> TrunkDriver:
    """The driver of ``model``'s timm family; a ``ValueError`` for anything else."""
    for cls, driver in DRIVERS.items():
        if isinstance(model, cls):
            return driver(model, window_sizes)
    families = ", ".join(f"timm {cls.__name__}" for cls in DRIVERS)
    raise ValueError(
        f"unsupported trunk {type(model).__module__}.{type(model).__name__}: the adapter drives {families} "
        "(DeiT, AugReg, DeiT3, DINOv2, BEiT, BEiTv2, EVA-02, DINOv3)"
    )


def create_trunk(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm ViT by name (``arch`` or ``arch.tag``) without its classifier; ``kwargs`` go to timm."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"trunk must be a timm model name or a timm module, got {name!r}")
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {name!r} for the trunk (see timm.list_models())")
    if timm.models.model_entrypoint(arch).__module__.endswith(".eva"):
        # rotary embeddings for any grid, not only the one they were built for
        kwargs.setdefault("dynamic_img_size", True)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained and not (overlay.get("file") or overlay.get("state_dict")):
        # timm's own download has no overall deadline: vitadapter's bounded one fetches the file
        # (into the same caches) and timm loads it from there
        overlay["file"] = str(fetch_weights({**timm.models.get_pretrained_cfg(name).to_dict(), **overlay}))
    return timm.create_model(name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay or None, **kwargs)


__all__ = [
    "BeitTrunk",
    "DRIVERS",
    "EvaTrunk",
    "TrunkDriver",
    "VisionTransformerTrunk",
    "create_trunk",
    "create_vit",
    "driver_for",
    "trunk_state_from_timm",
]

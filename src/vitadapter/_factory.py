"""``create_model`` and friends: timm's factory restricted to vitadapter's own models."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from . import models  # noqa: F401  (registers the architectures with timm)

_MODULE = "vitadapter.models.vit_adapter"


def list_models(pattern: str = "") -> list[str]:
    """Registered vitadapter architectures, optionally filtered by a glob ``pattern``."""
    return timm.list_models(pattern or "*", module=_MODULE.rsplit(".", 1)[-1])


def list_pretrained(pattern: str = "") -> list[str]:
    """``arch.tag`` names that come with weights."""
    return timm.list_pretrained(pattern or "vit_adapter_*")


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a vitadapter model by name (``arch`` or ``arch.tag``); kwargs go to the model/timm."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    arch = name.split(".", 1)[0]
    if arch not in list_models():
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(list_models())}")
    if "." in name and name not in list_pretrained():
        tags = [n for n in list_pretrained() if n.startswith(arch + ".")]
        raise ValueError(f"unknown weight tag in {name!r}; {arch} has: {', '.join(tags) or 'no tags yet'}")
    if pretrained and name not in list_pretrained() and not kwargs.get("pretrained_cfg_overlay"):
        raise ValueError(
            f"no pretrained weights are registered for {name!r} yet; "
            "use pretrained=False, or load upstream weights with vitadapter.load_upstream"
        )
    return timm.create_model(name, pretrained=pretrained, **kwargs)

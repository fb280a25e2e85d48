"""``create_model`` and friends: timm's factory restricted to vitadapter's own models."""
from __future__ import annotations

from typing import Any

import timm
from timm.models import parse_model_name
from torch import nn

from . import hub, models  # noqa: F401  (models registers the architectures with timm)
from .config_checks import check_config_json
from .memory_check import check_model_memory


def list_models(pattern: str = "") -> list[str]:
    """Registered vitadapter architectures, optionally filtered by a glob ``pattern``."""
    return list_models_of(models.FAMILY_MODULES, pattern)


def list_models_of(modules: tuple[str, ...], pattern: str = "") -> list[str]:
    """The architectures registered by ``modules`` (e.g. ``models.SEGMENTOR_MODULES``)."""
    return sorted({name for module in modules for name in timm.list_models(pattern or "*", module=module)})


def list_pretrained(pattern: str = "") -> list[str]:
    """``arch.tag`` names that come with weights."""
    ours = set(list_models())
    return [name for name in timm.list_pretrained(pattern or "*") if name.split(".", 1)[0] in ours]


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``create_model`` that shape the model, not where its weights come from."""
    return {k: v for k, v in kwargs.items() if k not in ("cache_dir", "timeout", "pretrained_cfg_overlay", "pretrained_cfg")}


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a vitadapter model by name; kwargs go to the model/timm.

    ``name`` is ``arch`` (its default tag's weights when ``pretrained``), ``arch.tag``,
    ``local-dir:FOLDER`` or ``hf-hub:org/name`` (folders written by ``save_pretrained``).
    ``pretrained_cfg_overlay=dict(file=PATH)`` loads a local file instead of the tag's source.
    ``timeout=SECONDS`` bounds each download (default: $VITADAPTER_DOWNLOAD_TIMEOUT or one hour).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    source, _ = parse_model_name(name)
    if source is not None:
        config = hub.read_config(name, kwargs.get("cache_dir"), kwargs.get("timeout"))
        architecture = config.get("architecture")
        if not isinstance(architecture, str) or architecture not in list_models():
            known = ", ".join(list_models())
            raise ValueError(f"{name} holds a {architecture!r} model, not a vitadapter architecture ({known})")
        segmentor = architecture in list_models_of(models.SEGMENTOR_MODULES)
        check_config_json(config, f"{name} {hub.CONFIG_NAME}", segmentor=segmentor)
        check_model_memory(f"{name} {hub.CONFIG_NAME}", config, _model_kwargs(kwargs))
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    arch = name.split(".", 1)[0]
    if arch not in list_models():
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(list_models())}")
    if "." in name and name not in list_pretrained():
        tags = [n for n in list_pretrained() if n.startswith(arch + ".")]
        raise ValueError(f"unknown weight tag in {name!r}; {arch} has: {', '.join(tags)}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)

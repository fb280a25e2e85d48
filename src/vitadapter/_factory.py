"""``create_model`` and friends: timm's factory restricted to vitadapter's own models."""
from __future__ import annotations

from typing import Any, Optional

import timm
from timm.models import parse_model_name
from torch import nn

from . import hub, models  # noqa: F401  (models registers the architectures with timm)
from .memory_check import check_model_memory
from .weights.staging import read_consistently


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
    source, location = parse_model_name(name)
    if source == "local-dir" and pretrained:
        # another process may re-save the folder meanwhile: build again until one save's files were read
        failure = (f"{name}: its {hub.CONFIG_NAME} and {hub.WEIGHTS_NAME} came from different saves in 5 reads: another "
                   "process is saving into it (load it once that is done), or a save was interrupted or the files were "
                   "put together from two saves (save the model again)")
        return read_consistently(lambda: _from_folder(name, location, **kwargs), failure)
    if source is not None:
        config, origin = _checked_config(name, **kwargs)
        return hub.create_from_config(config, origin, pretrained=pretrained, **kwargs)
    arch = name.split(".", 1)[0]
    if arch not in list_models():
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(list_models())}")
    if "." in name and name not in list_pretrained():
        tags = [n for n in list_pretrained() if n.startswith(arch + ".")]
        raise ValueError(f"unknown weight tag in {name!r}; {arch} has: {', '.join(tags)}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _checked_config(name: str, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config.json of a ``local-dir:`` or ``hf-hub:`` folder, checked before anything is built, and
    where its weights are. Read once: the model is built from the dict that was checked."""
    config, origin = hub.read_config(name, kwargs.get("cache_dir"), kwargs.get("timeout"))
    label = f"{name} {hub.CONFIG_NAME}"
    hub.check_config(config, label)
    check_model_memory(label, config, _model_kwargs(kwargs))
    return config, origin


def _from_folder(name: str, folder: str, **kwargs: Any) -> Optional[nn.Module]:
    """The model of a ``local-dir:`` folder with its weights, or None where the files it was built
    from came from different saves (another process saved into the folder meanwhile)."""
    config, origin = _checked_config(name, **kwargs)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file") or overlay.get("state_dict"):  # the weights come from elsewhere
        return hub.create_from_config(config, origin, pretrained=True, **kwargs)
    try:
        model = hub.create_from_config(config, origin, pretrained=True, **kwargs)
    except Exception:
        if hub.saved_together(folder, config):
            raise
        return None  # the files of two saves do not fit together
    return model if hub.saved_together(folder, config) else None

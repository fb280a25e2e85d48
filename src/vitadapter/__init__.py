"""vitadapter: ViT-Adapter feature pyramids on real timm ViTs, in pure PyTorch.

Importing the package costs nothing (the ``vitadapter`` command answers ``--help`` without torch):
each public name loads its module on first use, and the models join timm's registry as soon as timm
itself is imported, so ``import vitadapter`` before or after ``import timm`` both make
``timm.create_model("vit_adapter_b")`` work.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ViTAdapter": "models",
    "create_model": "_factory",
    "list_models": "_factory",
    "list_pretrained": "_factory",
    "load_upstream": "models.from_upstream",
    "load_upstream_segmentor": "models.from_upstream",
    "load_upstream_detector": "models.from_upstream",
    "Detector": "models",
    "Segmentor": "models",
    "ms_deform_attn": "layers.msda_op",
    "push_to_hub": "hub",
    "save_pretrained": "hub",
}
_SUBPACKAGES = (
    "converters", "data", "detection", "heads", "hub", "integrations", "kernels", "layers", "models", "trunks", "upstream",
    "visualize", "weights",
)
# modules that do not import torch (what the command needs to start)
_LIGHT = ("catalog", "cli")

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ._factory import create_model, list_models, list_pretrained
    from .hub import push_to_hub, save_pretrained
    from .layers.msda_op import ms_deform_attn
    from .models import Detector, Segmentor, ViTAdapter
    from .models.from_upstream import load_upstream, load_upstream_detector, load_upstream_segmentor


def __getattr__(name: str) -> Any:
    if name in _LIGHT:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS and name not in _SUBPACKAGES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # The models first: whatever is used, the architectures are in timm's registry after it.
    importlib.import_module(f"{__name__}.models")
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES) | set(_LIGHT))


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is about to load, it wraps timm's own loader so that the
    models register right after timm's ``__init__`` has run, and then steps out of the import system.

    When one of vitadapter's own modules is what imports timm, the models cannot load in the middle
    of it (they import that very module); that import either leads to the models itself or, like
    ``import vitadapter.layers``, needs no registry.
    """

    searching = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        # Other code may only look timm up (transformers' ``is_timm_available`` does): the finder
        # stays in place until timm really loads.
        if fullname != "timm" or self.searching:
            return None
        self.searching = True
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self.searching = False
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_timm(module)
            if not _importing_own_module():
                importlib.import_module(f"{__name__}.models")

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _importing_own_module() -> bool:
    # the flag the import system itself sets while a module's code runs
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith(f"{__name__}.")
    )


if "timm" in sys.modules:
    importlib.import_module(f"{__name__}.models")
else:
    sys.meta_path.insert(0, _RegisterWithTimm())

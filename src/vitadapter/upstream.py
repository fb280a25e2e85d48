"""Upstream ViT-Adapter's configs and checkpoints, the names users import from ``vitadapter.upstream``.

The work lives in its layers: reading files in ``weights.read``, translating configs and keys in
``converters.backbone``, building and loading models in ``models.from_upstream`` and
``models.checkpoints``.
"""
from .converters.backbone import CODEBASES, Conversion, convert_checkpoint, upstream_kwargs
from .models.checkpoints import load_checkpoint
from .models.from_upstream import load_upstream, model_kwargs
from .weights.read import InertGlobal, check_state_dict, read_checkpoint

__all__ = [
    "CODEBASES", "Conversion", "InertGlobal", "check_state_dict", "convert_checkpoint", "load_checkpoint",
    "load_upstream", "model_kwargs", "read_checkpoint", "upstream_kwargs",
]

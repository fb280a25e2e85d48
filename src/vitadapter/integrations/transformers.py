"""vitadapter as the backbone of transformers' dense-prediction models (UperNet, Mask2Former, ...).

    import vitadapter
    from transformers import UperNetConfig, UperNetForSemanticSegmentation
    from vitadapter.integrations.transformers import backbone_config

    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config("vit_adapter_b"), num_labels=150))

transformers builds the backbone through timm's registry (``TimmBackbone``), which knows the models
once ``vitadapter`` is imported. Two settings matter: the backbone goes in ``backbone_config`` (a
bare ``backbone="vit_adapter_b"`` on the model's config is looked up on the Hugging Face Hub as a
transformers checkpoint), and ``out_indices`` must name the four levels 0-3 (some models default to
five stages, e.g. DETR's ``(1, 2, 3, 4)``).
"""
from __future__ import annotations

from typing import Any, Sequence

from transformers import TimmBackboneConfig


def backbone_config(
    name: str, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: bool = False, **kwargs: Any
) -> TimmBackboneConfig:
    """The ``TimmBackboneConfig`` of a vitadapter model: levels ``out_indices`` (0 = stride 4 ...
    3 = stride 32), timm weights when ``pretrained`` (downloads them), other ``TimmBackboneConfig``
    fields from ``kwargs``. A subset of levels prunes the rest (no unused parameters)."""
    bad = [i for i in out_indices if i not in range(4)]
    if bad or not out_indices:
        raise ValueError(f"out_indices must pick among the levels 0-3 (strides 4-32), got {tuple(out_indices)}")
    return TimmBackboneConfig(backbone=name, out_indices=tuple(out_indices), use_pretrained_backbone=pretrained, **kwargs)

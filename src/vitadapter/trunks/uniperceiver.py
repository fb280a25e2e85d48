"""Uni-Perceiver's encoder as the timm ``VisionTransformer`` it is (driven by ``VisionTransformerTrunk``).

Upstream's ``UnifiedBertEncoder`` is a ViT in BERT's clothes: pre-norm blocks with layer scale and
q/k/v biases, exact GELU, LayerNorm eps 1e-5, no cls token, no final norm, and a LayerNorm after the
embedding (timm's ``pre_norm``). Its position table covers the ``img_size`` grid and is resized
bicubic to the image's grid every forward, as timm's ``pos_embed`` is here; its temporal position
row 0, added to every token, is folded into that table by the converter (a constant row commutes
with the resize: bicubic weights sum to one). Registered with timm, so ``trunk=NAME`` and
``config.json`` rebuild it by name; the weights come from vitadapter's tags (``converters.uniperceiver``).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

class UniPerceiverEncoder(VisionTransformer):
    """timm's ``VisionTransformer``, marked as Uni-Perceiver's: its windowed attention (upstream's
    detection flavour) zero-pads the tokens of partial windows before the q/k/v projection."""


def _patch_embed(*args: Any, bias: bool = True, **kwargs: Any) -> PatchEmbed:
    # timm drops the projection's bias whenever pre_norm is on (CLIP has none); Uni-Perceiver's has one
    return PatchEmbed(*args, bias=True, **kwargs)


# what every Uni-Perceiver encoder shares; sizes and img_size (the position table's grid) vary
_FIXED = dict(
    patch_size=16,  # upstream divides by 16 wherever it computes the grid
    qkv_bias=True,
    init_values=1.0,  # layer scale exists; its values come from checkpoints
    class_token=False,
    global_pool="",
    pre_norm=True,
    final_norm=False,
    dynamic_img_size=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-5),
    embed_layer=_patch_embed,
)

default_cfgs = generate_default_cfgs({
    # weights: vitadapter's uniperceiver_adapter_* tags (upstream's converted files, upstream key layout)
    "vit_base_patch16_uniperceiver": {"num_classes": 0, "input_size": (3, 224, 224)},
    "vit_large_patch16_uniperceiver": {"num_classes": 0, "input_size": (3, 224, 224)},
})


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> UniPerceiverEncoder:
    fixed = sorted(k for k in _FIXED if k in kwargs and kwargs[k] != _FIXED[k])
    if fixed:
        raise ValueError(f"{variant}: {', '.join(fixed)} are fixed by Uni-Perceiver's encoder")
    kwargs.setdefault("img_size", 224)
    return build_model_with_cfg(UniPerceiverEncoder, variant, pretrained, **dict(kwargs, **_FIXED))


@register_model
def vit_base_patch16_uniperceiver(pretrained: bool = False, **kwargs: Any) -> UniPerceiverEncoder:
    """Uni-Perceiver-B's encoder: 12 blocks, 768 wide, 12 heads, 14x14 position table."""
    return _create("vit_base_patch16_uniperceiver", pretrained, dict(dict(embed_dim=768, depth=12, num_heads=12), **kwargs))


@register_model
def vit_large_patch16_uniperceiver(pretrained: bool = False, **kwargs: Any) -> UniPerceiverEncoder:
    """Uni-Perceiver-L's encoder: 24 blocks, 1024 wide, 16 heads, 14x14 position table."""
    return _create("vit_large_patch16_uniperceiver", pretrained, dict(dict(embed_dim=1024, depth=24, num_heads=16), **kwargs))

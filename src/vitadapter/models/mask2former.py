"""Mask2Former segmentors on BEiT-Adapter-L: upstream's best released segmentation models, whole.

``create_model("mask2former_beit_adapter_l.ade20k", pretrained=True)`` loads the release (backbone,
pixel decoder, transformer decoder); tags of one architecture differ in their dataset (classes,
test scale). Without weights the architectures take ``num_classes=`` and ``num_queries=`` for
fine-tuning; other keyword arguments go to the backbone.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from ..heads import Mask2FormerHead
from .segmentor import CITYSCAPES, COCO_STUFF, Segmentor, create_segmentor, release
from .vit_adapter import _upstream

_SEG = "segmentation/configs/{}.py"

default_cfgs = generate_default_cfgs({
    "mask2former_beit_adapter_l.ade20k": release("beit_adapter_l.mask2former_ade20k", (640, 2048)),
    "mask2former_beit_adapter_l_896.coco_ade20k": release("beit_adapter_l_896.mask2former_coco_ade20k", (896, 3584)),
    "mask2former_beit_adapter_l_896.cocostuff164k": _upstream(
        "v0.2.6/mask2former_beit_adapter_large_896_80k_cocostuff164k.zip",
        _SEG.format("coco_stuff164k/mask2former_beit_adapter_large_896_80k_cocostuff164k_ss"),
        "COCO-Stuff-164k val mIoU 51.7 (SS) / 52.0 (MS), Mask2Former 80k",
        input_size=(3, 896, 896), test_input_size=(3, 896, 3584), **COCO_STUFF,
    ),
    "mask2former_beit_adapter_l_896.cityscapes": _upstream(
        "v0.2.3/mask2former_beit_adapter_large_896_80k_cityscapes.zip",
        _SEG.format("cityscapes/mask2former_beit_adapter_large_896_80k_cityscapes_ss"),
        "Cityscapes val mIoU 84.9 (SS) / 85.8 (MS), Mask2Former 80k from Mapillary",
        input_size=(3, 896, 896), test_input_size=(3, 1024, 2048), **CITYSCAPES,
    ),
    "mask2former_beit_adapter_l_512.cocostuff10k": release(
        "beit_adapter_l_512.mask2former_cocostuff10k", (512, 2048), **COCO_STUFF
    ),
    "mask2former_beit_adapter_b_512.cocostuff10k": release(
        "beit_adapter_b_512.mask2former_cocostuff10k", (512, 2048), **COCO_STUFF
    ),
    "mask2former_beitv2_adapter_l_896.coco_ade20k": release("beitv2_adapter_l_896.mask2former_coco_ade20k", (896, 3584)),
    "mask2former_beitv2_adapter_l_896.cocostuff164k": _upstream(
        "v0.3.1/mask2former_beitv2_adapter_large_896_80k_cocostuff164k.zip",
        _SEG.format("coco_stuff164k/mask2former_beitv2_adapter_large_896_80k_cocostuff164k_ss"),
        "COCO-Stuff-164k val mIoU 52.3 (SS), Mask2Former 80k",
        input_size=(3, 896, 896), test_input_size=(3, 896, 3584), **COCO_STUFF,
    ),
})

# queries of each release where they differ from the architecture's own default
_QUERIES = {"cityscapes": 100}


# upstream's Mask2Former recipes by backbone size: pixel-decoder and transformer-decoder width, heads
# (both), encoder and decoder FFN widths
_LARGE = dict(feat_channels=1024, out_channels=1024, encoder_heads=32, decoder_heads=32,
              encoder_ffn_channels=4096, decoder_ffn_channels=4096)
_BASE = dict(feat_channels=256, out_channels=256, encoder_heads=8, decoder_heads=8,
             encoder_ffn_channels=1024, decoder_ffn_channels=2048)


def _create_mask2former(
    variant: str, backbone: str, pretrained: bool, kwargs: dict[str, Any], queries: int, crop: int, stride: int,
    recipe: dict[str, int] = _LARGE,
) -> Segmentor:
    """Upstream's Mask2Former: a pixel decoder of 6 deformable-attention layers and a transformer
    decoder of 9 layers at the recipe's widths, GroupNorm of 32 groups."""
    num_queries = kwargs.pop("num_queries", None)
    head_args: dict[str, Any] = {}  # the queries depend on the tag: known once the heads are built

    def heads(width: int, num_classes: int, cfg: Any) -> tuple[Mask2FormerHead, None]:
        head_args["num_queries"] = num_queries or _QUERIES.get(cfg.tag, queries)
        head = Mask2FormerHead(
            [width] * 4, num_classes=num_classes, num_queries=head_args["num_queries"],
            encoder_layers=6, encoder_points=4, decoder_layers=9, num_groups=32, **recipe,
        )
        return head, None

    return create_segmentor(variant, backbone, pretrained, kwargs, heads, crop, stride, head_args)


@register_model
def mask2former_beit_adapter_l(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """Mask2Former (100 queries) on BEiT-Adapter-L, 640 crops every 426 pixels."""
    return _create_mask2former("mask2former_beit_adapter_l", "beit_adapter_l", pretrained, kwargs, 100, 640, 426)


@register_model
def mask2former_beit_adapter_l_512(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """Mask2Former (100 queries) on BEiT-Adapter-L with 512-px tables, 512 crops every 341 pixels."""
    return _create_mask2former("mask2former_beit_adapter_l_512", "beit_adapter_l_512", pretrained, kwargs, 100, 512, 341)


@register_model
def mask2former_beit_adapter_b_512(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """Mask2Former (100 queries, 256 wide) on BEiT-Adapter-B, 512 crops every 341 pixels."""
    return _create_mask2former(
        "mask2former_beit_adapter_b_512", "beit_adapter_b_512", pretrained, kwargs, 100, 512, 341, recipe=_BASE
    )


@register_model
def mask2former_beit_adapter_l_896(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """Mask2Former (200 queries; 100 for Cityscapes) on BEiT-Adapter-L, 896 crops every 512 pixels."""
    return _create_mask2former("mask2former_beit_adapter_l_896", "beit_adapter_l_896", pretrained, kwargs, 200, 896, 512)


@register_model
def mask2former_beitv2_adapter_l_896(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """Mask2Former (200 queries) on BEiTv2-Adapter-L, 896 crops every 512 pixels."""
    return _create_mask2former("mask2former_beitv2_adapter_l_896", "beitv2_adapter_l_896", pretrained, kwargs, 200, 896, 512)

"""UperNet segmentors on ViT-Adapter backbones: upstream's ADE20K models, whole (backbone and heads).

``create_model("upernet_vit_adapter_b.deit_ade20k", pretrained=True)`` loads one of upstream's
released segmentation checkpoints as it is: the backbone converted, the UPerHead and the FCN
auxiliary head as trained. Without weights the same architectures take ``num_classes=`` for
fine-tuning; ``pretrained_backbone=True`` then starts the backbone from its ImageNet trunk (what
upstream trains from). ``head_channels`` / ``aux_channels`` set the UPerHead's and the FCN head's
widths (upstream's 512 or 1024, and 256, by default). Other keyword arguments go to the backbone
(``drop_path_rate``, ...).
"""
from __future__ import annotations

from typing import Any, Optional

from timm.models import generate_default_cfgs, register_model

from ..heads import FCNHead, UPerHead
from .segmentor import COCO_STUFF, Segmentor, create_segmentor, release
from .vit_adapter import _upstream


default_cfgs = generate_default_cfgs({
    "upernet_vit_adapter_t.augreg_ade20k": release("vit_adapter_t.augreg_upernet_ade20k", (512, 2048)),
    "upernet_vit_adapter_s.deit_ade20k": release("vit_adapter_s.deit_upernet_ade20k", (512, 2048)),
    "upernet_vit_adapter_b.deit_ade20k": release("vit_adapter_b.deit_upernet_ade20k", (512, 2048)),
    "upernet_vit_adapter_b_384.augreg_ade20k": release("vit_adapter_b_384.augreg_upernet_ade20k", (512, 2048)),
    "upernet_vit_adapter_l.augreg_ade20k": release("vit_adapter_l.augreg_upernet_ade20k", (512, 2048)),
    "upernet_uniperceiver_adapter_l.ade20k": release("uniperceiver_adapter_l.upernet_ade20k", (512, 2048)),
    "upernet_beit_adapter_l.ade20k": release("beit_adapter_l.upernet_ade20k", (640, 2048)),
    "upernet_beit_adapter_l.cocostuff164k": _upstream(
        "v0.2.6/upernet_beit_adapter_large_640_80k_cocostuff164k.pth.tar",
        "segmentation/configs/coco_stuff164k/upernet_beit_adapter_large_640_80k_cocostuff164k_ss.py",
        "COCO-Stuff-164k val mIoU 50.5 (SS) / 50.7 (MS), UperNet 80k",
        input_size=(3, 640, 640), test_input_size=(3, 640, 2560), **COCO_STUFF,
    ),
    "upernet_beit_adapter_l_512.cocostuff10k": release(
        "beit_adapter_l_512.upernet_cocostuff10k", (512, 2048), **COCO_STUFF
    ),
})


def _create_upernet(
    variant: str, backbone: str, pretrained: bool, kwargs: dict[str, Any], channels: int = 512, crop: int = 512, stride: int = 341
) -> Segmentor:
    """Upstream's UperNet recipe on ``backbone``: UPerHead on all four levels, FCNHead (256 wide,
    loss weight 0.4) on the stride-16 level; ``auxiliary_head=False`` leaves the latter out."""
    auxiliary = kwargs.pop("auxiliary_head", True)
    # the heads' widths: upstream's by default; narrower ones make small models for quick experiments
    channels, aux_channels = kwargs.pop("head_channels", channels), kwargs.pop("aux_channels", 256)

    def heads(width: int, num_classes: int, cfg: Any) -> tuple[UPerHead, Optional[FCNHead]]:
        decode_head = UPerHead([width] * 4, channels=channels, num_classes=num_classes)
        return decode_head, FCNHead(width, channels=aux_channels, num_classes=num_classes, in_index=2) if auxiliary else None

    head_args = dict(head_channels=channels, aux_channels=aux_channels, auxiliary_head=auxiliary)
    return create_segmentor(variant, backbone, pretrained, kwargs, heads, crop, stride, head_args)


@register_model
def upernet_vit_adapter_t(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet on ViT-Adapter-T (AugReg-T trunk in upstream's release), ADE20K 512 crops."""
    return _create_upernet("upernet_vit_adapter_t", "vit_adapter_t", pretrained, kwargs)


@register_model
def upernet_vit_adapter_s(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet on ViT-Adapter-S (DeiT-S trunk), ADE20K 512 crops."""
    return _create_upernet("upernet_vit_adapter_s", "vit_adapter_s", pretrained, kwargs)


@register_model
def upernet_vit_adapter_b(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet on ViT-Adapter-B (DeiT-B trunk, 224-px position grid), ADE20K 512 crops."""
    return _create_upernet("upernet_vit_adapter_b", "vit_adapter_b", pretrained, kwargs)


@register_model
def upernet_vit_adapter_b_384(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet on ViT-Adapter-B (AugReg-B trunk, 384-px position grid), ADE20K 512 crops."""
    return _create_upernet("upernet_vit_adapter_b_384", "vit_adapter_b_384", pretrained, kwargs)


@register_model
def upernet_vit_adapter_l(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet on ViT-Adapter-L (AugReg-L trunk), ADE20K 512 crops."""
    return _create_upernet("upernet_vit_adapter_l", "vit_adapter_l", pretrained, kwargs)


@register_model
def upernet_uniperceiver_adapter_l(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet on ViT-Adapter-L (Uni-Perceiver-L encoder), ADE20K 512 crops."""
    return _create_upernet("upernet_uniperceiver_adapter_l", "uniperceiver_adapter_l", pretrained, kwargs)


@register_model
def upernet_beit_adapter_l_512(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet (1024 wide) on BEiT-Adapter-L with 512-px tables, 512 crops every 341 pixels (COCO-Stuff-10k)."""
    return _create_upernet("upernet_beit_adapter_l_512", "beit_adapter_l_512", pretrained, kwargs, channels=1024)


@register_model
def upernet_beit_adapter_l(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet (1024 wide) on BEiT-Adapter-L, 640 crops, windows every 426 pixels."""
    return _create_upernet("upernet_beit_adapter_l", "beit_adapter_l", pretrained, kwargs, channels=1024, crop=640, stride=426)

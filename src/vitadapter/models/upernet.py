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

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._registry import get_pretrained_cfg

from ..data import ade20k
from ..heads import FCNHead, UPerHead
from .segmentor import Segmentor

_ADE20K = dict(num_classes=150, label_names=ade20k.CLASSES)


def _release(backbone_tag: str, **kwargs: Any) -> dict[str, Any]:
    """The whole model of the release file a backbone tag already points at (one file, one entry)."""
    cfg = get_pretrained_cfg(backbone_tag).to_dict()
    keep = ("url", "origin_url", "notes", "mean", "std", "input_size", "license")
    return dict({k: cfg[k] for k in keep if cfg.get(k) is not None}, **_ADE20K, **kwargs)


default_cfgs = generate_default_cfgs({
    "upernet_vit_adapter_t.augreg_ade20k": _release("vit_adapter_t.augreg_upernet_ade20k"),
    "upernet_vit_adapter_s.deit_ade20k": _release("vit_adapter_s.deit_upernet_ade20k"),
    "upernet_vit_adapter_b.deit_ade20k": _release("vit_adapter_b.deit_upernet_ade20k"),
    "upernet_vit_adapter_b_384.augreg_ade20k": _release("vit_adapter_b_384.augreg_upernet_ade20k"),
    "upernet_vit_adapter_l.augreg_ade20k": _release("vit_adapter_l.augreg_upernet_ade20k"),
    "upernet_beit_adapter_l.ade20k": _release("beit_adapter_l.upernet_ade20k"),
})


def _create_upernet(
    variant: str,
    backbone: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    channels: int = 512,
    crop: int = 512,
    stride: int = 341,
) -> Segmentor:
    """Upstream's UperNet recipe on ``backbone``: UPerHead on all four levels, FCNHead (256 wide,
    loss weight 0.4) on the stride-16 level, sliding-window inference over ``crop`` every ``stride``."""
    cache_dir, timeout = kwargs.pop("cache_dir", None), kwargs.pop("timeout", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), overlay)
    pretrained_backbone = kwargs.pop("pretrained_backbone", False)
    auxiliary = kwargs.pop("auxiliary_head", True)
    # the heads' widths: upstream's by default; narrower ones make small models for quick experiments
    channels, aux_channels = kwargs.pop("head_channels", channels), kwargs.pop("aux_channels", 256)

    def build(num_classes: int = 150, **backbone_kwargs: Any) -> Segmentor:
        backbone_kwargs.pop("global_pool", None)
        net = timm.create_model(backbone, pretrained=pretrained_backbone, **backbone_kwargs)
        width = net.feature_info[0]["num_chs"]
        decode_head = UPerHead([width] * 4, channels=channels, num_classes=num_classes)
        auxiliary_head = FCNHead(width, channels=aux_channels, num_classes=num_classes, in_index=2) if auxiliary else None
        names = ade20k.CLASSES if num_classes == len(ade20k.CLASSES) else None
        segmentor = Segmentor(net, decode_head, auxiliary_head, "slide", crop, stride, class_names=names)
        if pretrained:
            _load_release(segmentor, cfg.to_dict(), cache_dir, timeout)
        return segmentor

    return build_model_with_cfg(build, variant, False, pretrained_cfg=cfg, **kwargs)


def _load_release(segmentor: Segmentor, cfg: dict[str, Any], cache_dir: Optional[str], timeout: Optional[float]) -> None:
    from ..converters.mmseg import load_segmentor_checkpoint
    from ..hub import fetch_weights, read_weights

    checkpoint = read_weights(fetch_weights(cfg, cache_dir, timeout))
    load_segmentor_checkpoint(segmentor, checkpoint, keep_classifier=False)


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
def upernet_beit_adapter_l(pretrained: bool = False, **kwargs: Any) -> Segmentor:
    """UperNet (1024 wide) on BEiT-Adapter-L, ADE20K 640 crops, windows every 426 pixels."""
    return _create_upernet("upernet_beit_adapter_l", "beit_adapter_l", pretrained, kwargs, channels=1024, crop=640, stride=426)

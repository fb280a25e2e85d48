"""ViT-Adapter-L on BEiT and BEiTv2 trunks (timm ``Beit``): upstream's best dense-prediction models.

Segmentation flavours carry the cls token through every block group and size the relative position
tables for the training crop (640 or 896 px, a 40 or 56 grid); the detection flavour has no cls token
and attends within 14-token windows, every sixth block within 56. Tags: the ImageNet trunk timm
publishes (a fresh adapter, as upstream starts) and the backbones of upstream's released dense
checkpoints (links from upstream's segmentation and detection READMEs; heads are dropped on load).
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .vit_adapter import ViTAdapter, _create_vit_adapter, _trunk, _upstream

_SEG_METRIC = "ADE20K val mIoU {} (SS) / {} (MS)"

default_cfgs = generate_default_cfgs({
    "beit_adapter_l.in22k_ft_in22k": _trunk("timm/beit_large_patch16_224.in22k_ft_in22k", input_size=(3, 640, 640)),
    "beit_adapter_l.upernet_ade20k": _upstream(
        "v0.2.1/upernet_beit_adapter_large_640_160k_ade20k.pth.tar",
        "segmentation/configs/ade20k/upernet_beit_adapter_large_640_160k_ade20k_ss.py",
        _SEG_METRIC.format(58.0, 58.4) + ", UperNet 160k", input_size=(3, 640, 640),
    ),
    "beit_adapter_l.mask2former_ade20k": _upstream(
        "v0.2.2/mask2former_beit_adapter_large_640_160k_ade20k.zip",
        "segmentation/configs/ade20k/mask2former_beit_adapter_large_640_160k_ade20k_ss.py",
        _SEG_METRIC.format(58.3, 59.0) + ", Mask2Former 160k", input_size=(3, 640, 640),
    ),
    "beit_adapter_l_512.in22k_ft_in22k": _trunk("timm/beit_large_patch16_224.in22k_ft_in22k", input_size=(3, 512, 512)),
    "beit_adapter_l_512.upernet_cocostuff10k": _upstream(
        "v0.2.4/upernet_beit_adapter_large_512_80k_cocostuff10k.pth.tar",
        "segmentation/configs/coco_stuff10k/upernet_beit_adapter_large_512_80k_cocostuff10k_ss.py",
        "COCO-Stuff-10k mIoU 51.0 (SS) / 51.4 (MS), UperNet 80k", input_size=(3, 512, 512),
    ),
    "beit_adapter_l_512.mask2former_cocostuff10k": _upstream(
        "v0.2.5/mask2former_beit_adapter_large_512_40k_cocostuff10k.zip",
        "segmentation/configs/coco_stuff10k/mask2former_beit_adapter_large_512_40k_cocostuff10k_ss.py",
        "COCO-Stuff-10k mIoU 53.2 (SS) / 54.2 (MS), Mask2Former 40k", input_size=(3, 512, 512),
    ),
    "beit_adapter_b_512.in22k_ft_in22k": _trunk("timm/beit_base_patch16_224.in22k_ft_in22k", input_size=(3, 512, 512)),
    "beit_adapter_b_512.mask2former_cocostuff10k": _upstream(
        "v0.2.9/mask2former_beit_adapter_base_512_40k_cocostuff10k.pth.tar",
        "segmentation/configs/coco_stuff10k/mask2former_beit_adapter_base_512_40k_cocostuff10k_ss.py",
        "COCO-Stuff-10k mIoU 50.0 (SS) / 50.5 (MS), Mask2Former 40k", input_size=(3, 512, 512),
    ),
    "beit_adapter_l_896.in22k_ft_in22k": _trunk("timm/beit_large_patch16_224.in22k_ft_in22k", input_size=(3, 896, 896)),
    "beit_adapter_l_896.mask2former_coco_ade20k": _upstream(
        "v0.2.0/mask2former_beit_adapter_large_896_80k_ade20k.zip",
        "segmentation/configs/ade20k/mask2former_beit_adapter_large_896_80k_ade20k_ss.py",
        _SEG_METRIC.format(59.4, 60.5) + ", Mask2Former 80k from COCO-Stuff", input_size=(3, 896, 896),
    ),
    "beitv2_adapter_l_896.in1k_ft_in22k": _trunk("timm/beitv2_large_patch16_224.in1k_ft_in22k", input_size=(3, 896, 896)),
    "beitv2_adapter_l_896.mask2former_coco_ade20k": _upstream(
        "v0.3.1/mask2former_beitv2_adapter_large_896_80k_ade20k.zip",
        "segmentation/configs/ade20k/mask2former_beitv2_adapter_large_896_80k_ade20k_ss.py",
        _SEG_METRIC.format(61.2, 61.5) + ", Mask2Former 80k from COCO-Stuff", input_size=(3, 896, 896),
    ),
    "beit_adapter_l_det.in22k_ft_in22k": _trunk("timm/beit_large_patch16_224.in22k_ft_in22k", input_size=(3, 1024, 1024)),
    "beit_adapter_l_det.htc_coco": _upstream(
        "0.3.0/htc++_beit_adapter_large_fpn_3x_coco.pth.tar",
        "detection/configs/htc++/htc++_beit_adapter_large_fpn_3x_coco.py",
        "COCO val box AP 58.4 / mask AP 50.8, HTC++ 3x+MS", input_size=(3, 1024, 1024),
    ),
    "beitv2_adapter_l_det.in1k_ft_in22k": _trunk("timm/beitv2_large_patch16_224.in1k_ft_in22k", input_size=(3, 1024, 1024)),
    "beitv2_adapter_l_det.htc_coco": _upstream(
        "v0.3.1/htc++_beitv2_adapter_large_fpn_3x_coco.pth",
        "detection/configs/htc++/htc++_beitv2_adapter_large_fpn_3x_coco.py",
        "COCO val box AP 58.8 / mask AP 51.1, HTC++ 3x+MS", input_size=(3, 1024, 1024),
    ),
    "beitv2_adapter_l_det.htc_o365_coco": _upstream(
        "v0.3.1/htc++_beitv2_adapter_large_fpn_o365_coco.pth",
        "detection/configs/htc++/htc++_beitv2_adapter_large_fpn_o365_coco.py",
        "COCO val box AP 61.8 / mask AP 53.0, HTC++ Objects365 then COCO 20k iterations", input_size=(3, 1024, 1024),
    ),
})

# BEiT-L as upstream's configs write it: layer scale 1e-6 (also the injectors' gamma init), q/v biases
_BEIT_L = dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True, init_values=1e-6,
               use_abs_pos_emb=False, use_rel_pos_bias=True)
_ADAPTER_L = dict(conv_inplane=64, n_points=4, deform_num_heads=16, deform_ratio=0.5, cffn_ratio=0.25,
                  init_values=1e-6, interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]])
# BEiT-B as upstream's configs write it, and its adapter (ViT-Adapter-B's, with BEiT's layer scale)
_BEIT_B = dict(_BEIT_L, embed_dim=768, depth=12, num_heads=12)
_ADAPTER_B = dict(_ADAPTER_L, deform_num_heads=12, interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]])
# 14-token windows, the last block of every group attends within 56
_DET_WINDOWS = ([14] * 5 + [56]) * 4


def _beit(variant: str, trunk: str, img_size: int, pretrained: bool, kwargs: dict[str, Any], base: bool = False,
          **extra: Any) -> ViTAdapter:
    adapter, vit = (_ADAPTER_B, _BEIT_B) if base else (_ADAPTER_L, _BEIT_L)
    args = dict(adapter, trunk=trunk, trunk_kwargs=dict(vit, img_size=img_size), **extra)
    return _create_vit_adapter(variant, pretrained, **dict(args, **kwargs))


@register_model
def beit_adapter_l(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on BEiT-L/16, 640-px relative position tables, segmentation forward."""
    return _beit("beit_adapter_l", "beit_large_patch16_224", 640, pretrained, kwargs, drop_path_rate=0.3)


@register_model
def beit_adapter_l_512(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on BEiT-L/16, 512-px relative position tables, segmentation forward (COCO-Stuff-10k)."""
    return _beit("beit_adapter_l_512", "beit_large_patch16_224", 512, pretrained, kwargs, drop_path_rate=0.3)


@register_model
def beit_adapter_b_512(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B on BEiT-B/16, 512-px relative position tables, segmentation forward (COCO-Stuff-10k)."""
    return _beit("beit_adapter_b_512", "beit_base_patch16_224", 512, pretrained, kwargs, base=True, drop_path_rate=0.2)


@register_model
def beit_adapter_l_896(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on BEiT-L/16, 896-px relative position tables, segmentation forward."""
    return _beit("beit_adapter_l_896", "beit_large_patch16_224", 896, pretrained, kwargs, drop_path_rate=0.3)


@register_model
def beitv2_adapter_l_896(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on BEiTv2-L/16, 896-px relative position tables, segmentation forward."""
    return _beit("beitv2_adapter_l_896", "beitv2_large_patch16_224", 896, pretrained, kwargs, drop_path_rate=0.3)


@register_model
def beit_adapter_l_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on BEiT-L/16, detection forward: no cls token, 14/56-token windows (HTC++)."""
    return _beit("beit_adapter_l_det", "beit_large_patch16_224", 224, pretrained, kwargs,
                 drop_path_rate=0.4, vit_feature_source="final", window_size=_DET_WINDOWS)


@register_model
def beitv2_adapter_l_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on BEiTv2-L/16, detection forward: no cls token, 14/56-token windows (HTC++)."""
    return _beit("beitv2_adapter_l_det", "beitv2_large_patch16_224", 224, pretrained, kwargs,
                 drop_path_rate=0.4, vit_feature_source="final", window_size=_DET_WINDOWS)

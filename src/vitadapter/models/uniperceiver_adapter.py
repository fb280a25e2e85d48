"""ViT-Adapter-B and -L on Uni-Perceiver's encoder (timm ``VisionTransformer``, ``trunks.uniperceiver``).

Upstream's ``UniPerceiverAdapter``: the adapter of its ViT-Adapter-B/L configs with torch's default
LayerNorm (eps 1e-5) in the injectors and extractors, on a 224-px position table. The architectures
are upstream's released configurations: -L in the segmentation forward (each interaction's ViT output
joins its level; ADE20K UperNet) and -B in the detection forward (the final one, 14-token windows
except in the last block of each interaction; COCO Mask R-CNN). Other sizes and flavours: keyword
arguments, or ``load_upstream`` of the config. Tags: upstream's converted Uni-Perceiver encoders
(release v0.3.1, what its configs start from; a fresh adapter) and the backbones of its dense
releases (heads dropped on load).
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from ..converters.uniperceiver import NORM_EPS
from .vit_adapter import _RELEASES, _UPSTREAM_REPO, ViTAdapter, _cfg, _create_vit_adapter, _detection, _upstream


def _encoder(file: str, readme: str) -> dict[str, Any]:
    """Upstream's converted Uni-Perceiver encoder (upstream key layout, converted on load), a fresh adapter."""
    return _cfg(url=f"{_RELEASES}/{file}", origin_url=_UPSTREAM_REPO, notes=(f"linked from upstream's {readme}",))


_BASE = "v0.3.1/uni-perceiver-base-L12-H768-224size-torch-pretrained_converted.pth"
_LARGE = "v0.3.1/uni-perceiver-large-L24-H1024-224size-pretrained_converted.pth"

default_cfgs = generate_default_cfgs({
    "uniperceiver_adapter_l.uniperceiver_pt": _encoder(_LARGE, "segmentation/README.md"),
    "uniperceiver_adapter_l.upernet_ade20k": _upstream(
        "v0.3.1/upernet_uniperceiver_adapter_large_512_160k_ade20k.pth",
        "segmentation/configs/ade20k/upernet_uniperceiver_adapter_large_512_160k_ade20k.py",
        "ADE20K val mIoU 55.0 (SS) / 55.4 (MS), UperNet 160k",
    ),
    # upstream's detection README links v0.1.1/uniperceiver_pretrain.pth here; its Mask R-CNN README
    # and config the v0.3.1 file
    "uniperceiver_adapter_b_det.uniperceiver_pt": _encoder(_BASE, "detection/configs/mask_rcnn/README.md"),
    "uniperceiver_adapter_b_det.mask_rcnn_coco": _upstream(
        "v0.3.1/mask_rcnn_uniperceiver_adapter_base_fpn_3x_coco.pth",
        "detection/configs/mask_rcnn/mask_rcnn_uniperceiver_adapter_base_fpn_3x_coco.py",
        "COCO val box AP 51.2 / mask AP 45.3, Mask R-CNN 3x+MS",
    ),
})

# upstream's configs: ViT-Adapter-B / -L adapters; the encoder's img_size keeps the class default 224
_B = dict(trunk="vit_base_patch16_uniperceiver", deform_num_heads=12, interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]])
_L = dict(trunk="vit_large_patch16_uniperceiver", deform_num_heads=16,
          interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]])
_ADAPTER = dict(conv_inplane=64, n_points=4, deform_ratio=0.5, cffn_ratio=0.25, init_values=0.0,
                adapter_norm_eps=NORM_EPS, trunk_kwargs=dict(img_size=224))


def _create(variant: str, size: dict[str, Any], pretrained: bool, kwargs: dict[str, Any], **extra: Any) -> ViTAdapter:
    return _create_vit_adapter(variant, pretrained, **{**_ADAPTER, **size, **extra, **kwargs})


@register_model
def uniperceiver_adapter_l(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on Uni-Perceiver-L, segmentation forward (upstream's ADE20K UperNet config)."""
    return _create("uniperceiver_adapter_l", _L, pretrained, kwargs, drop_path_rate=0.4)


@register_model
def uniperceiver_adapter_b_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B on Uni-Perceiver-B, detection forward with windows (upstream's Mask R-CNN config)."""
    return _create("uniperceiver_adapter_b_det", _B, pretrained, kwargs, drop_path_rate=0.2, **_detection(12))

"""ViT-Adapter-B and -L on Uni-Perceiver's encoder (timm ``VisionTransformer``, ``trunks.uniperceiver``).

Upstream's ``UniPerceiverAdapter``: the adapter of its ViT-Adapter-B/L configs with torch's default
LayerNorm (eps 1e-5) in the injectors and extractors, on a 224-px position table. Segmentation
flavours add each interaction's ViT output to its level; ``_det`` flavours the final one, with 14-token
windows except in the last block of each interaction (upstream's Mask R-CNN and HTC++ configs).
Tags: upstream's converted Uni-Perceiver encoders (release v0.3.1, what its configs start from; a
fresh adapter) and the backbone of its ADE20K UperNet release (heads dropped on load).
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
    "uniperceiver_adapter_b.uniperceiver_pt": _encoder(_BASE, "detection/configs/mask_rcnn/README.md"),
    "uniperceiver_adapter_l.uniperceiver_pt": _encoder(_LARGE, "segmentation/README.md"),
    "uniperceiver_adapter_l.upernet_ade20k": _upstream(
        "v0.3.1/upernet_uniperceiver_adapter_large_512_160k_ade20k.pth",
        "segmentation/configs/ade20k/upernet_uniperceiver_adapter_large_512_160k_ade20k.py",
        "ADE20K val mIoU 55.0 (SS) / 55.4 (MS), UperNet 160k",
    ),
    "uniperceiver_adapter_b_det.uniperceiver_pt": _encoder(_BASE, "detection/configs/mask_rcnn/README.md"),
    "uniperceiver_adapter_l_det.uniperceiver_pt": _encoder(_LARGE, "segmentation/README.md"),
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
def uniperceiver_adapter_b(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B on Uni-Perceiver-B, segmentation forward."""
    return _create("uniperceiver_adapter_b", _B, pretrained, kwargs, drop_path_rate=0.2)


@register_model
def uniperceiver_adapter_l(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on Uni-Perceiver-L, segmentation forward (upstream's ADE20K UperNet config)."""
    return _create("uniperceiver_adapter_l", _L, pretrained, kwargs, drop_path_rate=0.4)


@register_model
def uniperceiver_adapter_b_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-B on Uni-Perceiver-B, detection forward with windows (upstream's Mask R-CNN config)."""
    return _create("uniperceiver_adapter_b_det", _B, pretrained, kwargs, drop_path_rate=0.2, **_detection(12))


@register_model
def uniperceiver_adapter_l_det(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
    """ViT-Adapter-L on Uni-Perceiver-L, detection forward with windows (upstream's HTC++ config)."""
    return _create("uniperceiver_adapter_l_det", _L, pretrained, kwargs, drop_path_rate=0.4, **_detection(24))

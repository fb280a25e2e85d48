"""Cascade Mask R-CNN detectors on ViT-Adapter backbones: upstream's COCO releases, whole.

Upstream's cascade configs are not mmdet's default cascade: each of the three stages' box heads is a
``ConvFCBBoxHead`` with 4 shared 3x3 convs (BatchNorm) and one fc, class-specific regression on
decoded boxes (GIoU loss), with mmdet's per-stage target stds; one FCN mask head per stage.
``box_conv_channels`` sets the width of those convs (256); other arguments as in ``mask_rcnn``.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .detector import Detector, coco_release, create_detector
from .mask_rcnn import HEAD_WIDTHS, _box_head, head_widths, mask_rcnn_config

default_cfgs = generate_default_cfgs({
    "cascade_mask_rcnn_vit_adapter_s.coco": coco_release("vit_adapter_s_det.deit_cascade_mask_rcnn_coco"),
    "cascade_mask_rcnn_vit_adapter_b.coco": coco_release("vit_adapter_b_det.deit_cascade_mask_rcnn_coco"),
})

# the stages' box target stds (mmdet's cascade_mask_rcnn_r50_fpn)
_STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


CASCADE_HEAD_WIDTHS = dict(HEAD_WIDTHS, box_conv_channels=256)


def cascade_config(
    width: int, num_classes: int, neck_channels: int = 256, box_fc_channels: int = 1024, mask_channels: int = 256,
    box_conv_channels: int = 256,
) -> dict[str, Any]:
    """Upstream's cascade ``model`` dict without its backbone (``CASCADE_HEAD_WIDTHS`` as given)."""
    box_heads = [
        _box_head(num_classes, stds, neck_channels, box_fc_channels, type="ConvFCBBoxHead", num_shared_convs=4, num_shared_fcs=1,
                  conv_out_channels=box_conv_channels, reg_decoded_bbox=True, norm_cfg=dict(type="SyncBN", requires_grad=True))
        for stds in _STAGE_STDS
    ]
    base = mask_rcnn_config(width, num_classes, kind="CascadeRCNN", neck_channels=neck_channels,
                            box_fc_channels=box_fc_channels, mask_channels=mask_channels)
    return dict(base, roi_head=dict(base["roi_head"], type="CascadeRoIHead", num_stages=3, bbox_head=box_heads))


def _create(variant: str, backbone: str, pretrained: bool, kwargs: dict[str, Any]) -> Detector:
    widths = head_widths(kwargs, CASCADE_HEAD_WIDTHS)
    return create_detector(variant, backbone, pretrained, kwargs, lambda width, classes: cascade_config(width, classes, **widths), widths)


@register_model
def cascade_mask_rcnn_vit_adapter_s(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Cascade Mask R-CNN on ViT-Adapter-S (DeiT-S trunk)."""
    return _create("cascade_mask_rcnn_vit_adapter_s", "vit_adapter_s_det", pretrained, kwargs)


@register_model
def cascade_mask_rcnn_vit_adapter_b(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Cascade Mask R-CNN on ViT-Adapter-B (DeiT-B trunk)."""
    return _create("cascade_mask_rcnn_vit_adapter_b", "vit_adapter_b_det", pretrained, kwargs)

"""HTC++ detectors on ViT-Adapter-L backbones: upstream's strongest COCO releases, whole.

HTC++ (Swin's improved hybrid task cascade) as upstream's ``detection/configs/htc++`` configs build
it: upstream's ``ExtraAttention`` neck (global attention over the stride-32 level, 32 heads, with an
MLP) in front of mmdet's FPN, RPN, then a three-stage interleaved cascade with mask information flow
and a COCO-stuff semantic branch (183 classes) fused into the box and mask RoI features; box heads
``Shared4Conv1FCBBoxHead`` with class-agnostic regression; soft-NMS at test time; images resized to
fit 1600 x 1400.

The BEiTv2-L release pre-trained on Objects365 then fine-tuned on COCO is its own architecture,
``htc_beitv2_adapter_l_gn``: its FPN has GroupNorm (32 groups) and its box heads BatchNorm, and it
is tested at 2000 x 1000. ``pretrained``, ``num_classes``, ``pretrained_backbone`` and backbone
keyword arguments as in ``mask_rcnn``, head widths as in ``cascade_rcnn``. Every entry also carries upstream's multi-scale flip test
(its ``_ms`` configs), which ``Detector.detect_aug`` runs.
"""
from __future__ import annotations

from typing import Any, Optional

from timm.models import generate_default_cfgs, register_model

from ..detection import AugTest
from .detector import Detector, coco_release, create_detector
from .cascade_rcnn import CASCADE_HEAD_WIDTHS
from .mask_rcnn import _box_head, _extractor, head_widths, mask_rcnn_config

_CONFIGS = "detection/configs/htc++/{}.py"
# upstream's single-scale test scales (mmdet img_scale) and the padded batch the largest image becomes
_SCALE, _SCALE_O365 = (1600, 1400), (2000, 1000)
_INPUT, _INPUT_O365 = (3, 1408, 1600), (3, 1024, 2016)


def _release(backbone_tag: str, config: str, single: str, multi: str, test_dev: Optional[str], input_size: tuple[int, ...]) -> dict[str, Any]:
    """A release as upstream's htc++ README reports it: single-scale and multi-scale (TTA) numbers kept apart."""
    test_dev = f"; test-dev {test_dev}" if test_dev else ""
    return dict(
        coco_release(backbone_tag), input_size=input_size,
        notes=(f"upstream config {_CONFIGS.format(config)}", f"upstream reports COCO val {single}{test_dev}",
               f"upstream reports with multi-scale flip test ({_CONFIGS.format(config + '_ms')}): {multi}"),
    )


default_cfgs = generate_default_cfgs({
    "htc_augreg_adapter_l.coco": _release(
        "vit_adapter_l_det.augreg_htc_coco", "htc++_augreg_adapter_large_fpn_3x_coco",
        "box AP 56.6 / mask AP 49.0, HTC++ 3x+MS", "val 57.7 / 49.9, test-dev 58.4 / 50.7", "57.4 / 50.0", _INPUT,
    ),
    "htc_beit_adapter_l.coco": _release(
        "beit_adapter_l_det.htc_coco", "htc++_beit_adapter_large_fpn_3x_coco",
        "box AP 58.4 / mask AP 50.8, HTC++ 3x+MS", "val 60.2 / 52.2, test-dev 60.4 / 52.5", "58.9 / 51.3", _INPUT,
    ),
    "htc_beitv2_adapter_l.coco": _release(
        "beitv2_adapter_l_det.htc_coco", "htc++_beitv2_adapter_large_fpn_3x_coco",
        "box AP 58.8 / mask AP 51.1, HTC++ 3x+MS", "val 60.5 / 52.5, test-dev 60.9 / 53.0", "59.5 / 51.8", _INPUT,
    ),
    "htc_beitv2_adapter_l_gn.o365_coco": _release(
        "beitv2_adapter_l_det.htc_o365_coco", "htc++_beitv2_adapter_large_fpn_o365_coco",
        "box AP 61.8 / mask AP 53.0, HTC++ Objects365 then COCO 20k iterations",
        "val 62.6 / 54.2, test-dev 62.6 / 54.5", None, _INPUT_O365,
    ),
})


def _aug_test(long_side: int) -> AugTest:
    """Upstream's ``_ms`` test: six short sides with flips, each contributing the object sizes it sees best."""
    return AugTest(scales=tuple((long_side, short) for short in (600, 800, 1000, 1200, 1400, 1600)),
                   scale_ranges=(("l",), ("l",), ("m", "l"), ("s", "m"), ("s", "m"), ("s", "m")))


# the stages' box target stds (mmdet's htc_r50_fpn)
_STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def htc_config(width: int, num_classes: int, drop_path: float = 0.3, max_per_img: int = 100, o365: bool = False,
               neck_channels: int = 256, box_fc_channels: int = 1024, mask_channels: int = 256, box_conv_channels: int = 256) -> dict[str, Any]:
    """Upstream's HTC++ ``model`` dict without its backbone. ``drop_path``: the ExtraAttention neck's;
    ``max_per_img``: the test's detections per image (300 in the AugReg-L config, 100 in the others);
    ``o365``: the Objects365 recipe's GroupNorm FPN and BatchNorm box heads. The head widths as the
    cascade's (``CASCADE_HEAD_WIDTHS``); the semantic branch is as wide as the neck, whose RoI
    features its own are added to."""
    base = mask_rcnn_config(width, num_classes, kind="HybridTaskCascade", neck_channels=neck_channels)
    channels = neck_channels
    fpn = dict(base["neck"], norm_cfg=dict(type="GN", num_groups=32)) if o365 else base["neck"]
    box_norm = dict(norm_cfg=dict(type="SyncBN", requires_grad=True), reg_decoded_bbox=True) if o365 else {}
    mask_heads = [dict(type="HTCMaskHead", with_conv_res=k > 0, num_convs=4, in_channels=channels, conv_out_channels=mask_channels,
                       num_classes=num_classes) for k in range(3)]
    return dict(
        base,
        neck=[dict(type="ExtraAttention", in_channels=[width] * 4, num_head=32, with_ffn=True, ffn_ratio=4.0, drop_path=drop_path), fpn],
        roi_head=dict(
            type="HybridTaskCascadeRoIHead", interleaved=True, mask_info_flow=True, num_stages=3,
            stage_loss_weights=[1, 0.5, 0.25], bbox_roi_extractor=_extractor(7, channels), mask_roi_extractor=_extractor(14, channels),
            bbox_head=[dict(_box_head(num_classes, stds, channels, box_fc_channels, type="Shared4Conv1FCBBoxHead",
                                      conv_out_channels=box_conv_channels, **box_norm), reg_class_agnostic=True)
                       for stds in _STAGE_STDS],
            mask_head=mask_heads,
            semantic_roi_extractor=dict(_extractor(14, channels), featmap_strides=[8]),
            semantic_head=dict(type="FusedSemanticHead", num_ins=5, fusion_level=1, num_convs=4, in_channels=channels,
                               conv_out_channels=channels, num_classes=183),
        ),
        test_cfg=dict(
            base["test_cfg"],
            rcnn=dict(score_thr=0.001, nms=dict(type="soft_nms", iou_threshold=0.5), max_per_img=max_per_img, mask_thr_binary=0.5),
        ),
    )


def _create(variant: str, backbone: str, pretrained: bool, kwargs: dict[str, Any], aug_long_side: int = 3000,
            **config: Any) -> Detector:
    widths = head_widths(kwargs, CASCADE_HEAD_WIDTHS)
    return create_detector(variant, backbone, pretrained, kwargs, lambda width, classes: htc_config(width, classes, **config, **widths),
                           widths, test_scale=_SCALE_O365 if config.get("o365") else _SCALE, aug_test=_aug_test(aug_long_side))


@register_model
def htc_augreg_adapter_l(pretrained: bool = False, **kwargs: Any) -> Detector:
    """HTC++ on ViT-Adapter-L (AugReg-L trunk, 384-px position grid, windowed attention)."""
    return _create("htc_augreg_adapter_l", "vit_adapter_l_det", pretrained, kwargs, aug_long_side=1600, drop_path=0.4,
                   max_per_img=300)


@register_model
def htc_beit_adapter_l(pretrained: bool = False, **kwargs: Any) -> Detector:
    """HTC++ on ViT-Adapter-L with BEiT-L's trunk (14/56-token windows)."""
    return _create("htc_beit_adapter_l", "beit_adapter_l_det", pretrained, kwargs)


@register_model
def htc_beitv2_adapter_l(pretrained: bool = False, **kwargs: Any) -> Detector:
    """HTC++ on ViT-Adapter-L with BEiTv2-L's trunk (14/56-token windows)."""
    return _create("htc_beitv2_adapter_l", "beitv2_adapter_l_det", pretrained, kwargs)


@register_model
def htc_beitv2_adapter_l_gn(pretrained: bool = False, **kwargs: Any) -> Detector:
    """HTC++ on ViT-Adapter-L with BEiTv2-L's trunk as upstream's Objects365 recipe builds it: GroupNorm
    FPN, BatchNorm box heads, tested at 2000 x 1000."""
    return _create("htc_beitv2_adapter_l_gn", "beitv2_adapter_l_det", pretrained, kwargs, o365=True)

"""Mask R-CNN detectors on ViT-Adapter backbones: upstream's COCO releases, whole (backbone, FPN, RPN
and RoI heads).

``create_model("mask_rcnn_vit_adapter_t.coco", pretrained=True)`` loads one of upstream's released
detection checkpoints as it is. The heads are mmdet's ``mask_rcnn_r50_fpn`` heads, as every
upstream Mask R-CNN config inherits them (FPN 256 wide, 2-fc box head 1024 wide, 4-conv mask head);
the no-FPN release replaces the FPN by upstream's ``ChannelMapperWithPooling``. Without weights the
architectures take ``num_classes=`` for fine-tuning (with ``pretrained=True`` everything but the
class-specific layers loads); ``pretrained_backbone=True`` starts the backbone from its ImageNet
trunk. ``neck_channels``, ``box_fc_channels`` and ``mask_channels`` set the heads' widths (mmdet's
256, 1024 and 256 by default). Other keyword arguments go to the backbone (``drop_path_rate``, ...).
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .detector import _TEST_INPUT, COCO, Detector, coco_release, create_detector
from .vit_adapter import _cfg

_HF = "czczup/ViT-Adapter"  # upstream's Hugging Face repo, where its later detection files live
_DET = "detection/configs/mask_rcnn/{}.py"


def _hub_release(filename: str, config: str, metric: str) -> dict[str, Any]:
    """A release file in upstream's Hugging Face repo (linked from its detection READMEs)."""
    return _cfg(
        hf_hub_id=_HF, hf_hub_filename=filename, origin_url=f"https://huggingface.co/{_HF}",
        notes=(f"upstream config {config}", f"upstream reports {metric}"), input_size=_TEST_INPUT, **COCO,
    )


default_cfgs = generate_default_cfgs({
    "mask_rcnn_vit_adapter_t.coco": coco_release("vit_adapter_t_det.deit_mask_rcnn_coco"),
    "mask_rcnn_vit_adapter_t.coco_1x": _hub_release(
        "mask_rcnn_deit_adapter_tiny_fpn_1x_coco.pth", _DET.format("mask_rcnn_deit_adapter_tiny_fpn_1x_coco"),
        "COCO val box AP 41.1 / mask AP 37.5, Mask R-CNN 1x",
    ),
    "mask_rcnn_vit_adapter_s.coco": coco_release("vit_adapter_s_det.deit_mask_rcnn_coco"),
    "mask_rcnn_vit_adapter_b.coco": coco_release("vit_adapter_b_det.deit_mask_rcnn_coco"),
    "mask_rcnn_vit_adapter_l.coco": coco_release("vit_adapter_l_det.augreg_mask_rcnn_coco"),
    "mask_rcnn_uniperceiver_adapter_b.coco": coco_release("uniperceiver_adapter_b_det.mask_rcnn_coco"),
    # the configs train with DINOv2-L's [-1, 1] normalisation but leave the base test pipeline's
    # ImageNet one in place: upstream's numbers are ImageNet-normalised for all three
    **{
        f"mask_rcnn_dinov2_adapter_{size}.coco": _hub_release(
            f"mask_rcnn_dinov2_adapter_{name}_fpn_3x_coco.pth", _DET.format(f"dinov2/mask_rcnn_dinov2_adapter_{name}_fpn_3x_coco"),
            f"COCO val box AP {box} / mask AP {mask}, Mask R-CNN 3x+MS",
        )
        for size, name, box, mask in (("s", "small", 51.5, 45.6), ("b", "base", 54.1, 47.8), ("l", "large", 55.3, 49.0))
    },
    "mask_rcnn_vit_adapter_s_nofpn.coco": dict(
        coco_release("vit_adapter_s_det.deit_mask_rcnn_coco"),
        url="https://github.com/czczup/ViT-Adapter/releases/download/v0.1.6/mask_rcnn_deit_adapter_small_3x_coco.pth.tar",
        notes=(f"upstream config {_DET.format('no_fpn/mask_rcnn_deit_adapter_small_3x_coco')}",
               "upstream reports COCO val box AP 48.2 / mask AP 42.7, Mask R-CNN 3x+MS without FPN"),
    ),
})


# the heads' widths (mmdet's mask_rcnn_r50_fpn): the neck's and every RoI feature's channels, the box
# head's fc layers, the mask head's convs. Narrower ones make small detectors for tests and experiments.
HEAD_WIDTHS = dict(neck_channels=256, box_fc_channels=1024, mask_channels=256)


def head_widths(kwargs: dict[str, Any], defaults: dict[str, int]) -> dict[str, int]:
    """The head widths ``defaults`` names, taken out of an entrypoint's ``kwargs`` (the rest go to the
    backbone)."""
    return {name: kwargs.pop(name, default) for name, default in defaults.items()}


def _box_head(num_classes: int, stds: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2), channels: int = 256, fc_channels: int = 1024,
              **layout: Any) -> dict[str, Any]:
    """mmdet's box head with class-specific regression (``Shared2FCBBoxHead`` unless ``layout`` says)
    on ``channels``-wide RoI features."""
    return dict(type=layout.pop("type", "Shared2FCBBoxHead"), in_channels=channels, fc_out_channels=fc_channels, roi_feat_size=7,
                num_classes=num_classes, bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=list(stds)),
                reg_class_agnostic=False, **layout)


def _extractor(size: int, channels: int) -> dict[str, Any]:
    return dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=size, sampling_ratio=0),
                out_channels=channels, featmap_strides=[4, 8, 16, 32])


def mask_rcnn_config(
    width: int, num_classes: int, neck: str = "FPN", kind: str = "MaskRCNN", neck_channels: int = 256,
    box_fc_channels: int = 1024, mask_channels: int = 256, **roi_head: Any,
) -> dict[str, Any]:
    """Upstream's detection ``model`` dict without its backbone: mmdet's ``mask_rcnn_r50_fpn.py`` on a
    ``width``-channel pyramid (``HEAD_WIDTHS`` as given), ``roi_head`` entries replaced (the cascade
    configs replace them)."""
    channels = neck_channels  # every RoI feature and the RPN are as wide as the neck
    return dict(
        type=kind,
        neck=dict(type=neck, in_channels=[width] * 4, out_channels=channels, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=channels, feat_channels=channels,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        ),
        roi_head=dict(
            dict(type="StandardRoIHead", bbox_roi_extractor=_extractor(7, channels),
                 bbox_head=_box_head(num_classes, channels=channels, fc_channels=box_fc_channels),
                 mask_roi_extractor=_extractor(14, channels),
                 mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=channels, conv_out_channels=mask_channels,
                                num_classes=num_classes)),
            **roi_head,
        ),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100, mask_thr_binary=0.5),
        ),
    )


def _create(variant: str, backbone: str, pretrained: bool, kwargs: dict[str, Any], neck: str = "FPN") -> Detector:
    widths = head_widths(kwargs, HEAD_WIDTHS)
    return create_detector(variant, backbone, pretrained, kwargs, lambda width, classes: mask_rcnn_config(width, classes, neck, **widths), widths)


@register_model
def mask_rcnn_vit_adapter_t(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Mask R-CNN on ViT-Adapter-T (DeiT-T trunk, detection forward with windows)."""
    return _create("mask_rcnn_vit_adapter_t", "vit_adapter_t_det", pretrained, kwargs)


@register_model
def mask_rcnn_vit_adapter_s(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Mask R-CNN on ViT-Adapter-S (DeiT-S trunk)."""
    return _create("mask_rcnn_vit_adapter_s", "vit_adapter_s_det", pretrained, kwargs)


@register_model
def mask_rcnn_vit_adapter_b(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Mask R-CNN on ViT-Adapter-B (DeiT-B trunk)."""
    return _create("mask_rcnn_vit_adapter_b", "vit_adapter_b_det", pretrained, kwargs)


@register_model
def mask_rcnn_vit_adapter_l(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Mask R-CNN on ViT-Adapter-L (AugReg-L trunk, 384-px position grid)."""
    return _create("mask_rcnn_vit_adapter_l", "vit_adapter_l_det", pretrained, kwargs)


@register_model
def mask_rcnn_vit_adapter_s_nofpn(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Mask R-CNN on ViT-Adapter-S without an FPN: upstream's ChannelMapperWithPooling (1x1 convs to
    256 channels, a max-pooled fifth level) in its place."""
    return _create("mask_rcnn_vit_adapter_s_nofpn", "vit_adapter_s_det", pretrained, kwargs, neck="ChannelMapperWithPooling")


@register_model
def mask_rcnn_uniperceiver_adapter_b(pretrained: bool = False, **kwargs: Any) -> Detector:
    """Mask R-CNN on ViT-Adapter-B with Uni-Perceiver-B's encoder."""
    return _create("mask_rcnn_uniperceiver_adapter_b", "uniperceiver_adapter_b_det", pretrained, kwargs)


def _dinov2(size: str) -> Any:
    name = f"mask_rcnn_dinov2_adapter_{size}"

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Detector:
        if kwargs.get("pretrained_backbone"):
            raise ValueError(
                f"pretrained_backbone: {name}'s trunk is DINOv2's converted to patch 16 by upstream's script, "
                "which vitadapter does not register; load the release (pretrained=True) instead"
            )
        # upstream's own ViT at DINOv2's 592-px (37x37) position grid, the patch-14 kernels resized to 16
        return _create(name, f"vit_adapter_{size}_det", pretrained, dict(dict(pretrain_size=592), **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"Mask R-CNN on ViT-Adapter-{size.upper()} with DINOv2-{size.upper()}'s trunk (upstream's 14-to-16 conversion)."
    return entrypoint


for _size in ("s", "b", "l"):
    register_model(_dinov2(_size))

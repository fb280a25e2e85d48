"""Upstream's mmdet 2.x detection ``model`` dicts and checkpoints -> ``TwoStageDetectorHeads`` arguments.

The detector parts keep mmdet's parameter names, so a checkpoint's ``neck.*``, ``rpn_head.*`` and
``roi_head.*`` entries load as they are: converting one is a filter; its ``backbone.*`` entries go
through the backbone conversion (``converters.backbone``); ``models.from_upstream`` builds the
detector. Configs are translated setting by setting; a type or setting that would change the
computed function and is not implemented is refused by name. Loss, sampler and assigner settings only matter for training and are accepted unread.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

HEAD_PREFIXES = ("neck.", "rpn_head.", "roi_head.")
DETECTOR_TYPES = ("MaskRCNN", "FasterRCNN", "CascadeRCNN", "HybridTaskCascade")

# accepted everywhere without effect at test time: weights come from the checkpoint, losses and
# their bookkeeping are training-only, mm-config merge directives
_IGNORED = ("type", "init_cfg", "_delete_", "loss_cls", "loss_bbox", "loss_mask", "loss_seg", "conv_cfg", "train_cfg", "pretrained")
_NORMS = ("BN", "SyncBN", "MMSyncBN")


def _check_keys(cfg: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(cfg) - set(allowed) - set(_IGNORED))
    if unknown:
        raise ValueError(f"{where}: unsupported settings {', '.join(unknown)}")


def _check_type(cfg: Any, allowed: tuple[str, ...], where: str, default: str | None = None) -> Mapping[str, Any]:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("type", default)
    if kind not in allowed:
        raise ValueError(f"{where}: type {kind!r} is not supported (supported: {', '.join(allowed)})")
    return cfg


def _norm(cfg: Mapping[str, Any], where: str) -> bool:
    norm = cfg.get("norm_cfg")
    if norm is None:
        return False
    if not isinstance(norm, Mapping) or norm.get("type") not in _NORMS:
        raise ValueError(f"{where}.norm_cfg: only BatchNorm ({', '.join(_NORMS)}) is supported, got {norm!r}")
    return True


def _coder(cfg: Mapping[str, Any] | None, where: str, default_stds: tuple[float, ...]) -> dict[str, Any]:
    cfg = _check_type(cfg or {"type": "DeltaXYWHBBoxCoder"}, ("DeltaXYWHBBoxCoder",), where)
    _check_keys(cfg, ("target_means", "target_stds", "clip_border"), where)
    if not cfg.get("clip_border", True):
        raise ValueError(f"{where}: clip_border=False is not supported")
    return {"target_means": list(cfg.get("target_means", (0.0,) * 4)), "target_stds": list(cfg.get("target_stds", default_stds))}


def _nms_iou(cfg: Any, where: str) -> float:
    cfg = _check_type(cfg, ("nms",), where, default="nms")
    _check_keys(cfg, ("iou_threshold",), where)
    return float(cfg.get("iou_threshold", 0.5))


def neck_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mmdet ``FPN`` (``add_extra_convs=False``, all inputs) or upstream's ``ChannelMapperWithPooling``."""
    cfg = _check_type(cfg, ("FPN", "ChannelMapperWithPooling"), "neck")
    kwargs = {"type": cfg["type"], "in_channels": list(cfg["in_channels"]), "out_channels": int(cfg["out_channels"]),
              "num_outs": int(cfg.get("num_outs", len(cfg["in_channels"])))}
    if cfg["type"] == "ChannelMapperWithPooling":
        kwargs["norm"] = _norm(cfg, "neck")
        _check_keys(cfg, ("in_channels", "out_channels", "num_outs", "norm_cfg", "kernel_size"), "neck")
        if cfg.get("act_cfg", {"type": "ReLU"}) != {"type": "ReLU"}:
            raise ValueError(f"neck.act_cfg: only ReLU is supported, got {cfg['act_cfg']!r}")
        return {**kwargs, "kernel_size": int(cfg.get("kernel_size", 1))}
    _check_keys(cfg, ("in_channels", "out_channels", "num_outs", "norm_cfg", "start_level", "end_level", "add_extra_convs",
                      "relu_before_extra_convs", "no_norm_on_lateral", "upsample_cfg"), "neck")
    if cfg.get("start_level", 0) != 0 or cfg.get("end_level", -1) not in (-1, len(cfg["in_channels"]) - 1):
        raise ValueError("neck: FPN start_level/end_level other than all inputs are not supported")
    if cfg.get("add_extra_convs", False):
        raise ValueError(f"neck: FPN add_extra_convs={cfg['add_extra_convs']!r} is not supported (only max-pooled extra levels)")
    if cfg.get("no_norm_on_lateral", False) or cfg.get("upsample_cfg", {"mode": "nearest"}) != {"mode": "nearest"}:
        raise ValueError("neck: FPN no_norm_on_lateral and upsample_cfg other than nearest are not supported")
    return {**kwargs, **_fpn_norm(cfg.get("norm_cfg"))}


def _fpn_norm(norm: Any) -> dict[str, Any]:
    """An FPN's norm: BatchNorm as the other parts take it, or GroupNorm (upstream's Objects365 HTC++;
    mmcv's keys ``gn.*``)."""
    if not (isinstance(norm, Mapping) and norm.get("type") == "GN"):
        return {"norm": _norm({"norm_cfg": norm}, "neck")}
    _check_keys(norm, ("num_groups", "requires_grad", "eps"), "neck.norm_cfg")
    if "num_groups" not in norm or float(norm.get("eps", 1e-5)) != 1e-5:
        raise ValueError(f"neck.norm_cfg: GroupNorm is supported with num_groups and mmcv's default eps 1e-5, got {dict(norm)!r}")
    return {"norm": "GN", "num_groups": int(norm["num_groups"])}


def rpn_head_kwargs(cfg: Mapping[str, Any], test_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mmdet ``RPNHead`` + ``AnchorGenerator`` + ``test_cfg.rpn``."""
    cfg = _check_type(cfg, ("RPNHead",), "rpn_head")
    _check_keys(cfg, ("in_channels", "feat_channels", "num_convs", "anchor_generator", "bbox_coder"), "rpn_head")
    anchors = _check_type(cfg.get("anchor_generator"), ("AnchorGenerator",), "rpn_head.anchor_generator")
    _check_keys(anchors, ("scales", "ratios", "strides", "center_offset"), "rpn_head.anchor_generator")
    if anchors.get("center_offset", 0.0) != 0.0:
        raise ValueError("rpn_head.anchor_generator: center_offset other than 0 is not supported")
    test = dict(test_cfg)
    _check_keys(test, ("nms_pre", "max_per_img", "nms", "min_bbox_size"), "test_cfg.rpn")
    return {
        "in_channels": int(cfg["in_channels"]), "feat_channels": int(cfg.get("feat_channels", 256)),
        "num_convs": int(cfg.get("num_convs", 1)), "anchor_strides": list(anchors["strides"]),
        "anchor_ratios": list(anchors.get("ratios", (0.5, 1.0, 2.0))), "anchor_scales": list(anchors.get("scales", (8,))),
        **_coder(cfg.get("bbox_coder"), "rpn_head.bbox_coder", (1.0, 1.0, 1.0, 1.0)),
        "nms_pre": int(test.get("nms_pre", 1000)), "max_per_img": int(test.get("max_per_img", 1000)),
        "iou_threshold": _nms_iou(test.get("nms", {}), "test_cfg.rpn.nms"), "min_bbox_size": float(test.get("min_bbox_size", 0)),
    }


_BBOX_HEAD_LAYOUTS = {"Shared2FCBBoxHead": (0, 2), "Shared4Conv1FCBBoxHead": (4, 1), "ConvFCBBoxHead": None}


def bbox_head_kwargs(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """mmdet ``Shared2FCBBoxHead`` / ``Shared4Conv1FCBBoxHead`` / ``ConvFCBBoxHead`` (shared branch only)."""
    cfg = _check_type(cfg, tuple(_BBOX_HEAD_LAYOUTS), where)
    _check_keys(cfg, ("in_channels", "num_classes", "roi_feat_size", "num_shared_convs", "num_shared_fcs", "conv_out_channels",
                      "fc_out_channels", "norm_cfg", "reg_class_agnostic", "reg_decoded_bbox", "bbox_coder",
                      "num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs", "with_avg_pool"), where)
    layout = _BBOX_HEAD_LAYOUTS[cfg["type"]] or (cfg.get("num_shared_convs", 0), cfg.get("num_shared_fcs", 0))
    if any(cfg.get(k, 0) for k in ("num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs", "with_avg_pool")):
        raise ValueError(f"{where}: separate classification/regression branches and with_avg_pool are not supported")
    return {
        "in_channels": int(cfg.get("in_channels", 256)), "num_classes": int(cfg.get("num_classes", 80)),
        "roi_feat_size": int(cfg.get("roi_feat_size", 7)), "num_shared_convs": int(layout[0]), "num_shared_fcs": int(layout[1]),
        "conv_out_channels": int(cfg.get("conv_out_channels", 256)), "fc_out_channels": int(cfg.get("fc_out_channels", 1024)),
        "norm": _norm(cfg, where), "reg_class_agnostic": bool(cfg.get("reg_class_agnostic", False)),
        **_coder(cfg.get("bbox_coder"), f"{where}.bbox_coder", (0.1, 0.1, 0.2, 0.2)),
    }


def mask_head_kwargs(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """mmdet ``FCNMaskHead`` with its default 2x deconv upsampling."""
    cfg = _check_type(cfg, ("FCNMaskHead",), where)
    _check_keys(cfg, ("num_convs", "in_channels", "conv_out_channels", "num_classes", "norm_cfg", "class_agnostic",
                      "roi_feat_size", "conv_kernel_size", "upsample_cfg"), where)
    if cfg.get("conv_kernel_size", 3) != 3 or cfg.get("upsample_cfg", {"type": "deconv", "scale_factor": 2}) != {"type": "deconv", "scale_factor": 2}:
        raise ValueError(f"{where}: only 3x3 convs and 2x deconv upsampling are supported")
    return {
        "in_channels": int(cfg.get("in_channels", 256)), "num_classes": int(cfg.get("num_classes", 80)),
        "num_convs": int(cfg.get("num_convs", 4)), "conv_out_channels": int(cfg.get("conv_out_channels", 256)),
        "norm": _norm(cfg, where), "class_agnostic": bool(cfg.get("class_agnostic", False)),
    }


def roi_extractor_kwargs(cfg: Any, where: str) -> dict[str, Any]:
    """mmdet ``SingleRoIExtractor`` with mmcv ``RoIAlign`` (aligned, average pooling)."""
    if isinstance(cfg, (list, tuple)):
        if any(c != cfg[0] for c in cfg):
            raise ValueError(f"{where}: different RoI extractors per stage are not supported")
        cfg = cfg[0]
    cfg = _check_type(cfg, ("SingleRoIExtractor",), where)
    _check_keys(cfg, ("roi_layer", "out_channels", "featmap_strides", "finest_scale"), where)
    layer = _check_type(cfg.get("roi_layer"), ("RoIAlign",), f"{where}.roi_layer")
    _check_keys(layer, ("output_size", "sampling_ratio", "aligned", "pool_mode", "use_torchvision"), f"{where}.roi_layer")
    if not layer.get("aligned", True) or layer.get("pool_mode", "avg") != "avg":
        raise ValueError(f"{where}.roi_layer: only aligned=True with pool_mode='avg' is supported")
    return {"output_size": int(layer["output_size"]), "featmap_strides": list(cfg["featmap_strides"]),
            "sampling_ratio": int(layer.get("sampling_ratio", 0)), "finest_scale": float(cfg.get("finest_scale", 56))}


def roi_head_kwargs(cfg: Mapping[str, Any], test_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mmdet ``StandardRoIHead`` / ``CascadeRoIHead`` + ``test_cfg.rcnn`` -> ``RoIHeads`` / ``CascadeRoIHeads``."""
    cfg = _check_type(cfg, ("StandardRoIHead", "CascadeRoIHead"), "roi_head")
    _check_keys(cfg, ("bbox_roi_extractor", "bbox_head", "mask_roi_extractor", "mask_head", "num_stages",
                      "stage_loss_weights", "test_cfg"), "roi_head")
    test = dict(test_cfg)
    _check_keys(test, ("score_thr", "nms", "max_per_img", "mask_thr_binary"), "test_cfg.rcnn")
    with_mask = cfg.get("mask_head") is not None
    kwargs: dict[str, Any] = {
        "bbox_roi_extractor": roi_extractor_kwargs(cfg["bbox_roi_extractor"], "roi_head.bbox_roi_extractor"),
        "score_thr": float(test.get("score_thr", 0.05)), "iou_threshold": _nms_iou(test.get("nms", {}), "test_cfg.rcnn.nms"),
        "max_per_img": int(test.get("max_per_img", 100)), "mask_thr_binary": float(test.get("mask_thr_binary", 0.5)),
    }
    if with_mask:
        kwargs["mask_roi_extractor"] = roi_extractor_kwargs(cfg.get("mask_roi_extractor"), "roi_head.mask_roi_extractor")
    if cfg["type"] == "StandardRoIHead":
        if cfg.get("num_stages", 1) != 1:
            raise ValueError("roi_head: StandardRoIHead has one stage")
        kwargs["bbox_head"] = bbox_head_kwargs(cfg["bbox_head"], "roi_head.bbox_head")
        kwargs["mask_head"] = mask_head_kwargs(cfg["mask_head"], "roi_head.mask_head") if with_mask else None
        return {"type": "RoIHeads", **kwargs}
    stages = int(cfg["num_stages"])

    def per_stage(value: Any, name: str) -> list[Any]:
        # mmdet repeats a single dict for every stage
        values = list(value) if isinstance(value, (list, tuple)) else [value] * stages
        if len(values) != stages:
            raise ValueError(f"roi_head.{name}: {len(values)} entries for {stages} stages")
        return values

    kwargs["bbox_heads"] = [bbox_head_kwargs(c, f"roi_head.bbox_head.{i}") for i, c in enumerate(per_stage(cfg["bbox_head"], "bbox_head"))]
    kwargs["mask_heads"] = (
        [mask_head_kwargs(c, f"roi_head.mask_head.{i}") for i, c in enumerate(per_stage(cfg["mask_head"], "mask_head"))]
        if with_mask else None
    )
    return {"type": "CascadeRoIHeads", **kwargs}


def extra_attention_kwargs(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Upstream's ``ExtraAttention`` neck (its ``norm_layer`` is always LayerNorm in a config)."""
    cfg = _check_type(cfg, ("ExtraAttention",), where)
    _check_keys(cfg, ("in_channels", "num_head", "with_ffn", "ffn_ratio", "drop_path", "init_values", "use_final_norm", "with_cp"), where)
    kwargs = {"in_channels": list(cfg["in_channels"]), "num_head": int(cfg["num_head"])}
    for key in ("with_ffn", "ffn_ratio", "drop_path", "init_values", "use_final_norm", "with_cp"):
        if key in cfg:
            kwargs[key] = cfg[key]
    return {"type": "ExtraAttention", **kwargs}


def necks_kwargs(cfg: Any) -> Any:
    """One neck dict, or mmdet's list of necks run in order (HTC++: ``ExtraAttention`` then ``FPN``)."""
    if not isinstance(cfg, (list, tuple)):
        return neck_kwargs(cfg)
    if not cfg:
        raise ValueError("neck: an empty list of necks")
    return [
        extra_attention_kwargs(c, f"neck[{i}]") if isinstance(c, Mapping) and c.get("type") == "ExtraAttention" else neck_kwargs(c)
        for i, c in enumerate(cfg)
    ]


def htc_mask_head_kwargs(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """mmdet ``HTCMaskHead``: an ``FCNMaskHead`` without norms plus ``with_conv_res``."""
    cfg = _check_type(cfg, ("HTCMaskHead",), where)
    fcn = mask_head_kwargs({k: v for k, v in cfg.items() if k != "with_conv_res"} | {"type": "FCNMaskHead"}, where)
    if fcn.pop("norm"):
        raise ValueError(f"{where}: HTCMaskHead with norm_cfg is not supported")
    return {**fcn, "with_conv_res": bool(cfg.get("with_conv_res", True))}


def semantic_head_kwargs(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """mmdet ``FusedSemanticHead`` (no norms; its loss settings are training-only)."""
    cfg = _check_type(cfg, ("FusedSemanticHead",), where)
    _check_keys(cfg, ("num_ins", "fusion_level", "num_convs", "in_channels", "conv_out_channels", "num_classes",
                      "ignore_label", "loss_weight", "norm_cfg"), where)
    if cfg.get("norm_cfg") is not None:
        raise ValueError(f"{where}: FusedSemanticHead with norm_cfg is not supported")
    return {"num_ins": int(cfg["num_ins"]), "fusion_level": int(cfg["fusion_level"]), "num_convs": int(cfg.get("num_convs", 4)),
            "in_channels": int(cfg.get("in_channels", 256)), "conv_out_channels": int(cfg.get("conv_out_channels", 256)),
            "num_classes": int(cfg.get("num_classes", 183))}


def soft_nms_kwargs(cfg: Any, where: str) -> dict[str, Any]:
    """mmcv ``soft_nms`` settings of ``test_cfg.rcnn.nms`` (classes kept apart, mmcv's split rule)."""
    cfg = _check_type(cfg, ("soft_nms",), where)
    _check_keys(cfg, ("iou_threshold", "sigma", "min_score", "method", "offset", "class_agnostic", "split_thr"), where)
    if cfg.get("class_agnostic", False) or cfg.get("split_thr", 10000) != 10000:
        raise ValueError(f"{where}: class_agnostic and split_thr other than mmcv's defaults are not supported")
    return {k: cfg[k] for k in ("iou_threshold", "sigma", "min_score", "method", "offset") if k in cfg}


def htc_roi_head_kwargs(cfg: Mapping[str, Any], test_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mmdet ``HybridTaskCascadeRoIHead`` (with semantic head, mask information flow, semantic fusion into
    both branches) + ``test_cfg.rcnn`` with soft-NMS -> ``HTCRoIHeads``."""
    cfg = _check_type(cfg, ("HybridTaskCascadeRoIHead",), "roi_head")
    _check_keys(cfg, ("bbox_roi_extractor", "bbox_head", "mask_roi_extractor", "mask_head", "num_stages", "stage_loss_weights",
                      "semantic_roi_extractor", "semantic_head", "semantic_fusion", "interleaved", "mask_info_flow", "test_cfg"), "roi_head")
    for part in ("mask_head", "semantic_head", "semantic_roi_extractor"):
        if cfg.get(part) is None:
            raise ValueError(f"roi_head: HybridTaskCascadeRoIHead without {part} is not supported")
    if not cfg.get("mask_info_flow", True):
        raise ValueError("roi_head: HybridTaskCascadeRoIHead with mask_info_flow=False is not supported")
    if set(cfg.get("semantic_fusion", ("bbox", "mask"))) != {"bbox", "mask"}:
        raise ValueError(f"roi_head: semantic_fusion {cfg['semantic_fusion']!r} is not supported (only ('bbox', 'mask'))")
    test = dict(test_cfg)
    _check_keys(test, ("score_thr", "nms", "max_per_img", "mask_thr_binary"), "test_cfg.rcnn")
    stages = int(cfg["num_stages"])

    def per_stage(value: Any, name: str) -> list[Any]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * stages
        if len(values) != stages:
            raise ValueError(f"roi_head.{name}: {len(values)} entries for {stages} stages")
        return values

    semantic = roi_extractor_kwargs(cfg["semantic_roi_extractor"], "roi_head.semantic_roi_extractor")
    if len(semantic["featmap_strides"]) != 1 or semantic["sampling_ratio"] != 0:
        raise ValueError("roi_head.semantic_roi_extractor: one feature map stride and sampling_ratio=0 are supported")
    return {
        "type": "HTCRoIHeads",
        "bbox_heads": [bbox_head_kwargs(c, f"roi_head.bbox_head.{i}") for i, c in enumerate(per_stage(cfg["bbox_head"], "bbox_head"))],
        "mask_heads": [htc_mask_head_kwargs(c, f"roi_head.mask_head.{i}") for i, c in enumerate(per_stage(cfg["mask_head"], "mask_head"))],
        "semantic_head": semantic_head_kwargs(cfg["semantic_head"], "roi_head.semantic_head"),
        "bbox_roi_extractor": roi_extractor_kwargs(cfg["bbox_roi_extractor"], "roi_head.bbox_roi_extractor"),
        "mask_roi_extractor": roi_extractor_kwargs(cfg["mask_roi_extractor"], "roi_head.mask_roi_extractor"),
        "semantic_stride": int(semantic["featmap_strides"][0]), "semantic_roi_size": semantic["output_size"],
        "score_thr": float(test.get("score_thr", 0.05)), "soft_nms": soft_nms_kwargs(test.get("nms", {}), "test_cfg.rcnn.nms"),
        "max_per_img": int(test.get("max_per_img", 100)), "mask_thr_binary": float(test.get("mask_thr_binary", 0.5)),
    }


def detector_heads_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream's whole detection ``model`` dict (``neck``, ``rpn_head``, ``roi_head``, ``test_cfg``) ->
    ``TwoStageDetectorHeads(**kwargs)``. The ``backbone`` entry is not read here."""
    if isinstance(model_cfg, Mapping) and "decode_head" in model_cfg:
        raise ValueError("model: this is a segmentation model config (it has a decode_head): use load_upstream_segmentor")
    model_cfg = _check_type(model_cfg, DETECTOR_TYPES, "model")
    _check_keys(model_cfg, ("backbone", "neck", "rpn_head", "roi_head", "test_cfg"), "model")
    for part in ("neck", "rpn_head", "roi_head", "test_cfg"):
        value = model_cfg.get(part)
        # mmdet also takes a list of necks, run in order
        if not isinstance(value, Mapping) and not (part == "neck" and isinstance(value, (list, tuple))):
            raise ValueError(f"the detection model config needs a {part!r} dict (mmdet 2.x layout)")
    test_cfg = model_cfg["test_cfg"]
    for part in ("rpn", "rcnn"):
        if not isinstance(test_cfg.get(part), Mapping):
            raise ValueError(f"model.test_cfg needs an {part!r} dict")
    if model_cfg["type"] == "CascadeRCNN" and model_cfg["roi_head"].get("type") != "CascadeRoIHead":
        raise ValueError("model: a CascadeRCNN needs a CascadeRoIHead")
    htc = model_cfg["type"] == "HybridTaskCascade"
    if htc != (model_cfg["roi_head"].get("type") == "HybridTaskCascadeRoIHead"):
        raise ValueError("model: a HybridTaskCascade needs a HybridTaskCascadeRoIHead, and only it takes one")
    return {
        "neck": necks_kwargs(model_cfg["neck"]),
        "rpn_head": rpn_head_kwargs(model_cfg["rpn_head"], test_cfg["rpn"]),
        "roi_head": (htc_roi_head_kwargs if htc else roi_head_kwargs)(model_cfg["roi_head"], test_cfg["rcnn"]),
    }


def detector_heads_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``neck.*``, ``rpn_head.*`` and ``roi_head.*`` entries of an mmdet detector checkpoint, keys
    unchanged (``TwoStageDetectorHeads`` uses mmdet's names). Refuses a dict without any of them."""
    heads = {k: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIXES)}
    if not heads:
        raise ValueError("the checkpoint has no neck.*, rpn_head.* or roi_head.* entries: not an mmdet detector checkpoint")
    return heads


def checkpoint_num_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    """The class count of a whole mmdet detector checkpoint, from its (first) box classifier, which
    scores the classes and the background; None where it has none."""
    for key in ("roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.0.fc_cls.weight"):
        if key in state_dict and getattr(state_dict[key], "ndim", 0) == 2:
            return int(state_dict[key].shape[0]) - 1
    return None


def normalisation(img_norm_cfg: Optional[Mapping[str, Any]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mmdet's ``img_norm_cfg`` (0..255 units) -> (mean, std) in timm's 0..1 units."""
    if img_norm_cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if not isinstance(img_norm_cfg, Mapping):
        raise TypeError(f"img_norm_cfg must be a dict (mean, std, to_rgb), got {type(img_norm_cfg).__name__}")
    if not img_norm_cfg.get("to_rgb", True):
        raise ValueError("img_norm_cfg: to_rgb=False (a model fed BGR images) is not supported")
    try:
        mean, std = [float(v) / 255 for v in img_norm_cfg["mean"]], [float(v) / 255 for v in img_norm_cfg["std"]]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"img_norm_cfg needs mean and std, 3 numbers each in 0..255, got {dict(img_norm_cfg)!r}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"img_norm_cfg needs mean and std, 3 numbers each (std positive), got {dict(img_norm_cfg)!r}")
    return tuple(mean), tuple(std)


# the layers whose shape follows the class count: classifiers, class-specific box and mask regressors
CLASS_SPECIFIC = re.compile(r"^roi_head\.(bbox_head(\.\d+)?\.fc_(cls|reg)|mask_head(\.\d+)?\.conv_logits)\.")
_STAGE = re.compile(r"^roi_head\.bbox_head\.(\d+)\.")


def describe_checkpoint(state: Mapping[str, Any], backbone: bool, heads: bool) -> str:
    """Why ``state`` is not a whole detector checkpoint, and what it seems to be instead."""
    needs = "a detector needs backbone.*, neck.*, rpn_head.* and roi_head.* entries"
    if any(k.startswith(("decode_head.", "auxiliary_head.")) for k in state):
        return f"it is a segmentation checkpoint (decode_head.*): load it with a segmentor; {needs}"
    if heads:
        return f"it holds detector heads without backbone.* entries (a heads-only file: add the backbone's); {needs}"
    if backbone:
        return f"it is a backbone-only checkpoint (backbone.* without a neck or heads); {needs}"
    shown = ", ".join(list(state)[:5]) or "none"
    return f"it has no backbone.*, neck.*, rpn_head.* or roi_head.* entries (a backbone's own weights? first keys: {shown}); {needs}"


def checkpoint_num_classes(state: Mapping[str, Any]) -> Optional[int]:
    """The class count of a whole detection checkpoint's (first) box classifier, whose outputs are the
    classes and the background; None where it has none: build the detector for it before loading."""
    for key in ("roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.0.fc_cls.weight"):
        classifier = state.get(key)
        if getattr(classifier, "ndim", 0) >= 1:
            return int(classifier.shape[0]) - 1
    return None


def layout(stages: int, htc: bool = False) -> str:
    """A detector layout in words: HTC, an n-stage cascade or a single RoI stage."""
    if htc:
        return "an HTC (hybrid task cascade) detector"
    return f"a {stages}-stage Cascade R-CNN detector" if stages else "a Mask R-CNN / Faster R-CNN detector (one RoI stage)"


def checkpoint_layout(heads: Mapping[str, Any]) -> str:
    """The kind of detector whose ``neck.*``/``rpn_head.*``/``roi_head.*`` entries ``heads`` are, in words."""
    htc = any(k.startswith(("roi_head.semantic_head.", "neck.0.", "neck.1.")) for k in heads)
    return layout(len({m.group(1) for m in map(_STAGE.match, heads) if m}), htc)


def has_fpn(heads: Mapping[str, Any]) -> bool:
    """Whether a detector checkpoint's neck is an FPN (else upstream's no-FPN channel mapper)."""
    return any(k.startswith("neck.lateral_convs.") for k in heads)

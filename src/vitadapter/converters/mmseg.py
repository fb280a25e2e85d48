"""Upstream's whole segmentation models (mmseg 0.x ``model`` dicts and checkpoints) -> vitadapter's.

Upstream's segmentation configs describe a model as ``dict(backbone=..., decode_head=...,
auxiliary_head=..., test_cfg=...)``; its checkpoints hold ``backbone.*``, ``decode_head.*`` and
``auxiliary_head.*``. vitadapter's heads keep mmseg's parameter names, so only the backbone's keys
are converted (``converters.backbone``); head entries load as they are. Configs become the heads'
keyword arguments here; ``models.from_upstream`` builds them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from ..weights.read import as_dict, unwrap
from .fields import as_float, as_int
from .mmseg_mask2former import mask2former_head_kwargs

HEAD_PREFIXES = ("decode_head.", "auxiliary_head.")

# settings accepted without effect on the computed function (training-only bookkeeping, weights
# that come from the checkpoint, mm-config merge directives)
_HEAD_IGNORED = ("type", "init_cfg", "sampler", "_delete_", "conv_cfg")
_MODEL_IGNORED = ("type", "pretrained", "train_cfg", "init_cfg", "_delete_")
_MODEL_TYPES = ("EncoderDecoder", "EncoderDecoderMask2Former")


def check_model_cfg(model_cfg: Mapping[str, Any]) -> None:
    """Refuse a segmentation ``model`` dict of another type, with unknown settings or without its parts."""
    if not isinstance(model_cfg, Mapping):
        raise TypeError(f"model_cfg must be a dict, got {type(model_cfg).__name__}")
    unknown = sorted(set(model_cfg) - {"backbone", "decode_head", "auxiliary_head", "test_cfg", *_MODEL_IGNORED})
    if unknown:
        raise ValueError(f"unsupported settings in the segmentation model config: {', '.join(unknown)}")
    if model_cfg.get("type", "EncoderDecoder") not in _MODEL_TYPES:
        raise ValueError(f"segmentor type {model_cfg['type']!r} is not supported (supported: {', '.join(_MODEL_TYPES)})")
    for part in ("backbone", "decode_head"):
        if not isinstance(model_cfg.get(part), Mapping):
            raise ValueError(f"the segmentation model config needs a {part!r} dict")
    if isinstance(model_cfg.get("auxiliary_head"), (list, tuple)):
        raise ValueError("several auxiliary heads are not supported; give one auxiliary_head dict")


def head_kwargs(cfg: Mapping[str, Any], where: str, train_cfg: Optional[Mapping[str, Any]] = None) -> tuple[str, dict[str, Any]]:
    """An mmseg head config dict -> (head type, the head class's keyword arguments); unsupported types
    and settings are named. ``train_cfg``: the model's training settings (Mask2Former's matcher and
    point sampling)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind == "Mask2FormerHead":
        if where != "decode_head":
            raise ValueError(f"{where}: Mask2FormerHead is a decode head, not an auxiliary one")
        return kind, mask2former_head_kwargs(cfg, train_cfg)
    if kind not in _HEAD_KWARGS:
        supported = ", ".join([*_HEAD_KWARGS, "Mask2FormerHead"])
        raise ValueError(f"{where}: head type {kind!r} is not supported (supported: {supported})")
    return kind, _HEAD_KWARGS[kind](dict(cfg), where)


# Mask2Former's test_cfg also carries mmdet's panoptic/instance settings; upstream's segmentation
# path computes the semantic prediction whatever they say
_PANOPTIC_TEST_KEYS = ("panoptic_on", "semantic_on", "instance_on", "max_per_image", "iou_thr", "filter_low_score")


def inference_kwargs(test_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mmseg's ``test_cfg`` -> ``Segmentor`` inference arguments."""
    unknown = sorted(set(test_cfg) - {"mode", "crop_size", "stride", *_PANOPTIC_TEST_KEYS})
    if unknown:
        raise ValueError(f"unsupported test_cfg settings: {', '.join(unknown)}")
    mode = test_cfg.get("mode", "whole")
    if mode == "whole":
        return {"mode": "whole"}
    return {"mode": mode, "crop_size": _ints(test_cfg.get("crop_size"), "test_cfg.crop_size"),
            "stride": _ints(test_cfg.get("stride"), "test_cfg.stride")}


def is_classifier(key: str) -> bool:
    """The layers whose shape follows the class count: conv heads' ``conv_seg``, Mask2Former's ``cls_embed``."""
    return ".conv_seg." in key or key.startswith("decode_head.cls_embed.")


def checkpoint_num_classes(checkpoint: Mapping[str, Any]) -> Optional[int]:
    """The class count of a whole segmentation checkpoint's decode head (its classifier's outputs), or
    None where it has no classifier this loader knows: build the segmentor for it before loading."""
    state = unwrap(as_dict(checkpoint, "this checkpoint"), split_backbone=False)[0]
    classifier = state.get("decode_head.conv_seg.weight")  # UperNet and other convolutional heads
    if getattr(classifier, "ndim", 0) >= 1:
        return int(classifier.shape[0])
    queries = state.get("decode_head.cls_embed.weight")  # Mask2Former: the classes and "no object"
    return int(queries.shape[0]) - 1 if getattr(queries, "ndim", 0) >= 1 else None


# ---- head configs -------------------------------------------------------------------------------


def _uper_head(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    in_index = cfg.pop("in_index", [0, 1, 2, 3])
    if cfg.pop("input_transform", "multiple_select") != "multiple_select":
        raise ValueError(f"{where}: UPerHead reads the levels as they are (input_transform 'multiple_select')")
    kwargs = _common(cfg, where)
    kwargs.update(
        in_channels=_take(cfg, "in_channels", where),
        channels=_take(cfg, "channels", where),
        pool_scales=tuple(cfg.pop("pool_scales", (1, 2, 3, 6))),
        in_index=[in_index] if isinstance(in_index, int) else list(in_index),
    )
    _refuse_rest(cfg, where)
    return kwargs


def _fcn_head(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    if cfg.pop("input_transform", None) is not None:
        raise ValueError(f"{where}: FCNHead reads one level (input_transform None)")
    kwargs = _common(cfg, where)
    kwargs.update(
        in_channels=_take(cfg, "in_channels", where),
        channels=_take(cfg, "channels", where),
        in_index=cfg.pop("in_index", -1),
        num_convs=cfg.pop("num_convs", 2),
        kernel_size=cfg.pop("kernel_size", 3),
        dilation=cfg.pop("dilation", 1),
        concat_input=cfg.pop("concat_input", True),
    )
    _refuse_rest(cfg, where)
    return kwargs


def _common(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings every mmseg decode head takes; mmseg's defaults where the config is silent."""
    for key in _HEAD_IGNORED:
        cfg.pop(key, None)
    norm = cfg.pop("norm_cfg", None)
    if not isinstance(norm, Mapping) or norm.get("type") not in ("SyncBN", "BN", "BN2d"):
        raise ValueError(f"{where}: norm_cfg must be SyncBN or BN (got {norm!r}); heads without a norm are not supported")
    if norm.get("requires_grad", True) is not True:
        raise ValueError(f"{where}: frozen norm layers (requires_grad False) are not supported")
    act = cfg.pop("act_cfg", {"type": "ReLU"})
    if not isinstance(act, Mapping) or act.get("type") != "ReLU":
        raise ValueError(f"{where}: only ReLU activations are supported, got act_cfg {act!r}")
    loss = cfg.pop("loss_decode", {"type": "CrossEntropyLoss"})
    if not isinstance(loss, Mapping) or loss.get("type") != "CrossEntropyLoss" or loss.get("use_sigmoid", False):
        raise ValueError(f"{where}: only softmax CrossEntropyLoss is supported, got loss_decode {loss!r}")
    extra = sorted(set(loss) - {"type", "use_sigmoid", "loss_weight", "loss_name", "avg_non_ignore"})
    if extra or loss.get("avg_non_ignore"):
        raise ValueError(f"{where}: unsupported loss_decode settings: {', '.join(extra) or 'avg_non_ignore'}")
    return dict(
        num_classes=_take(cfg, "num_classes", where),
        dropout_ratio=cfg.pop("dropout_ratio", 0.1),
        align_corners=cfg.pop("align_corners", False),
        ignore_index=cfg.pop("ignore_index", 255),
        loss_weight=as_float(loss.get("loss_weight", 1.0), f"{where}: loss_decode.loss_weight"),
    )


def _take(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ValueError(f"{where}: {cfg.get('type', 'the head')} config needs {key!r}")
    return cfg.pop(key)


def _refuse_rest(cfg: Mapping[str, Any], where: str) -> None:
    if cfg:
        raise ValueError(f"{where}: unsupported settings: {', '.join(sorted(cfg))}")


def _ints(value: Any, field: str) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(as_int(v, field) for v in value)
    return value


_HEAD_KWARGS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "UPerHead": _uper_head,
    "FCNHead": _fcn_head,
}

"""Upstream's whole segmentation models (mmseg 0.x ``model`` dicts and checkpoints) -> ``Segmentor``.

Upstream's segmentation configs describe a model as ``dict(backbone=..., decode_head=...,
auxiliary_head=..., test_cfg=...)``; its checkpoints hold ``backbone.*``, ``decode_head.*`` and
``auxiliary_head.*``. The heads here keep mmseg's parameter names, so only the backbone's keys are
converted (by ``vitadapter.upstream``); head entries load as they are.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from torch import nn

from ..heads import FCNHead, Mask2FormerHead, UPerHead
from ..models.segmentor import Segmentor
from .fields import as_float, as_int
from .mmseg_mask2former import mask2former_head_kwargs
from ..upstream import Checkpoint, _as_dict, _unwrap, check_state_dict, convert_checkpoint, load_upstream, read_checkpoint

HEAD_PREFIXES = ("decode_head.", "auxiliary_head.")

# settings accepted without effect on the computed function (training-only bookkeeping, weights
# that come from the checkpoint, mm-config merge directives)
_HEAD_IGNORED = ("type", "init_cfg", "sampler", "_delete_", "conv_cfg")
_MODEL_IGNORED = ("type", "pretrained", "train_cfg", "init_cfg", "_delete_")
_MODEL_TYPES = ("EncoderDecoder", "EncoderDecoderMask2Former")


def load_upstream_segmentor(model_cfg: Mapping[str, Any], checkpoint: Optional[Checkpoint] = None) -> Segmentor:
    """Build upstream's segmentation model from its ``model`` dict and load a whole checkpoint.

    ``model_cfg``: ``backbone`` (a ``ViTAdapter`` / ``BEiTAdapter`` dict, as ``vitadapter.load_upstream``
    takes with codebase "segmentation"), ``decode_head`` (``UPerHead`` or ``Mask2FormerHead``, whose
    training settings may come in the model's ``train_cfg``), ``auxiliary_head`` (``FCNHead``,
    optional), ``test_cfg`` (``mode`` "whole" or "slide" with ``crop_size`` and ``stride``). BatchNorm stands in for upstream's SyncBN (same parameters and statistics).
    ``checkpoint``: a path (``.pth``, ``.pth.tar``, release ``.zip``) or a loaded dict with
    upstream's keys (or a vitadapter segmentor's own state dict).
    """
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
    backbone = load_upstream(model_cfg["backbone"], "segmentation")
    train_cfg = model_cfg.get("train_cfg") or None
    decode_head = build_head(model_cfg["decode_head"], "decode_head", train_cfg)
    auxiliary = model_cfg.get("auxiliary_head")
    if isinstance(auxiliary, (list, tuple)):
        raise ValueError("several auxiliary heads are not supported; give one auxiliary_head dict")
    auxiliary_head = build_head(auxiliary, "auxiliary_head") if auxiliary else None
    segmentor = Segmentor(backbone, decode_head, auxiliary_head, **inference_kwargs(model_cfg.get("test_cfg") or {}))
    if checkpoint is not None:
        load_segmentor_checkpoint(segmentor, checkpoint)
    return segmentor


def build_head(cfg: Mapping[str, Any], where: str, train_cfg: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """An mmseg head config dict -> the head module; unsupported types and settings are named.
    ``train_cfg``: the model's training settings (Mask2Former's matcher and point sampling)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind == "Mask2FormerHead":
        if where != "decode_head":
            raise ValueError(f"{where}: Mask2FormerHead is a decode head, not an auxiliary one")
        return Mask2FormerHead(**mask2former_head_kwargs(cfg, train_cfg))
    if kind not in HEAD_BUILDERS:
        supported = ", ".join([*HEAD_BUILDERS, "Mask2FormerHead"])
        raise ValueError(f"{where}: head type {kind!r} is not supported (supported: {supported})")
    return HEAD_BUILDERS[kind](dict(cfg), where)


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


def load_segmentor_checkpoint(segmentor: Segmentor, checkpoint: Checkpoint, keep_classifier: bool = True) -> list[str]:
    """Load a whole segmentation checkpoint (upstream's layout or vitadapter's) strictly.

    Returns the checkpoint keys left out: auxiliary-head entries when the segmentor has no auxiliary
    head, and, with ``keep_classifier=False``, classifier entries whose class count differs from the
    model's (those layers keep their fresh initialisation, for fine-tuning on other classes).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state = _unwrap(_as_dict(checkpoint, "this checkpoint"), split_backbone=False)[0]
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone_state:
        shown = ", ".join(list(state)[:5]) or "none"
        raise ValueError(f"not a segmentation checkpoint: no backbone.* keys (first keys: {shown})")
    converted = convert_checkpoint(backbone_state, segmentor.backbone)
    full = {f"backbone.{k}": v for k, v in converted.state.items()}
    dropped = []
    own = segmentor.state_dict()
    for key, value in state.items():
        if not key.startswith(HEAD_PREFIXES):
            if not key.startswith("backbone."):
                dropped.append(key)
            continue
        if key not in own and key.startswith("auxiliary_head.") and segmentor.auxiliary_head is None:
            dropped.append(key)
        elif not keep_classifier and _is_classifier(key) and key in own and own[key].shape != value.shape:
            dropped.append(key)
            full[key] = own[key]
        else:
            full[key] = value
    check_state_dict(segmentor, full)
    segmentor.load_state_dict(full)
    return sorted(dropped)


def _is_classifier(key: str) -> bool:
    """The layers whose shape follows the class count: conv heads' ``conv_seg``, Mask2Former's ``cls_embed``."""
    return ".conv_seg." in key or key.startswith("decode_head.cls_embed.")


def checkpoint_num_classes(checkpoint: Mapping[str, Any]) -> Optional[int]:
    """The class count of a whole segmentation checkpoint's decode head (its classifier's outputs), or
    None where it has no classifier this loader knows: build the segmentor for it before loading."""
    state = _unwrap(_as_dict(checkpoint, "this checkpoint"), split_backbone=False)[0]
    classifier = state.get("decode_head.conv_seg.weight")  # UperNet and other convolutional heads
    if getattr(classifier, "ndim", 0) >= 1:
        return int(classifier.shape[0])
    queries = state.get("decode_head.cls_embed.weight")  # Mask2Former: the classes and "no object"
    return int(queries.shape[0]) - 1 if getattr(queries, "ndim", 0) >= 1 else None


# ---- head configs -------------------------------------------------------------------------------


def _uper_head(cfg: dict[str, Any], where: str) -> UPerHead:
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
    return UPerHead(**kwargs)


def _fcn_head(cfg: dict[str, Any], where: str) -> FCNHead:
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
    return FCNHead(**kwargs)


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


HEAD_BUILDERS: dict[str, Callable[[dict[str, Any], str], nn.Module]] = {
    "UPerHead": _uper_head,
    "FCNHead": _fcn_head,
}

__all__ = ["HEAD_BUILDERS", "build_head", "inference_kwargs", "load_segmentor_checkpoint", "load_upstream_segmentor"]

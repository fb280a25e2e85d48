"""Loading weights into built models: any supported checkpoint layout, strictly, every key named.

``load_checkpoint`` loads a backbone (``ViTAdapter``), ``load_segmentor_checkpoint`` a whole
segmentor, ``load_detector_checkpoint`` a whole detector, ``load_pretrained`` whatever a pretrained cfg points at (a file, a folder, a Hub repo or
a release URL, fetched by ``weights.fetch``). Reading is ``weights.read``'s, renaming foreign keys
``converters``'; this module puts the two together on a model instance.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from torch import nn

from ..converters.backbone import Conversion, adapt_input_convs, convert_checkpoint
from ..converters import mmdet
from ..converters.mmseg import HEAD_PREFIXES, is_classifier
from ..detection import CascadeRoIHeads
from ..detection.htc_roi_heads import HTCRoIHeads
from ..weights.fetch import fetch_weights
from ..weights.read import Checkpoint, as_dict, check_state_dict, read_checkpoint, read_weights, unwrap


def load_checkpoint(model: nn.Module, checkpoint: Checkpoint) -> Conversion:
    """Load a checkpoint (path or dict, any supported layout) into the ViTAdapter ``model``, strictly."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    conversion = convert_checkpoint(checkpoint, model)
    adapt_input_convs(model, conversion.state)
    check_state_dict(model, conversion.state)
    model.load_state_dict(conversion.state)
    return conversion


def load_pretrained(
    model: nn.Module,
    pretrained_cfg: Mapping[str, Any],
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    timeout: Optional[float] = None,
) -> Conversion:
    """Fetch the weights ``pretrained_cfg`` points at (file, folder, Hub repo or URL) and load them."""
    checkpoint = pretrained_cfg.get("state_dict") or read_weights(fetch_weights(pretrained_cfg, cache_dir, timeout))
    return load_checkpoint(model, checkpoint)


def load_segmentor_checkpoint(segmentor: nn.Module, checkpoint: Checkpoint, keep_classifier: bool = True) -> list[str]:
    """Load a whole segmentation checkpoint (upstream's layout or vitadapter's) strictly.

    Returns the checkpoint keys left out: auxiliary-head entries when the segmentor has no auxiliary
    head, and, with ``keep_classifier=False``, classifier entries whose class count differs from the
    model's (those layers keep their fresh initialisation, for fine-tuning on other classes).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state = unwrap(as_dict(checkpoint, "this checkpoint"), split_backbone=False)[0]
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone_state:
        shown = ", ".join(list(state)[:5]) or "none"
        raise ValueError(f"not a segmentation checkpoint: no backbone.* keys (first keys: {shown})")
    if not any(k.startswith(HEAD_PREFIXES) for k in state) and any(k.startswith(mmdet.HEAD_PREFIXES) for k in state):
        raise ValueError("not a segmentation checkpoint: it is a whole detector's (neck.*, rpn_head.*, roi_head.*, no "
                         "decode_head.*): load it with a detector (mask_rcnn_*, cascade_mask_rcnn_*)")
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
        elif not keep_classifier and is_classifier(key) and key in own and own[key].shape != value.shape:
            dropped.append(key)
            full[key] = own[key]
        else:
            full[key] = value
    check_state_dict(segmentor, full)
    segmentor.load_state_dict(full)
    return sorted(dropped)


def load_detector_checkpoint(detector: nn.Module, checkpoint: Checkpoint, keep_classifier: bool = True) -> list[str]:
    """Load a whole detection checkpoint (mmdet's layout, upstream's backbone keys or vitadapter's)
    into ``detector`` strictly. Returns the checkpoint keys left out: entries of no part of the
    model and, with ``keep_classifier=False``, the class-specific layers whose class count differs
    from the model's (those keep their fresh initialisation, for fine-tuning on other classes)."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state = unwrap(as_dict(checkpoint, "this checkpoint"), split_backbone=False)[0]
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in state.items() if k.startswith(mmdet.HEAD_PREFIXES)}
    if not backbone_state or not heads:
        raise ValueError(f"not a whole detector checkpoint: {mmdet.describe_checkpoint(state, bool(backbone_state), bool(heads))}")
    _check_detector_layout(detector, heads)
    converted = convert_checkpoint(backbone_state, detector.backbone)
    full = {f"backbone.{k}": v for k, v in converted.state.items()}
    own = detector.state_dict()
    dropped = [k for k in state if not k.startswith(("backbone.", *mmdet.HEAD_PREFIXES))]
    for key, value in heads.items():
        if not keep_classifier and mmdet.CLASS_SPECIFIC.match(key) and key in own and own[key].shape != value.shape:
            dropped.append(key)
            full[key] = own[key]
        else:
            full[key] = value
    check_state_dict(detector, full)
    detector.load_state_dict(full)
    return sorted(dropped)


def _check_detector_layout(detector: nn.Module, heads: Mapping[str, Any]) -> None:
    """Refuse the checkpoint of another detector type by name, before keys are compared one by one."""
    theirs = mmdet.checkpoint_layout(heads)
    roi_head = detector.roi_head
    stages = len(roi_head.bbox_heads) if isinstance(roi_head, (CascadeRoIHeads, HTCRoIHeads)) else 0
    ours = mmdet.layout(stages, htc=isinstance(roi_head, HTCRoIHeads))
    if theirs != ours:
        raise ValueError(f"this checkpoint is {theirs} and the model is {ours}: build the model from the checkpoint's own config")
    fpn = mmdet.has_fpn(heads)
    if not isinstance(roi_head, HTCRoIHeads) and fpn != (type(detector.neck).__name__ == "FPN"):
        theirs_neck = "an FPN" if fpn else "a ChannelMapperWithPooling (no FPN)"
        raise ValueError(f"this checkpoint's neck is {theirs_neck} and the model's a {type(detector.neck).__name__}")

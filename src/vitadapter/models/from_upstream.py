"""Models built from foreign configs: upstream ViT-Adapter's backbones, segmentors and detectors, and the DINOv2 and
DINOv3 adapters, with their checkpoints. The configs are translated by ``converters``; this module
checks the result, builds the model and loads its weights."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from torch import nn

from ..converters import dinov2, dinov3
from ..converters.backbone import CODEBASES, upstream_kwargs
from ..converters.mmdet import detector_heads_kwargs, normalisation
from ..converters.mmseg import check_model_cfg, head_kwargs, inference_kwargs
from ..data import coco
from ..heads import FCNHead, Mask2FormerHead, UPerHead
from ..weights.read import Checkpoint, as_dict, check_state_dict, read_checkpoint, unwrap
from .checkpoints import load_checkpoint, load_detector_checkpoint, load_segmentor_checkpoint
from .config_checks import check_fields, check_model_args, upstream_defaults
from .detector import Detector
from .segmentor import Segmentor
from .vit_adapter import ViTAdapter

# codebases whose configs and keys live in their own converter module
_FOREIGN = {"dinov2": dinov2, "dinov3": dinov3}
_HEADS: dict[str, type[nn.Module]] = {"UPerHead": UPerHead, "FCNHead": FCNHead, "Mask2FormerHead": Mask2FormerHead}


def load_upstream(
    backbone_cfg: Mapping[str, Any],
    codebase: str,
    checkpoint: Optional[Checkpoint] = None,
) -> ViTAdapter:
    """Build the exact equivalent of a foreign adapter config and load its weights.

    ``codebase`` names the code the config comes from:

    - "segmentation" / "detection": upstream ViT-Adapter's ``model.backbone`` dict (``type``
      ``ViTAdapter``, ``BEiTAdapter`` or ``UniPerceiverAdapter``). The segmentation codebase adds each
      interaction's ViT output to its pyramid level, the detection codebase the final one (and uses windows);
    - "dinov2": the kwargs of DINOv2's segmentation ``ViTAdapter``;
    - "dinov3": ``{"vit": DinoVisionTransformer kwargs, "adapter": DINOv3_Adapter kwargs}``.

    ``checkpoint`` is a path (``.pth``, ``.pth.tar``, release ``.zip``) or an already loaded dict in
    that code's own key layout (``state_dict``/``model`` wrappers and ``module.`` prefixes are
    accepted; upstream's ``backbone.`` prefix is stripped and head keys dropped). ``with_cp`` turns
    on activation checkpointing as the config asks.
    """
    foreign = _FOREIGN.get(codebase)
    model = ViTAdapter(**model_kwargs(backbone_cfg, codebase))
    if backbone_cfg.get("with_cp") or backbone_cfg.get("adapter", {}).get("with_cp"):
        model.set_grad_checkpointing(True)
    if checkpoint is not None:
        if foreign is None:
            load_checkpoint(model, checkpoint)
        else:
            state = _foreign_state(checkpoint, codebase)
            state = foreign.convert_state(state, model)
            check_state_dict(model, state)
            model.load_state_dict(state)
    return model


def model_kwargs(backbone_cfg: Mapping[str, Any], codebase: str) -> dict[str, Any]:
    """The ``ViTAdapter`` keyword arguments of a foreign adapter config (``codebase`` as in
    ``load_upstream``), every value checked (``config_checks``) before anything is built."""
    if codebase not in CODEBASES:
        raise ValueError(f"codebase must be one of {CODEBASES}, got {codebase!r}")
    if not isinstance(backbone_cfg, Mapping):
        raise TypeError(f"config must be a dict, got {type(backbone_cfg).__name__}")
    source = f"the {codebase} backbone config"
    foreign = _FOREIGN.get(codebase)
    if foreign is None:
        # before the translation uses a value (depth expands window lists): bad ones are named
        check_fields(backbone_cfg, source)
    kwargs = foreign.adapter_kwargs(backbone_cfg) if foreign else upstream_kwargs(backbone_cfg, codebase)
    check_model_args(kwargs, source, defaults=upstream_defaults())
    return kwargs


def _foreign_state(checkpoint: Checkpoint, codebase: str) -> dict[str, Any]:
    """The state dict of a DINOv2/DINOv3 adapter checkpoint: wrappers and ``module.`` go; for DINOv2 a
    whole segmentor's ``backbone.`` keys are kept (DINOv3 keeps its ViT under ``backbone.`` itself)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    state, _ = unwrap(as_dict(checkpoint, "this checkpoint"), split_backbone=codebase == "dinov2")
    return state


def load_upstream_segmentor(model_cfg: Mapping[str, Any], checkpoint: Optional[Checkpoint] = None) -> Segmentor:
    """Build upstream's segmentation model from its ``model`` dict and load a whole checkpoint.

    ``model_cfg``: ``backbone`` (a ``ViTAdapter`` / ``BEiTAdapter`` dict, as ``load_upstream`` takes
    with codebase "segmentation"), ``decode_head`` (``UPerHead`` or ``Mask2FormerHead``, whose
    training settings may come in the model's ``train_cfg``), ``auxiliary_head`` (``FCNHead``,
    optional), ``test_cfg`` (``mode`` "whole" or "slide" with ``crop_size`` and ``stride``).
    BatchNorm stands in for upstream's SyncBN (same parameters and statistics).
    ``checkpoint``: a path (``.pth``, ``.pth.tar``, release ``.zip``) or a loaded dict with
    upstream's keys (or a vitadapter segmentor's own state dict).
    """
    check_model_cfg(model_cfg)
    backbone = load_upstream(model_cfg["backbone"], "segmentation")
    decode_head = build_head(model_cfg["decode_head"], "decode_head", model_cfg.get("train_cfg") or None)
    auxiliary = model_cfg.get("auxiliary_head")
    auxiliary_head = build_head(auxiliary, "auxiliary_head") if auxiliary else None
    segmentor = Segmentor(backbone, decode_head, auxiliary_head, **inference_kwargs(model_cfg.get("test_cfg") or {}))
    if checkpoint is not None:
        load_segmentor_checkpoint(segmentor, checkpoint)
    return segmentor


def build_head(cfg: Mapping[str, Any], where: str, train_cfg: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """An mmseg head config dict -> the head module (``converters.mmseg.head_kwargs`` names what is
    not supported)."""
    kind, kwargs = head_kwargs(cfg, where, train_cfg)
    return _HEADS[kind](**kwargs)


def load_upstream_detector(
    model_cfg: Mapping[str, Any],
    checkpoint: Optional[Checkpoint] = None,
    img_norm_cfg: Optional[Mapping[str, Any]] = None,
) -> Detector:
    """Build upstream's detector from its mmdet 2.x ``model`` dict and load a whole checkpoint.

    ``model_cfg``: ``type`` (``MaskRCNN``, ``CascadeRCNN``, or ``FasterRCNN``, which gives no masks),
    ``backbone`` (a ``ViTAdapter`` / ``BEiTAdapter`` / ``UniPerceiverAdapter`` dict, as
    ``load_upstream`` takes with codebase "detection"), ``neck``, ``rpn_head``, ``roi_head`` and
    ``test_cfg``, as upstream's config files write them (``_delete_``, ``pretrained`` and training
    settings are accepted unread). ``checkpoint``: a path (``.pth``, ``.pth.tar``, release ``.zip``)
    or a loaded dict with mmdet's keys. ``img_norm_cfg``: the config's ``img_norm_cfg`` (mean and std
    in 0..255, ``to_rgb=True``) of its test pipeline; ImageNet's by default, what most of upstream's
    detection configs use. 80 classes get COCO's names.
    """
    heads = detector_heads_kwargs(model_cfg)
    if not isinstance(model_cfg.get("backbone"), Mapping):
        raise ValueError("the detection model config needs a 'backbone' dict (upstream's ViTAdapter / BEiTAdapter)")
    mean, std = normalisation(img_norm_cfg)
    backbone = load_upstream(model_cfg["backbone"], "detection")
    detector = Detector(backbone, **heads, mean=mean, std=std)
    if detector.num_classes == len(coco.CLASSES):
        detector.class_names = coco.CLASSES
    if checkpoint is not None:
        load_detector_checkpoint(detector, checkpoint)
    return detector

"""The segmentor: a backbone that gives a feature pyramid, a decode head, and the way upstream
turns them into class logits at the image size (whole image or sliding windows)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg
from torch import nn

from ..data import ade20k, cityscapes, coco_stuff
from .checkpoints import load_segmentor_checkpoint
from .task_model import create_task_model, prefixed_group_rule


class Segmentor(nn.Module):
    """``backbone`` (image -> list of NCHW maps) + ``decode_head`` (+ ``auxiliary_head``, training only).

    ``segmentor(image)`` returns logits (B, num_classes, H, W) at the image size. ``mode`` is how:
    "whole" runs the image at once; "slide" runs ``crop_size`` windows every ``stride`` pixels and
    averages the overlaps, as upstream evaluates (crop 512 stride 341 for its 512 models, 640/426 and
    896/512 for BEiT-L). Both resize the head's logits bilinearly (``align_corners=False``). Windows
    are cut from the image as given: an image smaller than a crop is one window.

    ``segmentor.loss(images, labels)`` gives the training losses of every head (auxiliary ones
    prefixed ``aux.``); the head weights them as configured.

    ``model_args``: for a registered segmentor, the keyword arguments that rebuild it through its
    architecture (the backbone's, ``num_classes`` and the heads'), what ``save_pretrained`` writes;
    None for one assembled otherwise.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        auxiliary_head: Optional[nn.Module] = None,
        mode: str = "whole",
        crop_size: Optional[Sequence[int] | int] = None,
        stride: Optional[Sequence[int] | int] = None,
        align_corners: bool = False,
        class_names: Optional[Sequence[str]] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.align_corners = align_corners
        self.set_inference(mode, crop_size, stride)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        self.class_names = tuple(class_names) if class_names is not None else None
        self.model_args: Optional[dict[str, Any]] = None

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def set_inference(
        self, mode: str, crop_size: Optional[Sequence[int] | int] = None, stride: Optional[Sequence[int] | int] = None
    ) -> None:
        """Switch between whole-image and sliding-window inference."""
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("slide inference needs crop_size and stride")
            crop_size, stride = _pair(crop_size, "crop_size"), _pair(stride, "stride")
            if any(s > c for s, c in zip(stride, crop_size)):
                raise ValueError(f"a stride {stride} larger than the crop {crop_size} would leave pixels unseen")
        self.mode = mode
        self.crop_size = crop_size if mode == "slide" else None
        self.stride = stride if mode == "slide" else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.mode == "slide":
            return self.slide_inference(image)
        return self.encode_decode(image)

    def encode_decode(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-image logits at the image size."""
        logits = self.decode_head.semantic_logits(self.backbone(image))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def slide_inference(self, image: torch.Tensor) -> torch.Tensor:
        """Overlapping ``crop_size`` windows every ``stride``; the last window of a row or column is
        moved back to end at the border, and overlaps are averaged."""
        if self.crop_size is None or self.stride is None:
            raise ValueError("slide inference needs crop_size and stride: call set_inference('slide', crop, stride)")
        (crop_h, crop_w), (stride_h, stride_w) = self.crop_size, self.stride
        batch, _, height, width = image.shape
        rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
        total: Optional[torch.Tensor] = None
        count = image.new_zeros((1, 1, height, width))
        for row in range(rows):
            for col in range(cols):
                bottom, right = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
                top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
                logits = self.encode_decode(image[:, :, top:bottom, left:right])
                if total is None:
                    total = logits.new_zeros((batch, logits.shape[1], height, width))
                total[:, :, top:bottom, left:right] += logits
                count[:, :, top:bottom, left:right] += 1
        return total / count

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses: ``labels`` (B, H, W) class indices at the image size, 255 = ignore."""
        if labels.dim() != 3 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (B, H, W) with the images' batch, got {tuple(labels.shape)} for {tuple(images.shape)}")
        features = self.backbone(images)
        losses = dict(self.decode_head.loss(features, labels))
        if self.auxiliary_head is not None:
            losses.update({f"aux.{k}": v for k, v in self.auxiliary_head.loss(features, labels).items()})
        return losses

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: the backbone's groups with its names prefixed; the
        adapter and the heads (unmatched) join the last group, at the full learning rate."""
        return {group: prefixed_group_rule(rule, "backbone.") for group, rule in self.backbone.group_matcher(coarse).items()}

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


# ---- registered segmentors: the datasets of upstream's releases and their pretrained cfgs ----------

# classes of the datasets upstream released models for (tags set num_classes and label_names)
ADE20K = dict(num_classes=150, label_names=ade20k.CLASSES)
COCO_STUFF = dict(num_classes=171, label_names=coco_stuff.CLASSES)
CITYSCAPES = dict(num_classes=19, label_names=cityscapes.CLASSES)


def release(backbone_tag: str, test_size: tuple[int, int], **kwargs: Any) -> dict[str, Any]:
    """The whole model of the release file a backbone tag already points at (one file, one entry),
    ADE20K's classes unless ``kwargs`` say otherwise. ``test_size`` (short, long): upstream's test
    scale, images are resized to fit it keeping their ratio."""
    cfg = get_pretrained_cfg(backbone_tag).to_dict()
    keep = ("url", "origin_url", "notes", "mean", "std", "input_size", "license")
    entry = dict({k: cfg[k] for k in keep if cfg.get(k) is not None}, **ADE20K, test_input_size=(3, *test_size))
    return dict(entry, **kwargs)


# (backbone width, number of classes, the resolved pretrained cfg) -> (decode head, auxiliary head or None)
HeadsFactory = Callable[[int, int, Any], tuple[nn.Module, Optional[nn.Module]]]


def create_segmentor(
    variant: str,
    backbone: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    heads: HeadsFactory,
    crop: int,
    stride: int,
    head_args: dict[str, Any],
) -> Segmentor:
    """A registered segmentor: the ``backbone`` architecture, the heads ``heads`` makes, sliding-window
    inference over ``crop`` every ``stride`` (upstream's test settings); loading and the other
    arguments as ``task_model.create_task_model`` says."""

    def make(net: nn.Module, num_classes: int, cfg: Any, names: Optional[tuple[str, ...]]) -> Segmentor:
        decode_head, auxiliary_head = heads(net.feature_info[0]["num_chs"], num_classes, cfg)
        return Segmentor(net, decode_head, auxiliary_head, "slide", crop, stride, class_names=names)

    return create_task_model(variant, backbone, pretrained, kwargs, make, load_segmentor_checkpoint, head_args,
                             default_classes=150, kind="segmentor", output="class logits")


def _pair(value: Sequence[int] | int, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair

"""Everything of a two-stage detector after the backbone: neck -> RPN -> RoI heads, as one module whose
state-dict keys are mmdet's (``neck.*``, ``rpn_head.*``, ``roi_head.*``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .channel_mapper import ChannelMapperWithPooling
from .extra_attention import ExtraAttention
from .fpn import FPN
from .htc_roi_heads import HTCRoIHeads
from .postprocess import paste_masks
from .roi_heads import CascadeRoIHeads, RoIHeads, boxes_to_rois
from .rpn import RPNHead
from .test_time_aug import AugTest, merge_mask_probabilities, merge_views, to_view

NECKS = {"FPN": FPN, "ChannelMapperWithPooling": ChannelMapperWithPooling, "ExtraAttention": ExtraAttention}
ROI_HEADS = {"RoIHeads": RoIHeads, "CascadeRoIHeads": CascadeRoIHeads, "HTCRoIHeads": HTCRoIHeads}


def _build(registry: Mapping[str, type], kwargs: Mapping[str, Any], where: str) -> nn.Module:
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{where} must be a dict of constructor arguments, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    kind = kwargs.pop("type", None)
    if kind not in registry:
        raise ValueError(f"{where}: type {kind!r} is not supported (supported: {', '.join(registry)})")
    return registry[kind](**kwargs)


def _build_neck(neck: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> nn.Module:
    """One neck, or a chain of them run in order (mmdet's list of necks, e.g. HTC++'s ExtraAttention then
    FPN): an ``nn.Sequential``, so the checkpoint keys are mmdet's ``neck.{i}.*``."""
    if isinstance(neck, Sequence) and not isinstance(neck, str):
        if not neck:
            raise ValueError("neck: an empty list of necks")
        return nn.Sequential(*(_build(NECKS, n, f"neck[{i}]") for i, n in enumerate(neck)))
    return _build(NECKS, neck, "neck")


def _check_sizes(sizes: Sequence[Sequence[int]], batch: int, name: str) -> list[tuple[int, int]]:
    if len(sizes) != batch:
        raise ValueError(f"{name} must give one (h, w) per image: {batch} images, {len(sizes)} sizes")
    out = []
    for size in sizes:
        if len(size) < 2 or int(size[0]) < 1 or int(size[1]) < 1:
            raise ValueError(f"{name} must hold positive (h, w) pairs, got {tuple(size)}")
        out.append((int(size[0]), int(size[1])))
    return out


class TwoStageDetectorHeads(nn.Module):
    """The detector minus its backbone: ``neck`` (``{"type": "FPN" | "ChannelMapperWithPooling" |
    "ExtraAttention", ...}``, or a list of them run in order), ``rpn_head`` (``RPNHead`` kwargs) and
    ``roi_head`` (``{"type": "RoIHeads" | "CascadeRoIHeads" | "HTCRoIHeads", ...}``).
    ``vitadapter.converters.mmdet.detector_heads_kwargs`` makes these from upstream's ``model`` dict.

    ``detect_from_pyramid`` is mmdet's ``simple_test(rescale=True)`` after the backbone;
    ``detect_aug_from_pyramids`` upstream's multi-scale flip test of HTC++ (``test_time_aug``).
    """

    def __init__(self, neck: Mapping[str, Any] | Sequence[Mapping[str, Any]], rpn_head: Mapping[str, Any], roi_head: Mapping[str, Any]):
        super().__init__()
        self.neck = _build_neck(neck)
        if not isinstance(rpn_head, Mapping):
            raise TypeError(f"rpn_head must be a dict of RPNHead arguments, got {type(rpn_head).__name__}")
        self.rpn_head = RPNHead(**rpn_head)
        self.roi_head = _build(ROI_HEADS, roi_head, "roi_head")

    @property
    def num_classes(self) -> int:
        return self.roi_head.num_classes

    def detect_from_pyramid(
        self,
        pyramid: Sequence[torch.Tensor],
        image_sizes: Sequence[Sequence[int]],
        original_sizes: Sequence[Sequence[int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Per image {"boxes" (N, 4) x1y1x2y2 in original pixels, "scores" (N,), "labels" (N,) 0-based,
        "masks" (N, H, W) bool at the original size}, best score first.

        ``pyramid``: the backbone's levels (strides 4, 8, 16, 32) of a padded batch; ``image_sizes``:
        each image's (h, w) inside the batch (mmdet's ``img_shape``); ``original_sizes``: the (h, w) to
        report in (``ori_shape``). Scale factors are their per-axis ratios.
        """
        if not isinstance(pyramid, Sequence) or not all(isinstance(p, torch.Tensor) and p.dim() == 4 for p in pyramid):
            raise TypeError("pyramid must be a list of NCHW tensors")
        batch = pyramid[0].shape[0] if len(pyramid) else 0
        image_sizes = _check_sizes(image_sizes, batch, "image_sizes")
        original_sizes = _check_sizes(original_sizes, batch, "original_sizes")
        if batch == 0:
            return []
        padded = (pyramid[0].shape[-2] * 4, pyramid[0].shape[-1] * 4)
        for h, w in image_sizes:
            if h > padded[0] or w > padded[1]:
                raise ValueError(f"image_sizes: ({h}, {w}) does not fit in the batch the stride-4 level covers {padded}")
        features = self.neck(pyramid)
        proposals = self.rpn_head.proposals(*self.rpn_head(features), image_sizes)
        return self.roi_head(features, proposals, image_sizes, original_sizes)

    def detect_aug_from_pyramids(
        self,
        pyramids: Sequence[Sequence[torch.Tensor]],
        image_sizes: Sequence[Sequence[int]],
        flipped: Sequence[bool],
        original_size: Sequence[int],
        aug: AugTest,
    ) -> dict[str, torch.Tensor]:
        """One image's detections under ``aug`` (upstream's ``HybridTaskCascadeAug.aug_test``), as
        ``detect_from_pyramid`` gives them: ``pyramids`` are the backbone's levels of each view in
        ``aug.views()``'s order (a batch of one each), ``image_sizes`` each view's (h, w) inside its
        batch, ``flipped`` whether it was mirrored, ``original_size`` the image's (h, w)."""
        roi = self.roi_head
        if not isinstance(roi, HTCRoIHeads):
            raise ValueError(f"the multi-scale flip test is upstream's for HTC++ only, not for {type(roi).__name__}")
        if not roi.bbox_heads[-1].reg_class_agnostic:
            raise ValueError("the multi-scale flip test votes over one box per RoI: it needs class-agnostic box regression")
        views = aug.views()
        if not (len(pyramids) == len(image_sizes) == len(flipped) == len(views)):
            raise ValueError(f"pyramids, image_sizes and flipped must give one entry per view of aug ({len(views)}), got "
                             f"{len(pyramids)}, {len(image_sizes)} and {len(flipped)}")
        if [f for _, f, _ in views] != [bool(f) for f in flipped]:
            raise ValueError("flipped must follow aug.views(): per scale the unflipped view, then the mirrored one")
        sizes = _check_sizes(image_sizes, len(views), "image_sizes")
        (original,) = _check_sizes([original_size], 1, "original_size")
        boxes, scores, kept = [], [], []
        for pyramid, size in zip(pyramids, sizes):
            features = self.neck(pyramid)
            proposals = self.rpn_head.proposals(*self.rpn_head(features), [size])
            semantic = roi.semantic_features(features)
            ((view_boxes, view_scores),) = roi.candidates(features, semantic, proposals, [size])
            boxes.append(view_boxes)
            scores.append(view_scores)
            # upstream keeps every view's features: the masks are read at the merged boxes
            kept.append((features, semantic))
        dets, labels = merge_views(boxes, scores, sizes, flipped, original, aug)
        found = dets[:, :4]
        probs = found.new_zeros(0, 0, 0)
        if found.shape[0]:
            probs = merge_mask_probabilities(
                [roi.mask_probabilities(features, semantic, boxes_to_rois([to_view(found, size, original, flip)]), labels)
                 for (features, semantic), size, flip in zip(kept, sizes, flipped)],
                flipped,
            )
        masks = paste_masks(probs, found, original, roi.mask_thr_binary)
        return {"boxes": found, "scores": dets[:, 4], "labels": labels, "masks": masks}

    def forward(self, pyramid, image_sizes, original_sizes) -> list[dict[str, torch.Tensor]]:
        return self.detect_from_pyramid(pyramid, image_sizes, original_sizes)

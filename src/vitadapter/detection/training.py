"""Training of everything after the backbone (mmdet 2.x's ``forward_train`` of Mask R-CNN, Cascade
Mask R-CNN and HTC): the RPN's loss, training-time proposals, and per RoI stage assignment, sampling, box and
mask losses, with the cascade's refinement between stages (HTC: interleaved, with mask information flow
and a semantic branch). The settings default to upstream's configs;
the computations themselves live beside their stages (``assigner``, ``sampler``, ``rpn``, ``box_head``,
``mask_head``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .assigner import MaxIoUAssigner
from .box_head import ConvFCBBoxHead
from .box_losses import BoxRegressionLoss
from .htc_roi_heads import HTCRoIHeads
from .roi_heads import CascadeRoIHeads, boxes_to_rois
from .sampler import RandomSampler, SamplingResult
from .two_stage import TwoStageDetectorHeads


@dataclass
class RPNTraining:
    """mmdet's ``train_cfg.rpn`` + ``rpn_head.loss_bbox`` + ``train_cfg.rpn_proposal`` (whose NMS and
    minimum size are the test settings'). Defaults: upstream's Mask R-CNN."""

    assigner: MaxIoUAssigner = field(default_factory=lambda: MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True))
    sampler: RandomSampler = field(default_factory=lambda: RandomSampler(256, 0.5, neg_pos_ub=-1, add_gt_as_proposals=False))
    regression: BoxRegressionLoss = field(default_factory=BoxRegressionLoss)
    allowed_border: float = -1
    proposal_nms_pre: int = 2000
    proposal_max_per_img: int = 1000


@dataclass
class StageTraining:
    """One RoI stage: ``train_cfg.rcnn[k]`` + its box head's ``loss_bbox`` + ``stage_loss_weights[k]``.
    Defaults: upstream's Mask R-CNN."""

    assigner: MaxIoUAssigner = field(default_factory=lambda: MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5, match_low_quality=True))
    sampler: RandomSampler = field(default_factory=lambda: RandomSampler(512, 0.25, neg_pos_ub=-1, add_gt_as_proposals=True))
    regression: BoxRegressionLoss = field(default_factory=BoxRegressionLoss)
    weight: float = 1.0


@dataclass
class DetectorTraining:
    """The training settings of a two-stage detector: the RPN's and one entry per RoI stage."""

    rpn: RPNTraining = field(default_factory=RPNTraining)
    stages: list[StageTraining] = field(default_factory=lambda: [StageTraining()])


def mask_rcnn_training() -> DetectorTraining:
    """Upstream's Mask R-CNN (``_base_/models/mask_rcnn_r50_fpn.py``): L1 box losses, RoI IoU 0.5."""
    return DetectorTraining()


def cascade_mask_rcnn_training() -> DetectorTraining:
    """Upstream's Cascade Mask R-CNN (``_base_/models/cascade_mask_rcnn_r50_fpn.py`` as its ViT-Adapter
    configs override it): RPN SmoothL1 (beta 1/9) on anchors inside the image, 2000 proposals, stages
    at IoU 0.5 / 0.6 / 0.7 without low-quality matches, GIoU x10 on decoded boxes, weights 1 / 0.5 / 0.25."""
    rpn = RPNTraining(regression=BoxRegressionLoss("smooth_l1", beta=1.0 / 9.0), allowed_border=0, proposal_max_per_img=2000)
    stages = [
        StageTraining(
            assigner=MaxIoUAssigner(iou, iou, min_pos_iou=iou, match_low_quality=False),
            regression=BoxRegressionLoss("giou", weight=10.0),
            weight=weight,
        )
        for iou, weight in ((0.5, 1.0), (0.6, 0.5), (0.7, 0.25))
    ]
    return DetectorTraining(rpn=rpn, stages=stages)


@dataclass
class HTCTraining(DetectorTraining):
    """HTC's settings: the two-stage ones plus its semantic branch's loss (``semantic_head.loss_seg``):
    cross-entropy times ``semantic_weight``, pixels labelled ``semantic_ignore_index`` left out."""

    semantic_weight: float = 0.2
    semantic_ignore_index: int = 255


def htc_training(giou: bool = False) -> HTCTraining:
    """Upstream's HTC++ (``detection/configs/htc++``): the cascade's RPN settings (SmoothL1 with beta
    1/9 on anchors inside the image, 2000 proposals), stages at IoU 0.5 / 0.6 / 0.7 WITH low-quality
    matches (mmdet's default, which these configs keep), SmoothL1 (beta 1) on the deltas, weights
    1 / 0.5 / 0.25, semantic loss x0.2 ignoring 255. ``giou``: the Objects365 recipe's GIoU x10 on
    decoded boxes instead."""
    regression = BoxRegressionLoss("giou", weight=10.0) if giou else BoxRegressionLoss("smooth_l1", beta=1.0)
    stages = [
        StageTraining(assigner=MaxIoUAssigner(iou, iou, min_pos_iou=iou, match_low_quality=True), regression=regression, weight=weight)
        for iou, weight in ((0.5, 1.0), (0.6, 0.5), (0.7, 0.25))
    ]
    return HTCTraining(rpn=cascade_mask_rcnn_training().rpn, stages=stages)


def default_training(heads: TwoStageDetectorHeads) -> DetectorTraining:
    """Upstream's recipe for ``heads``: HTC++'s (3x COCO) for HTC heads, Cascade Mask R-CNN's for three
    cascade stages, else Mask R-CNN's."""
    roi_head = heads.roi_head
    if isinstance(roi_head, (CascadeRoIHeads, HTCRoIHeads)):
        if len(roi_head.bbox_heads) != 3:
            raise ValueError(f"upstream's cascade recipe has 3 stages; these heads have {len(roi_head.bbox_heads)}: pass training=")
        return htc_training() if isinstance(roi_head, HTCRoIHeads) else cascade_mask_rcnn_training()
    return mask_rcnn_training()


def _check_targets(targets: Sequence[Mapping[str, torch.Tensor]], batch: int, num_classes: int, with_mask: bool) -> None:
    if len(targets) != batch:
        raise ValueError(f"targets must hold one dict per image: {batch} images, {len(targets)} targets")
    for i, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
            raise TypeError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]: boxes must be (N, 4) and labels (N,), got {tuple(boxes.shape)} and {tuple(labels.shape)}")
        if labels.dtype != torch.long or (labels.numel() and (labels.min() < 0 or labels.max() >= num_classes)):
            raise ValueError(f"targets[{i}]: labels must be int64 class indices in [0, {num_classes})")
        if with_mask:
            masks = target.get("masks")
            if masks is None or masks.dim() != 3 or masks.shape[0] != boxes.shape[0]:
                shape = None if masks is None else tuple(masks.shape)
                raise ValueError(f"targets[{i}]: masks must be (N, H, W), one per box, got {shape}")
        semantic = target.get("semantic")
        if semantic is not None and (semantic.dim() != 2 or semantic.dtype.is_floating_point or semantic.dtype == torch.bool):
            raise ValueError(f"targets[{i}]: semantic must be an (H, W) integer class map, got {tuple(semantic.shape)} {semantic.dtype}")


def roi_losses(
    heads: TwoStageDetectorHeads,
    features: Sequence[torch.Tensor],
    proposals: Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    stages: Sequence[StageTraining],
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """mmdet's ``StandardRoIHead`` / ``CascadeRoIHead.forward_train`` from the neck's ``features`` and
    per-image ``proposals`` (N_i, >=4): ``loss_cls``, ``loss_bbox``[, ``loss_mask``], named ``s{k}.*``
    and scaled by each stage's weight in a cascade. Between cascade stages the sampled RoIs, less the
    added ground truths, move by the deltas of their target class (of the best foreground class for
    negatives), without gradient."""
    roi_head = heads.roi_head
    bbox_heads, mask_heads = roi_head.bbox_heads, roi_head.mask_heads
    if len(stages) != len(bbox_heads):
        raise ValueError(f"training has {len(stages)} stage settings for {len(bbox_heads)} RoI stages")
    prefix = "s{}." if isinstance(roi_head, CascadeRoIHeads) else ""
    losses: dict[str, torch.Tensor] = {}
    for k, (head, stage) in enumerate(zip(bbox_heads, stages)):
        samples = _sample(stage, proposals, targets, generator)
        logits, deltas = head(roi_head.bbox_roi_extractor(features, boxes_to_rois([s.boxes for s in samples])))
        terms = head.loss(logits, deltas, samples, stage.regression)
        if mask_heads:
            mask_logits = mask_heads[k](roi_head.mask_roi_extractor(features, boxes_to_rois([s.pos_boxes for s in samples])))
            terms["loss_mask"] = mask_heads[k].loss(mask_logits, samples, [t["masks"] for t in targets])
        losses.update({prefix.format(k) + name: value * stage.weight for name, value in terms.items()})
        if k + 1 < len(bbox_heads):
            proposals = _refine(head, samples, logits, deltas, image_sizes)
    return losses


def _sample(stage: StageTraining, proposals: Sequence[torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
            generator: Optional[torch.Generator]) -> list[SamplingResult]:
    return [stage.sampler(stage.assigner(p, t["boxes"], t.get("ignore_boxes")), p, t["boxes"], t["labels"], generator=generator)
            for p, t in zip(proposals, targets)]


@torch.no_grad()
def _refine(head: ConvFCBBoxHead, samples: Sequence[SamplingResult], logits: torch.Tensor, deltas: torch.Tensor,
            image_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """mmdet's ``refine_bboxes``: the sampled RoIs, less the added ground truths, moved by the deltas of
    their target class (of the best foreground class for negatives) and clipped to their image."""
    labels = head.sample_labels(samples)
    labels = torch.where(labels == head.num_classes, logits[:, :-1].argmax(dim=1), labels)
    counts = [s.boxes.shape[0] for s in samples]
    return [
        head.regress_by_class(s.boxes, l, d, size)[torch.cat([~s.pos_is_gt, s.pos_is_gt.new_ones(s.neg_boxes.shape[0])])]
        for s, l, d, size in zip(samples, labels.split(counts), deltas.split(counts), image_sizes)
    ]


def semantic_targets(targets: Sequence[Mapping[str, torch.Tensor]], size: tuple[int, int], stride: int, ignore_index: int) -> Optional[torch.Tensor]:
    """(B, h, w) class maps at the semantic logits' ``size`` (stride ``stride``), or None when no image
    has one: each image's ``"semantic"`` map (batch pixels) subsampled by nearest neighbour as mmdet's
    ``SegRescale`` does, padding and images without a map at ``ignore_index``."""
    maps = [t.get("semantic") for t in targets]
    if all(m is None for m in maps):
        return None
    device = next(m for m in maps if m is not None).device
    out = torch.full((len(maps), *size), ignore_index, dtype=torch.long, device=device)
    for target, semantic in zip(out, maps):
        if semantic is not None:
            sub = semantic[::stride, ::stride][: size[0], : size[1]]
            target[: sub.shape[0], : sub.shape[1]] = sub
    return out


def htc_roi_losses(
    roi_head: HTCRoIHeads,
    features: Sequence[torch.Tensor],
    proposals: Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    training: HTCTraining,
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """mmdet 2.22's ``HybridTaskCascadeRoIHead.forward_train`` (interleaved, mask information flow):
    ``loss_semantic_seg`` when any target has a ``"semantic"`` map, then per stage k ``s{k}.loss_cls``,
    ``s{k}.loss_bbox``, ``s{k}.loss_mask`` times the stage's weight.

    Stage k assigns and samples its candidates, runs its box head on them (RoI features plus the
    semantic feature pooled over each RoI), then refines them without gradient: the refined boxes are
    the next stage's candidates and, assigned and sampled again with stage k's settings, give the
    positives stage k's mask head learns on; its input is theirs with the semantic feature added, and
    the earlier mask heads run on the same input to hand it their last conv feature (gradient flows
    through them)."""
    stages = training.stages
    if len(stages) != len(roi_head.bbox_heads):
        raise ValueError(f"training has {len(stages)} stage settings for {len(roi_head.bbox_heads)} RoI stages")
    semantic_logits, semantic = roi_head.semantic_head(features)
    losses: dict[str, torch.Tensor] = {}
    labels = semantic_targets(targets, semantic_logits.shape[-2:], roi_head.semantic_stride, training.semantic_ignore_index)
    if labels is not None:
        losses["loss_semantic_seg"] = roi_head.semantic_head.loss(semantic_logits, labels, training.semantic_ignore_index) * training.semantic_weight
    gt_masks = [t["masks"] for t in targets]
    for k, (head, stage) in enumerate(zip(roi_head.bbox_heads, stages)):
        samples = _sample(stage, proposals, targets, generator)
        rois = boxes_to_rois([s.boxes for s in samples])
        logits, deltas = head(roi_head._fused(roi_head.bbox_roi_extractor, features, semantic, rois))
        terms = head.loss(logits, deltas, samples, stage.regression)
        proposals = _refine(head, samples, logits, deltas, image_sizes)
        samples = _sample(stage, proposals, targets, generator)
        pos_rois = boxes_to_rois([s.pos_boxes for s in samples])
        mask_feats = roi_head._fused(roi_head.mask_roi_extractor, features, semantic, pos_rois)
        last_feat = None
        for earlier in roi_head.mask_heads[:k]:
            last_feat = earlier.features(mask_feats, last_feat)
        mask_logits, _ = roi_head.mask_heads[k](mask_feats, last_feat)
        terms["loss_mask"] = roi_head.mask_heads[k].loss(mask_logits, samples, gt_masks)
        losses.update({f"s{k}.{name}": value * stage.weight for name, value in terms.items()})
    return losses


def detector_losses(
    heads: TwoStageDetectorHeads,
    pyramid: Sequence[torch.Tensor],
    image_sizes: Sequence[Sequence[int]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    training: Optional[DetectorTraining] = None,
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """mmdet's ``TwoStageDetector.forward_train`` after the backbone: a dict of named loss terms
    (``loss_rpn_cls``, ``loss_rpn_bbox``, then :func:`roi_losses`' or, for HTC heads,
    :func:`htc_roi_losses`'); their sum is the training loss.

    ``pyramid``: the backbone's levels of a padded batch; ``image_sizes``: each image's (h, w) inside it;
    ``targets``: per image ``{"boxes" (N, 4) x1y1x2y2 in the batch's pixels, "labels" (N,) int64
    0-based, "masks" (N, H, W) in the batch's pixels (mask heads only), optionally "ignore_boxes"
    (M, 4), HTC: optionally "semantic" (H, W) int64 stuff-and-thing classes in the batch's pixels,
    255 unlabelled}``. ``training`` defaults to :func:`default_training`; ``generator`` drives the samplers.
    """
    training = default_training(heads) if training is None else training
    batch = pyramid[0].shape[0] if len(pyramid) else 0
    if len(image_sizes) != batch or any(len(s) < 2 or int(s[0]) < 1 or int(s[1]) < 1 for s in image_sizes):
        raise ValueError(f"image_sizes must give one positive (h, w) per image ({batch}), got {list(image_sizes)}")
    image_sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
    _check_targets(targets, batch, heads.num_classes, bool(heads.roi_head.mask_heads))
    features = heads.neck(pyramid)
    cls_maps, reg_maps = heads.rpn_head(features)
    rpn = training.rpn
    losses = heads.rpn_head.loss(
        cls_maps, reg_maps, image_sizes, [t["boxes"] for t in targets], rpn.assigner, rpn.sampler, rpn.regression,
        rpn.allowed_border, [t.get("ignore_boxes") for t in targets], generator,
    )
    with torch.no_grad():
        proposals = heads.rpn_head.proposals(cls_maps, reg_maps, image_sizes, rpn.proposal_nms_pre, rpn.proposal_max_per_img)
    if isinstance(heads.roi_head, HTCRoIHeads):
        if not isinstance(training, HTCTraining):
            raise TypeError(f"HTC heads train with an HTCTraining (htc_training()), got {type(training).__name__}")
        losses.update(htc_roi_losses(heads.roi_head, features, proposals, image_sizes, targets, training, generator))
    else:
        losses.update(roi_losses(heads, features, proposals, image_sizes, targets, training.stages, generator))
    return losses

"""Training of everything after the backbone (mmdet 2.x's ``forward_train`` of Mask R-CNN and Cascade
Mask R-CNN): the RPN's loss, training-time proposals, and per RoI stage assignment, sampling, box and
mask losses, with the cascade's refinement between stages. The settings default to upstream's configs;
the computations themselves live beside their stages (``assigner``, ``sampler``, ``rpn``, ``box_head``,
``mask_head``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .assigner import MaxIoUAssigner
from .box_losses import BoxRegressionLoss
from .roi_heads import CascadeRoIHeads, boxes_to_rois
from .sampler import RandomSampler
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


def default_training(heads: TwoStageDetectorHeads) -> DetectorTraining:
    """Upstream's recipe for ``heads``: Cascade Mask R-CNN's for three cascade stages, else Mask R-CNN's."""
    if isinstance(heads.roi_head, CascadeRoIHeads):
        if len(heads.roi_head.bbox_heads) != 3:
            raise ValueError(f"upstream's cascade recipe has 3 stages; these heads have {len(heads.roi_head.bbox_heads)}: pass training=")
        return cascade_mask_rcnn_training()
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
        samples = [
            stage.sampler(stage.assigner(p, t["boxes"], t.get("ignore_boxes")), p, t["boxes"], t["labels"], generator=generator)
            for p, t in zip(proposals, targets)
        ]
        logits, deltas = head(roi_head.bbox_roi_extractor(features, boxes_to_rois([s.boxes for s in samples])))
        terms = head.loss(logits, deltas, samples, stage.regression)
        if mask_heads:
            mask_logits = mask_heads[k](roi_head.mask_roi_extractor(features, boxes_to_rois([s.pos_boxes for s in samples])))
            terms["loss_mask"] = mask_heads[k].loss(mask_logits, samples, [t["masks"] for t in targets])
        losses.update({prefix.format(k) + name: value * stage.weight for name, value in terms.items()})
        if k + 1 < len(bbox_heads):
            with torch.no_grad():
                labels = head.sample_labels(samples)
                labels = torch.where(labels == head.num_classes, logits[:, :-1].argmax(dim=1), labels)
                counts = [s.boxes.shape[0] for s in samples]
                proposals = [
                    head.regress_by_class(s.boxes, l, d, size)[torch.cat([~s.pos_is_gt, s.pos_is_gt.new_ones(s.neg_boxes.shape[0])])]
                    for s, l, d, size in zip(samples, labels.split(counts), deltas.split(counts), image_sizes)
                ]
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
    (``loss_rpn_cls``, ``loss_rpn_bbox``, then :func:`roi_losses`'); their sum is the training loss.

    ``pyramid``: the backbone's levels of a padded batch; ``image_sizes``: each image's (h, w) inside it;
    ``targets``: per image ``{"boxes" (N, 4) x1y1x2y2 in the batch's pixels, "labels" (N,) int64
    0-based, "masks" (N, H, W) in the batch's pixels (mask heads only), optionally "ignore_boxes"
    (M, 4)}``. ``training`` defaults to :func:`default_training`; ``generator`` drives the samplers.
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
    losses.update(roi_losses(heads, features, proposals, image_sizes, targets, training.stages, generator))
    return losses

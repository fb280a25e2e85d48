"""Mask2Former's training loss for semantic segmentation, as upstream computes it (docs/mask2former.md).

Per image and prediction: Hungarian matching of queries to the classes present (scipy's
``linear_sum_assignment``), class cross-entropy over all queries, and mask BCE + dice over the
matched queries at sampled points. Everything here runs in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class LossSettings:
    loss_weights: tuple[float, float, float]  # class, mask, dice
    match_weights: tuple[float, float, float]
    class_weight: torch.Tensor  # (num_classes + 1,), the last is "no object"
    dice_eps: float
    match_dice_eps: float
    num_points: int
    oversample_ratio: float
    importance_sample_ratio: float


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise ImportError(
            "Mask2FormerHead.loss matches queries with scipy.optimize.linear_sum_assignment: pip install scipy"
        ) from e
    return linear_sum_assignment


def semantic_targets(labels: torch.Tensor, num_classes: int, ignore_index: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(class ids, float masks (n, H, W)) per image: one binary mask per class present."""
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer (B, H, W) tensor, got {labels.dtype} {tuple(labels.shape)}")
    targets = []
    for label in labels:
        ids = torch.unique(label)
        ids = ids[ids != ignore_index]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise ValueError(
                f"labels hold values outside [0, {num_classes}) other than ignore_index {ignore_index}: "
                f"{ids[(ids < 0) | (ids >= num_classes)].tolist()}"
            )
        targets.append((ids, (label[None] == ids[:, None, None]).float()))
    return targets


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """maps (N, C, H, W) at points (N, P, 2), (x, y) in [0, 1] of the map's extent -> (N, C, P);
    bilinear with zeros outside, pixel centres at (j + 0.5) / W (align_corners=False)."""
    grid = points.unsqueeze(2) * 2 - 1
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def uncertain_points(mask_logits: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """mask_logits (N, 1, h, w) -> (N, num_points, 2): the most uncertain (|logit| smallest) of oversample_ratio x num_points
    uniform candidates, then uniform points for the rest."""
    n, device = mask_logits.shape[0], mask_logits.device
    candidates = torch.rand(n, int(settings.num_points * settings.oversample_ratio), 2, device=device)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()
    k = int(settings.importance_sample_ratio * settings.num_points)
    chosen = uncertainty.topk(k, dim=1).indices
    points = torch.gather(candidates, 1, chosen[..., None].expand(n, k, 2))
    rest = settings.num_points - k
    if rest > 0:
        points = torch.cat([points, torch.rand(n, rest, 2, device=device)], 1)
    return points


def _match(class_logits: torch.Tensor, mask_logits: torch.Tensor, gt_ids: torch.Tensor, gt_masks: torch.Tensor,
           settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(query indices ascending, their class-mask indices) of the least-cost one-to-one matching."""
    w_cls, w_mask, w_dice = settings.match_weights
    num_queries, n = mask_logits.shape[0], gt_ids.shape[0]
    points = torch.rand(1, settings.num_points, 2, device=mask_logits.device)
    pred = point_sample(mask_logits[:, None], points.expand(num_queries, -1, -1))[:, 0]
    gt = point_sample(gt_masks[:, None], points.expand(n, -1, -1))[:, 0]

    cost_cls = -class_logits.softmax(-1)[:, gt_ids]
    positive = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    negative = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    cost_mask = (positive @ gt.T + negative @ (1 - gt).T) / pred.shape[1]
    prob = pred.sigmoid()
    eps = settings.match_dice_eps
    cost_dice = 1 - (2 * prob @ gt.T + eps) / (prob.sum(-1)[:, None] + gt.sum(-1)[None] + eps)
    cost = w_cls * cost_cls + w_mask * cost_mask + w_dice * cost_dice

    rows, cols = _linear_sum_assignment()(cost.detach().cpu().numpy())
    rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    order = rows.argsort()
    return rows[order].to(mask_logits.device), cols[order].to(mask_logits.device)


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value.div_(dist.get_world_size()))
    return value


def prediction_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    targets: list[tuple[torch.Tensor, torch.Tensor]], settings: LossSettings
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class, mask, dice) losses of one prediction: class_logits (B, Q, K + 1), mask_logits (B, Q, h, w)."""
    batch, num_queries, num_outputs = class_logits.shape
    no_object = num_outputs - 1
    w_cls, w_mask, w_dice = settings.loss_weights
    class_targets = torch.full((batch, num_queries), no_object, dtype=torch.long, device=class_logits.device)
    matched_preds, matched_masks = [], []
    with torch.no_grad():
        matches = [
            _match(class_logits[b], mask_logits[b], ids, masks, settings) if ids.numel() else None
            for b, (ids, masks) in enumerate(targets)
        ]
    for b, match in enumerate(matches):
        if match is None:
            continue
        rows, cols = match
        ids, masks = targets[b]
        class_targets[b, rows] = ids[cols]
        matched_preds.append(mask_logits[b, rows])
        matched_masks.append(masks[cols])

    weight = settings.class_weight.to(class_logits.device)
    flat_targets = class_targets.flatten()
    per_query = F.cross_entropy(class_logits.flatten(0, 1), flat_targets, weight=weight, reduction="none")
    loss_cls = w_cls * per_query.sum() / weight[flat_targets].sum()

    num_masks = sum(int(m.shape[0]) for m in matched_masks)
    if num_masks == 0:
        zero = mask_logits.sum() * 0
        return loss_cls, zero, zero
    denominator = _mean_over_processes(class_logits.new_tensor(float(num_masks))).clamp(min=1)

    preds = torch.cat(matched_preds)[:, None]
    with torch.no_grad():
        points = uncertain_points(preds, settings)
        point_targets = point_sample(torch.cat(matched_masks)[:, None], points)[:, 0]
    point_preds = point_sample(preds, points)[:, 0]

    prob = point_preds.sigmoid()
    eps = settings.dice_eps
    dice = 1 - (2 * (prob * point_targets).sum(-1) + eps) / (prob.sum(-1) + point_targets.sum(-1) + eps)
    loss_dice = w_dice * dice.sum() / denominator
    bce = F.binary_cross_entropy_with_logits(point_preds, point_targets, reduction="none")
    loss_mask = w_mask * bce.sum() / (denominator * settings.num_points)
    return loss_cls, loss_mask, loss_dice

"""Soft-NMS as mmcv 1.4.2 computes it (``mmcv.ops.soft_nms`` / ``batched_nms``), and mmdet 2.22's
``multiclass_nms`` with ``nms=dict(type="soft_nms", ...)``, the test-time rule of upstream's HTC++.

torchvision has no soft-NMS. This one runs on any device: one Python step per selected box, each step a
few whole-tensor operations. It reproduces mmcv's CPU kernel bit for bit in float32 (the Gaussian
method up to the last bit of ``exp``), including which of several equal scores is selected first, the
order of the returned boxes and their decayed scores.
"""
from __future__ import annotations

import math

import torch

_METHODS = ("naive", "linear", "gaussian")


def _check_boxes_scores(boxes: torch.Tensor, scores: torch.Tensor) -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be an (N, 4) tensor of x1, y1, x2, y2, got {getattr(boxes, 'shape', type(boxes))}")
    if not isinstance(scores, torch.Tensor) or scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be an (N,) tensor matching boxes ({boxes.shape[0]}), got {getattr(scores, 'shape', type(scores))}")
    if not boxes.is_floating_point() or scores.dtype != boxes.dtype:
        raise TypeError(f"boxes and scores must share one floating dtype, got {boxes.dtype} and {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")


def _compact(rest: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """mmcv's in-place removal: scanning forward, a dropped box is overwritten by the current last box
    (re-examined there); so survivors in front stay put and the holes among them are filled by the
    survivors behind, last first. That order decides later ties, so it is kept exactly."""
    count = int(alive.sum())
    front = rest[:count].clone()
    front[~alive[:count]] = rest[count:][alive[count:]].flip(0)
    return front


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv's ``soft_nms``: repeatedly select the highest score (the first of equal ones in mmcv's
    working order), then decay every remaining box by its IoU with it and drop those under ``min_score``.

    Decay: ``naive`` zeroes, ``linear`` multiplies by ``1 - IoU``, both only where IoU >= ``iou_threshold``;
    ``gaussian`` multiplies every box by ``exp(-IoU^2 / sigma)``. ``offset`` (0 or 1) is added to widths
    and heights. Returns ``dets`` (K, 5): the kept boxes in selection order with their scores at
    selection, and ``keep`` (K,) int64: their indices into ``boxes``.
    """
    _check_boxes_scores(boxes, scores)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1, got {offset!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma must be positive for the gaussian method, got {sigma}")
    dtype, device = boxes.dtype, boxes.device
    # mmcv's kernel takes its thresholds as C floats: compare in the boxes' own precision
    iou_thr, min_sc, sig = (torch.tensor(v, dtype=dtype, device=device) for v in (iou_threshold, min_score, sigma))
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    current = scores.clone()
    remaining = torch.arange(boxes.shape[0], device=device)
    keep, kept_scores = [], []
    while remaining.numel() > 0:
        candidate_scores = current[remaining]
        # mmcv scans with a strict '<' from the front: the first maximum wins, and NaN (the Gaussian
        # decay of a zero-area box pair: IoU 0/0) never beats anything, but stays if it leads
        best = candidate_scores.nan_to_num(nan=-math.inf).argmax()
        j = int(torch.where(candidate_scores[0].isnan(), 0, best))
        top = remaining[j]
        keep.append(top)
        kept_scores.append(candidate_scores[j])
        # mmcv swaps the selected box with the one at the front of the working order
        rest = remaining.clone()
        rest[j] = remaining[0]
        rest = rest[1:]
        if rest.numel() == 0:
            break
        w = (torch.minimum(x2[top], x2[rest]) - torch.maximum(x1[top], x1[rest]) + offset).clamp(min=0)
        h = (torch.minimum(y2[top], y2[rest]) - torch.maximum(y1[top], y1[rest]) + offset).clamp(min=0)
        inter = w * h
        iou = inter / (areas[top] + areas[rest] - inter)
        if method == "gaussian":
            weight = torch.exp(-(iou * iou) / sig)
        else:
            decayed = torch.zeros_like(iou) if method == "naive" else 1 - iou
            weight = torch.where(iou >= iou_thr, decayed, torch.ones_like(iou))
        new_scores = current[rest] * weight
        current[rest] = new_scores
        remaining = _compact(rest, ~(new_scores < min_sc))
    if not keep:
        return boxes.new_zeros((0, 5)), torch.zeros(0, dtype=torch.long, device=device)
    keep_t = torch.stack(keep)
    dets = torch.cat([boxes[keep_t], torch.stack(kept_scores)[:, None]], dim=1)
    return dets, keep_t


def batched_soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
    offset: int = 0,
    class_agnostic: bool = False,
    split_thr: int = 10000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv's ``batched_nms`` with soft-NMS: boxes of different ``idxs`` never decay each other.

    As mmcv does, each box is shifted by ``idx * (max coordinate + 1)`` and one soft-NMS runs on the
    shifted boxes (their float32 rounding is part of the result), keeping its selection order; from
    ``split_thr`` boxes on, it runs per group on the shifted boxes and the survivors are sorted by score,
    descending (ties in index order). Returns ``dets`` (K, 5: the unshifted boxes with their decayed
    scores) and ``keep`` (K,).
    """
    _check_boxes_scores(boxes, scores)
    if not isinstance(idxs, torch.Tensor) or idxs.shape != scores.shape:
        raise ValueError(f"idxs must be an (N,) tensor matching boxes ({boxes.shape[0]}), got {getattr(idxs, 'shape', type(idxs))}")
    nms_kwargs = dict(iou_threshold=iou_threshold, sigma=sigma, min_score=min_score, method=method, offset=offset)
    if boxes.shape[0] == 0:
        return soft_nms(boxes, scores, **nms_kwargs)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        shift = idxs.to(boxes) * (boxes.max() + 1)
        boxes_for_nms = boxes + shift[:, None]
    if boxes.shape[0] < split_thr:
        dets, keep = soft_nms(boxes_for_nms, scores, **nms_kwargs)
        return torch.cat([boxes[keep], dets[:, 4:]], dim=1), keep
    decayed = scores.new_zeros(scores.shape)
    survived = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = (idxs == group).nonzero().view(-1)
        dets, keep = soft_nms(boxes_for_nms[members], scores[members], **nms_kwargs)
        survived[members[keep]] = True
        decayed[members[keep]] = dets[:, 4]
    keep = survived.nonzero().view(-1)
    kept_scores, order = decayed[keep].sort(descending=True, stable=True)
    keep = keep[order]
    return torch.cat([boxes[keep], kept_scores[:, None]], dim=1), keep


def multiclass_soft_nms(
    multi_bboxes: torch.Tensor,
    multi_scores: torch.Tensor,
    score_thr: float,
    max_num: int = -1,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet 2.22's ``multiclass_nms`` with a soft-NMS config, for one image.

    ``multi_bboxes``: (N, 4) class-agnostic or (N, 4K) per-class boxes; ``multi_scores``: (N, K + 1)
    class probabilities, background LAST. The candidates are the (box, class) pairs with probability
    strictly above ``score_thr``, box-major; they go through :func:`batched_soft_nms` with the class as
    group, and the first ``max_num`` (all if <= 0) are returned: ``dets`` (D, 5), ``labels`` (D,).
    """
    if not isinstance(multi_scores, torch.Tensor) or multi_scores.dim() != 2 or multi_scores.shape[1] < 2:
        raise ValueError(f"multi_scores must be (N, num_classes + 1) with background last, got {getattr(multi_scores, 'shape', type(multi_scores))}")
    num_boxes, num_classes = multi_scores.shape[0], multi_scores.shape[1] - 1
    if not isinstance(multi_bboxes, torch.Tensor) or multi_bboxes.dim() != 2 or multi_bboxes.shape[0] != num_boxes or multi_bboxes.shape[1] not in (4, 4 * num_classes):
        raise ValueError(
            f"multi_bboxes must be ({num_boxes}, 4) or ({num_boxes}, {4 * num_classes}) to match multi_scores, "
            f"got {getattr(multi_bboxes, 'shape', type(multi_bboxes))}"
        )
    if multi_bboxes.shape[1] == 4:
        bboxes = multi_bboxes[:, None].expand(num_boxes, num_classes, 4)
    else:
        bboxes = multi_bboxes.view(num_boxes, num_classes, 4)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, device=scores.device).expand(num_boxes, num_classes)
    valid = (scores > score_thr).reshape(-1).nonzero().view(-1)
    bboxes, scores, labels = bboxes.reshape(-1, 4)[valid], scores.reshape(-1)[valid], labels.reshape(-1)[valid]
    dets, keep = batched_soft_nms(
        bboxes, scores, labels, iou_threshold=iou_threshold, sigma=sigma, min_score=min_score, method=method, offset=offset
    )
    if max_num > 0:
        dets, keep = dets[:max_num], keep[:max_num]
    return dets, labels[keep]

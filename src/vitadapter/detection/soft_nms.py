"""Soft-NMS as mmcv 1.4.2 computes it (``mmcv.ops.soft_nms`` / ``batched_nms``), and mmdet 2.22's
``multiclass_nms`` with ``nms=dict(type="soft_nms", ...)``, the test-time rule of upstream's HTC++.

torchvision has no soft-NMS. This one runs on any device and reproduces mmcv's CPU kernel bit for bit in
float32 (the Gaussian method up to the last bit of ``exp``): the kept boxes, their decayed scores, their
order, and which of several equal scores is selected first (mmcv's working-array order decides).

mmcv's class offsets keep classes from decaying each other, so the classes run side by side, one
tensor step per box of the largest class (``benchmarks/soft_nms.py`` times it). Where the working order
could matter (equal top scores within a class, boxes starting under ``min_score``, classes the offsets
do not separate) it is followed box by box instead.
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


def _check_options(method: str, offset: int, sigma: float) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1, got {offset!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma must be positive for the gaussian method, got {sigma}")


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
    _check_options(method, offset, sigma)
    return _soft_nms(boxes, scores, None, iou_threshold, sigma, min_score, method, offset)


def _areas(boxes: torch.Tensor, offset: int) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0] + offset) * (boxes[..., 3] - boxes[..., 1] + offset)


def _weight(
    top: torch.Tensor, top_area: torch.Tensor, others: torch.Tensor, areas: torch.Tensor, offset: int, method: str,
    iou_thr: torch.Tensor, sig: torch.Tensor,
) -> torch.Tensor:
    """The decay factor of ``others`` (..., 4) by the selected ``top`` (broadcastable), in the order of
    mmcv's float operations."""
    w = (torch.minimum(top[..., 2], others[..., 2]) - torch.maximum(top[..., 0], others[..., 0]) + offset).clamp(min=0)
    h = (torch.minimum(top[..., 3], others[..., 3]) - torch.maximum(top[..., 1], others[..., 1]) + offset).clamp(min=0)
    inter = w * h
    iou = inter / (top_area + areas - inter)
    if method == "gaussian":
        return torch.exp(-(iou * iou) / sig)
    decayed = torch.zeros_like(iou) if method == "naive" else 1 - iou
    return torch.where(iou >= iou_thr, decayed, torch.ones_like(iou))


def _soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor | None,
    iou_threshold: float,
    sigma: float,
    min_score: float,
    method: str,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups``, when given, promises that boxes of different groups leave each other's scores
    unchanged (see :func:`_groups_cannot_interact`).

    Without a tie at any selection, soft-NMS of independent groups runs in lockstep (one step per
    box of the largest group); with one, mmcv's working order decides and is followed box by box."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, 5)), torch.zeros(0, dtype=torch.long, device=boxes.device)
    thresholds = [torch.tensor(v, dtype=boxes.dtype, device=boxes.device) for v in (iou_threshold, min_score, sigma)]
    # mmcv's first pass drops the boxes that start under min_score, of any group: that moves boxes in
    # its working order, and only the step-by-step kernel follows it
    if bool((scores < thresholds[1]).any()):
        result, groups = None, None
    else:
        result = _soft_nms_lockstep(boxes, scores, groups, method, offset, *thresholds)
    if result is None:
        result = _soft_nms_in_order(boxes, scores, groups, method, offset, *thresholds)
    keep, kept_scores = result
    return torch.cat([boxes[keep], kept_scores[:, None]], dim=1), keep


def _soft_nms_lockstep(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None, method: str, offset: int,
    iou_thr: torch.Tensor, min_sc: torch.Tensor, sig: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every group's own soft-NMS at once, in a (groups, largest group) layout; None if at some step two
    live boxes of one group share the top score (or it is NaN): then mmcv's working order decides which
    is selected, and with it the decays.

    Otherwise each group's selections are unique maxima, so they are what mmcv's global scan selects
    when it reaches that group, and the global order is by selection score (they never increase: a
    selected score was the maximum, and decay only lowers scores). Equal selection scores of different
    groups are ordered by :func:`_order_ties`.
    """
    n, device = boxes.shape[0], boxes.device
    if groups is None:
        group_of, counts = torch.zeros(n, dtype=torch.long, device=device), torch.tensor([n], device=device)
    else:
        _, group_of, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    by_group = torch.argsort(group_of, stable=True)
    slot = torch.empty(n, dtype=torch.long, device=device)
    slot[by_group] = torch.arange(n, device=device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    rows, width = counts.numel(), int(counts.max())
    member = torch.full((rows, width), -1, dtype=torch.long, device=device)
    member[group_of, slot] = torch.arange(n, device=device)
    live = member >= 0
    safe = member.clamp(min=0)
    grid_boxes, grid_areas, grid_scores = boxes[safe], _areas(boxes, offset)[safe], scores[safe].clone()
    row_ids = torch.arange(rows, device=device)
    keep, kept_scores, droppers, dropped = [], [], [], []
    for _ in range(width):
        active = live.any(1)
        if not bool(active.any()):
            break
        masked = grid_scores.masked_fill(~live, -math.inf)
        top_score, top = masked.max(1)
        if bool((((masked == top_score[:, None]).sum(1) > 1) & active).any()) or bool(top_score[active].isnan().any()):
            return None
        selected = member[row_ids, top]
        keep.append(selected[active])
        kept_scores.append(top_score[active])
        live[row_ids, top] = False
        top_box = grid_boxes[row_ids, top][:, None]
        weight = _weight(top_box, grid_areas[row_ids, top][:, None], grid_boxes, grid_areas, offset, method, iou_thr, sig)
        grid_scores = torch.where(live, grid_scores * weight, grid_scores)
        drop = live & (grid_scores < min_sc)
        droppers.append(selected[:, None].expand(rows, width)[drop])
        dropped.append(member[drop])
        live &= ~drop
    kept_scores, order = torch.cat(kept_scores).sort(descending=True, stable=True)
    keep = torch.cat(keep)[order]
    if bool((kept_scores[1:] == kept_scores[:-1]).any()):
        keep = _order_ties(n, keep, kept_scores, torch.cat(droppers), torch.cat(dropped))
    return keep, kept_scores


def _order_ties(
    n: int, keep: torch.Tensor, kept_scores: torch.Tensor, droppers: torch.Tensor, dropped: torch.Tensor
) -> torch.Tensor:
    """Orders runs of equal selection scores (each from a different group) as mmcv's scan does: the one
    first in its working order goes first. That order is replayed from the known selections and drops
    (the selected box swapped with the front one; a dropped box overwritten by the current last one)."""
    victims: dict[int, list[int]] = {}
    for who, victim in zip(droppers.tolist(), dropped.tolist()):
        victims.setdefault(who, []).append(victim)
    events, values = keep.tolist(), kept_scores.tolist()
    at, pos, alive = list(range(n)), list(range(n)), [True] * n
    end, out, k = n, [], 0
    while k < len(events):
        run_end = k + 1
        while run_end < len(events) and values[run_end] == values[k]:
            run_end += 1
        pending = events[k:run_end]
        while pending:
            top = min(pending, key=pos.__getitem__)
            pending.remove(top)
            i, front, p = len(out), at[len(out)], pos[top]
            at[p], pos[front], at[i], pos[top] = front, p, top, i
            alive[top] = False
            out.append(top)
            gone = victims.get(top, ())
            if gone:
                for victim in gone:
                    alive[victim] = False
                new_end = end - len(gone)
                holes = sorted(pos[v] for v in gone if pos[v] < new_end)
                fill = [e for e in reversed(at[new_end:end]) if alive[e]]
                for hole, e in zip(holes, fill):
                    at[hole], pos[e] = e, hole
                end = new_end
        k = run_end
    return torch.tensor(out, dtype=torch.long, device=keep.device)


def _soft_nms_in_order(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None, method: str, offset: int,
    iou_thr: torch.Tensor, min_sc: torch.Tensor, sig: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv's kernel step by step; with ``groups`` (boxes of different groups leave each other's scores
    unchanged) only the selected box's group is decayed.

    mmcv keeps a working array of the unselected boxes and reorders it in place: the selected box is
    swapped with the front one, and a dropped box is overwritten by the current last one. Equal scores
    are resolved by that order, so it is tracked here too (``at``: position -> box, ``pos``: box ->
    position); boxes are never moved otherwise, which keeps each step to a few whole-tensor operations.
    """
    n, device = boxes.shape[0], boxes.device
    areas = _areas(boxes, offset)
    score = scores.clone()
    # selection key: -inf once a box is selected or dropped; NaN (the Gaussian decay of a zero-area pair,
    # IoU 0/0) never wins mmcv's strict '<' scan either, unless it is at the front
    key = score.clone()
    at = torch.arange(n, device=device)
    pos = torch.arange(n, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    if groups is not None:
        by_group = torch.argsort(groups, stable=True)
        _, group_of, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        group_ends = counts.cumsum(0).tolist()
        group_starts = [e - c for e, c in zip(group_ends, counts.tolist())]
    keep, kept_scores = [], []
    i, end = 0, n  # the working array is at[i:end]
    while i < end:
        front = at[i]
        if bool(score[front].isnan()):
            top = front
        else:
            # the first maximum in working order, as mmcv's scan from the front finds it
            top = torch.where(key == key.max(), pos, n).argmin()
        p = pos[top]
        at[p], pos[front] = front, p
        at[i], pos[top] = top, i
        keep.append(top)
        kept_scores.append(score[top])
        alive[top] = False
        key[top] = -math.inf
        if groups is None:
            rest = at[i + 1 : end]
        else:
            g = int(group_of[top])
            rest = by_group[group_starts[g] : group_ends[g]]
            rest = rest[alive[rest]]
        i += 1
        if rest.numel() == 0:
            continue
        weight = _weight(boxes[top], areas[top], boxes[rest], areas[rest], offset, method, iou_thr, sig)
        new_scores = score[rest] * weight
        score[rest] = new_scores
        key[rest] = new_scores.nan_to_num(nan=-math.inf)
        dropped = rest[new_scores < min_sc]
        if dropped.numel() == 0:
            continue
        alive[dropped] = False
        key[dropped] = -math.inf
        # mmcv's removal, scanning forward: survivors before the new end stay put, and the holes there
        # are filled by the survivors behind it, the last one first
        new_end = end - dropped.numel()
        holes = pos[dropped]
        holes = holes[holes < new_end].sort().values
        tail = at[new_end:end]
        fill = tail[alive[tail]].flip(0)
        at[holes], pos[fill] = fill, holes
        end = new_end
    return torch.stack(keep), torch.stack(kept_scores)


def _groups_cannot_interact(
    boxes: torch.Tensor, groups: torch.Tensor, iou_threshold: float, method: str, offset: int
) -> bool:
    """Whether boxes of different groups leave each other's scores exactly unchanged. Their overlap
    widths (heights) are all 0 when the groups' x-extents (y-extents) are apart by at least ``offset``,
    in float arithmetic too, as rounding is monotone; mmcv's class offsets do that for boxes with
    non-negative coordinates. An IoU of 0 must then mean weight 1: naive decay needs a positive
    threshold, and Gaussian decay no zero-area box (two of them have IoU 0/0, NaN)."""
    if (method == "naive" and not iou_threshold > 0) or (method == "gaussian" and not bool((_areas(boxes, offset) > 0).all())):
        return False
    _, group_of = torch.unique(groups, return_inverse=True)
    count = int(group_of.max()) + 1

    def apart(lo_coord: torch.Tensor, hi_coord: torch.Tensor) -> bool:
        lo = boxes.new_full((count,), math.inf).scatter_reduce(0, group_of, lo_coord, "amin")
        hi = boxes.new_full((count,), -math.inf).scatter_reduce(0, group_of, hi_coord, "amax")
        lo, order = lo.sort()
        return bool((hi[order][:-1] - lo[1:] + offset <= 0).all())

    return apart(boxes[:, 0], boxes[:, 2]) or apart(boxes[:, 1], boxes[:, 3])


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
        _check_options(method, offset, sigma)
        apart = not class_agnostic and _groups_cannot_interact(boxes_for_nms, idxs, iou_threshold, method, offset)
        dets, keep = _soft_nms(boxes_for_nms, scores, idxs if apart else None, iou_threshold, sigma, min_score, method, offset)
        return torch.cat([boxes[keep], dets[:, 4:]], dim=1), keep
    decayed = scores.new_zeros(scores.shape)
    survived = torch.zeros_like(scores, dtype=torch.bool)
    _check_options(method, offset, sigma)
    # each group's own soft-NMS: side by side (HTC's test time has ~80 classes of hundreds of boxes each
    # here) unless a tie or a box starting under min_score makes a group's working order matter
    side_by_side = None
    if not bool((scores < min_score).any()):
        thresholds = [torch.tensor(v, dtype=boxes.dtype, device=boxes.device) for v in (iou_threshold, min_score, sigma)]
        side_by_side = _soft_nms_lockstep(boxes_for_nms, scores, idxs, method, offset, *thresholds)
    if side_by_side is not None:
        survived[side_by_side[0]] = True
        decayed[side_by_side[0]] = side_by_side[1]
    else:
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

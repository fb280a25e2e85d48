"""Test-time post-processing with mmdet 2.x's rules: grouped NMS, per-class NMS with a score threshold
and top-k, and pasting RoI masks into the image (``_do_paste_mask``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms as _torchvision_batched_nms
from torchvision.ops import nms

# mmcv's batched_nms runs one NMS on class-offset boxes below this many boxes and a per-class loop
# above it; the two differ only by float rounding at the IoU threshold, so follow the same switch
_SPLIT_THRESHOLD = 10000


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by NMS run separately per group, in descending score order (mmcv's ``batched_nms``).

    A box is suppressed by a higher-scored one of its group when their IoU (areas without +1) is
    strictly above ``iou_threshold``.
    """
    if boxes.shape[0] >= _SPLIT_THRESHOLD:
        return _torchvision_batched_nms(boxes, scores, groups, iou_threshold)
    # mmcv shifts each group by group * (max coordinate + 1), in the boxes' dtype, so groups never overlap
    offsets = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def multiclass_nms(
    boxes: torch.Tensor, scores: torch.Tensor, score_thr: float, iou_threshold: float, max_per_img: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's ``multiclass_nms``: (boxes, scores, labels) of the kept (RoI, class) pairs, best first.

    ``boxes``: (N, 4 * C) class-specific or (N, 4) shared; ``scores``: (N, C + 1) softmax output with the
    background last. A pair is a candidate when its score is strictly above ``score_thr``.
    """
    num_classes = scores.shape[1] - 1
    if boxes.shape[1] == 4:
        boxes = boxes[:, None].expand(-1, num_classes, 4)
    boxes = boxes.reshape(-1, 4)
    fg_scores = scores[:, :-1].reshape(-1)
    labels = torch.arange(num_classes, device=scores.device).repeat(scores.shape[0])
    keep = (fg_scores > score_thr).nonzero().squeeze(1)
    boxes, fg_scores, labels = boxes[keep], fg_scores[keep], labels[keep]
    if boxes.numel() == 0:
        return boxes, fg_scores, labels
    keep = batched_nms(boxes, fg_scores, labels, iou_threshold)
    if max_per_img > 0:
        keep = keep[:max_per_img]
    return boxes[keep], fg_scores[keep], labels[keep]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Paste (N, M, M) RoI mask probabilities into (N, h, w) boolean image masks (mmdet's ``_do_paste_mask``).

    Each pixel centre is mapped into its box and sampled bilinearly (``grid_sample``, align_corners=False,
    zero outside); a pixel is in the mask when the probability is >= ``threshold``. As mmdet on the CPU,
    each mask is sampled only over its box grown to whole pixels plus one: outside it every value is
    below one half, so nothing is lost at upstream's threshold and memory stays per box, not per image.
    """
    h, w = image_size
    out = torch.zeros(masks.shape[0], h, w, dtype=torch.bool, device=masks.device)
    for i in range(masks.shape[0]):
        x0, y0, x1, y1 = boxes[i].float()
        x0_int, y0_int = int((x0.floor() - 1).clamp(min=0)), int((y0.floor() - 1).clamp(min=0))
        x1_int, y1_int = int((x1.ceil() + 1).clamp(max=w)), int((y1.ceil() + 1).clamp(max=h))
        if x1_int <= x0_int or y1_int <= y0_int:
            continue
        grid_y = (torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid_x = (torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        # a zero-width box divides by zero; mmdet samples those pixels at the box centre
        grid_x = torch.where(torch.isinf(grid_x), torch.zeros_like(grid_x), grid_x)
        grid_y = torch.where(torch.isinf(grid_y), torch.zeros_like(grid_y), grid_y)
        grid = torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), dim=-1)
        pasted = F.grid_sample(masks[i][None, None].float(), grid[None], align_corners=False)
        out[i, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0] >= threshold
    return out

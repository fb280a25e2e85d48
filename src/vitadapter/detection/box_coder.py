"""Box regression coding shared by the RPN and every R-CNN stage (mmdet's ``DeltaXYWHBBoxCoder``)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

# mmdet's wh_ratio_clip = 16 / 1000: a delta may grow or shrink a side by at most 62.5x
_MAX_LOG_RATIO = abs(math.log(16 / 1000))


class DeltaXYWHBBoxCoder:
    """Deltas (dx, dy, dw, dh), normalised by ``means``/``stds``, relative to a reference box.

    Widths are ``x2 - x1`` (no +1) and centres ``(x1 + x2) / 2``; the operation order follows mmdet 2.x's
    ``delta2bbox`` so results agree to the last bit where the floats allow.
    """

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"means and stds need 4 values each, got {list(means)} and {list(stds)}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)

    def decode(self, boxes: torch.Tensor, deltas: torch.Tensor, max_shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """``boxes`` (N, 4) x1y1x2y2 and ``deltas`` (N, 4k) -> (N, 4k) boxes, one per group of 4 deltas.

        ``max_shape`` (h, w): clip x to [0, w] and y to [0, h] (the image inside the padded batch).
        """
        n = deltas.shape[0]
        if n == 0:
            return deltas.clone()
        d = deltas.reshape(-1, 4) * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        ref = boxes.repeat(1, deltas.shape[1] // 4).reshape(-1, 4)
        centre = (ref[:, :2] + ref[:, 2:]) * 0.5
        size = ref[:, 2:] - ref[:, :2]
        centre = centre + size * d[:, :2]
        size = size * d[:, 2:].clamp(min=-_MAX_LOG_RATIO, max=_MAX_LOG_RATIO).exp()
        out = torch.cat([centre - size * 0.5, centre + size * 0.5], dim=-1)
        if max_shape is not None:
            h, w = max_shape
            out[:, 0::2] = out[:, 0::2].clamp(min=0, max=w)
            out[:, 1::2] = out[:, 1::2].clamp(min=0, max=h)
        return out.reshape(n, -1)

    def encode(self, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The deltas that :meth:`decode` turns ``boxes`` (N, 4) into ``targets`` (N, 4), normalised by
        ``means``/``stds`` (mmdet's ``bbox2delta``); training's regression targets."""
        if boxes.shape != targets.shape or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes and targets must both be (N, 4), got {tuple(boxes.shape)} and {tuple(targets.shape)}")
        boxes, targets = boxes.float(), targets.float()
        size = boxes[:, 2:] - boxes[:, :2]
        centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        target_size = targets[:, 2:] - targets[:, :2]
        target_centre = (targets[:, :2] + targets[:, 2:]) * 0.5
        deltas = torch.cat([(target_centre - centre) / size, torch.log(target_size / size)], dim=1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

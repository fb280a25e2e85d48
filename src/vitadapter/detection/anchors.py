"""Anchors as mmdet 2.x's ``AnchorGenerator`` lays them out (torchvision's generator rounds them and
centres them differently)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class AnchorGenerator(nn.Module):
    """Per level: ``len(ratios) * len(scales)`` anchors of base size = the stride, centred at
    ``(x * stride, y * stride)`` (not the cell centre) and not rounded; rows ordered (y, x, anchor).

    Ratio r = h / w: h = stride * scale * sqrt(r), w = stride * scale / sqrt(r), ratios outermost.
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float] = (0.5, 1.0, 2.0), scales: Sequence[float] = (8,)):
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.num_anchors = len(ratios) * len(scales)
        h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        scales_t = torch.tensor(scales, dtype=torch.float32)
        for level, stride in enumerate(self.strides):
            ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
            hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
            base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
            self.register_buffer(f"base_anchors_{level}", base, persistent=False)

    def forward(self, featmap_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """(h_l * w_l * A, 4) anchors per level, x1y1x2y2 in the padded image's pixels."""
        if len(featmap_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature map sizes, got {len(featmap_sizes)}")
        anchors = []
        for level, ((h, w), stride) in enumerate(zip(featmap_sizes, self.strides)):
            base = getattr(self, f"base_anchors_{level}")
            shift_x = torch.arange(w, device=base.device).to(base.dtype) * stride
            shift_y = torch.arange(h, device=base.device).to(base.dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base[None]).reshape(-1, 4))
        return anchors

"""RoI feature extraction over the pyramid levels (mmdet's ``SingleRoIExtractor`` with mmcv's aligned
``RoIAlign``); torchvision's ``MultiScaleRoIAlign`` maps levels differently and is not aligned."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """The level of each (K, 5) RoI: floor(log2(sqrt(w * h) / finest_scale + 1e-6)), clamped to the levels.

    So a box of side < 112 px reads stride 4, < 224 px stride 8, < 448 px stride 16, larger stride 32
    (with four levels and the default ``finest_scale``).
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RoIPooler(nn.Module):
    """(K, 5) RoIs (batch index, x1, y1, x2, y2 in the batch's pixels) -> (K, C, s, s) features, each
    RoI read from its level with ``roi_align(aligned=True)``; ``sampling_ratio=0`` samples
    ceil(bin size) points per bin and axis, as mmcv."""

    def __init__(self, output_size: int = 7, featmap_strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 0, finest_scale: float = 56.0):
        super().__init__()
        self.output_size = int(output_size)
        self.featmap_strides = [int(s) for s in featmap_strides]
        self.sampling_ratio = int(sampling_ratio)
        self.finest_scale = float(finest_scale)

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``features``: at least ``len(featmap_strides)`` levels, the finest first; extra ones are unused."""
        num_levels = len(self.featmap_strides)
        if len(features) < num_levels:
            raise ValueError(f"RoIPooler reads {num_levels} levels, got {len(features)}")
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], self.output_size, self.output_size)
        levels = map_roi_levels(rois, num_levels, self.finest_scale)
        for level, stride in enumerate(self.featmap_strides):
            index = (levels == level).nonzero().squeeze(1)
            if index.numel():
                out[index] = roi_align(
                    features[level], rois[index], self.output_size, spatial_scale=1 / stride,
                    sampling_ratio=self.sampling_ratio, aligned=True,
                )
        return out

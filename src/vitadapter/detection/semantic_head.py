"""HTC's semantic branch: mmdet 2.22's ``FusedSemanticHead`` on the FPN levels, and the rule that adds
its feature map to every RoI's features in the box and mask branches."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .conv_module import ConvModule


class FusedSemanticHead(nn.Module):
    """All ``num_ins`` levels brought to the ``fusion_level``'s size, each through its own 1x1 conv +
    ReLU, summed, then ``num_convs`` 3x3 conv + ReLU units. Returns the semantic logits (``conv_logits``,
    ``num_classes`` channels) and the feature fused into the RoI heads (``conv_embedding`` + ReLU), both
    at the fusion level's stride.

    Module names are mmdet's (``lateral_convs.{i}``, ``convs.{i}``, ``conv_embedding``, ``conv_logits``):
    a checkpoint's ``roi_head.semantic_head.*`` entries load with the prefix stripped.
    """

    def __init__(
        self,
        num_ins: int = 5,
        fusion_level: int = 1,
        num_convs: int = 4,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_classes: int = 183,
    ):
        super().__init__()
        if not 0 <= fusion_level < num_ins:
            raise ValueError(f"fusion_level must index one of the {num_ins} inputs, got {fusion_level}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_ins = num_ins
        self.fusion_level = fusion_level
        self.in_channels = in_channels
        self.lateral_convs = nn.ModuleList(ConvModule(in_channels, in_channels, 1) for _ in range(num_ins))
        widths = [in_channels] + [conv_out_channels] * num_convs
        self.convs = nn.ModuleList(ConvModule(c_in, conv_out_channels, 3) for c_in in widths[:-1])
        self.conv_embedding = ConvModule(widths[-1], conv_out_channels, 1)
        self.conv_logits = nn.Conv2d(widths[-1], num_classes, 1)
        nn.init.kaiming_normal_(self.conv_logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv_logits.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(feats) != self.num_ins:
            raise ValueError(f"FusedSemanticHead expects {self.num_ins} levels, got {len(feats)}")
        for i, f in enumerate(feats):
            if f.dim() != 4 or f.shape[1] != self.in_channels:
                raise ValueError(f"level {i} must be (B, {self.in_channels}, H, W), got {tuple(f.shape)}")
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = x.shape[-2:]
        for i, f in enumerate(feats):
            if i != self.fusion_level:
                # upstream resizes first and convolves after (not the cheaper reverse)
                x = x + self.lateral_convs[i](F.interpolate(f, size=size, mode="bilinear", align_corners=True))
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(x), self.conv_embedding(x)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """mmdet's ``FusedSemanticHead.loss`` (``CrossEntropyLoss(ignore_index=...)``, before its weight):
        softmax cross-entropy of ``logits`` (B, classes, h, w) against ``labels`` (B, h, w), summed over
        the labelled pixels and divided by ALL pixels, ignored ones included (mmdet's default
        ``avg_non_ignore=False``)."""
        if labels.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"labels must be (B, h, w) = {tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(labels.shape)}")
        labelled = labels != ignore_index
        if labelled.any() and (labels[labelled].min() < 0 or labels[labelled].max() >= logits.shape[1]):
            raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}) or {ignore_index} (ignored)")
        per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        return per_pixel.sum() / max(labels.numel(), 1)


def fuse_semantic(
    roi_feats: torch.Tensor,
    semantic_feat: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float = 1 / 8,
    pooled_size: int = 14,
) -> torch.Tensor:
    """HTC's semantic fusion: ``semantic_feat`` RoIAligned over each RoI at ``pooled_size`` (mmdet's
    semantic RoI extractor: aligned, adaptive sampling), average-pooled down to ``roi_feats``' size if it
    differs (14 -> 7 for the box branch), and added.

    ``roi_feats``: (R, C, h, w) from the FPN levels; ``semantic_feat``: (B, C, H, W) at
    ``spatial_scale``; ``rois``: (R, 5) ``batch_index, x1, y1, x2, y2`` in input pixels.
    """
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (R, 5) rows of batch index, x1, y1, x2, y2, got {tuple(rois.shape)}")
    if roi_feats.dim() != 4 or roi_feats.shape[:2] != (rois.shape[0], semantic_feat.shape[1]):
        raise ValueError(
            f"roi_feats must be ({rois.shape[0]}, {semantic_feat.shape[1]}, h, w) for these rois and semantic_feat, "
            f"got {tuple(roi_feats.shape)}"
        )
    pooled = roi_align(semantic_feat, rois, pooled_size, spatial_scale=spatial_scale, sampling_ratio=0, aligned=True)
    if pooled.shape[-2:] != roi_feats.shape[-2:]:
        pooled = F.adaptive_avg_pool2d(pooled, roi_feats.shape[-2:])
    return roi_feats + pooled

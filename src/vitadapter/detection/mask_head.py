"""The FCN mask head of Mask R-CNN (mmdet's ``FCNMaskHead``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .conv_module import ConvModule
from .sampler import SamplingResult


def mask_targets(samples: Sequence[SamplingResult], gt_masks: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """(K, size, size) 0/1 targets of the sampled positives (mmdet's ``mask_target``): each positive's box,
    clipped to its gt mask, cut from that mask by aligned RoIAlign (adaptive sampling) and thresholded
    at 0.5. ``gt_masks``: per image (G, H, W) in the batch's pixels, one per gt box."""
    targets = []
    for sample, masks in zip(samples, gt_masks):
        if sample.pos_boxes.shape[0] == 0:
            continue
        height, width = masks.shape[-2:]
        boxes = sample.pos_boxes.float()
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
        # the RoI's batch index picks its gt mask: no per-positive copy of full-size masks
        rois = torch.cat([sample.pos_gt_inds[:, None].to(boxes), boxes], dim=1)
        crops = roi_align(masks[:, None].to(boxes), rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
        targets.append((crops[:, 0] >= 0.5).float())
    if not targets:
        return torch.zeros(0, size, size, device=samples[0].pos_boxes.device if samples else None)
    return torch.cat(targets)


class FCNMaskHead(nn.Module):
    """RoI features (K, C, s, s) -> ``convs`` (3x3 + [BN] + ReLU) -> 2x ``upsample`` (transposed conv +
    ReLU) -> ``conv_logits``: (K, num_classes, 2s, 2s) mask logits (one class-agnostic map if asked)."""

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        num_convs: int = 4,
        conv_out_channels: int = 256,
        norm: bool = False,
        class_agnostic: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        widths = [in_channels] + [conv_out_channels] * num_convs
        self.convs = nn.ModuleList(ConvModule(a, b, 3, norm=norm) for a, b in zip(widths[:-1], widths[1:]))
        self.upsample = nn.ConvTranspose2d(widths[-1], conv_out_channels, 2, stride=2)
        self.relu = nn.ReLU()
        self.conv_logits = nn.Conv2d(conv_out_channels, 1 if class_agnostic else num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def features(self, roi_features: torch.Tensor) -> torch.Tensor:
        """The last conv unit's output."""
        x = roi_features
        for conv in self.convs:
            x = conv(x)
        return x

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """Mask logits (K, classes, 2s, 2s) from :meth:`features`' output."""
        return self.conv_logits(self.relu(self.upsample(feat)))

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(roi_features))

    def label_logits(self, roi_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, 2s, 2s) logits of each RoI's own class (of the one map when class-agnostic)."""
        logits = self.logits(self.features(roi_features))
        channel = torch.zeros_like(labels) if self.class_agnostic else labels
        return logits[torch.arange(logits.shape[0], device=logits.device), channel]

    def loss(self, logits: torch.Tensor, samples: Sequence[SamplingResult], gt_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """mmdet's ``FCNMaskHead.loss`` on this head's logits for the positives ``torch.cat([s.pos_boxes
        for s in samples])``: binary cross-entropy of each RoI's gt-class channel against
        :func:`mask_targets` at the logits' size, averaged over all pixels of all RoIs."""
        if logits.shape[0] == 0:
            return logits.sum()
        labels = torch.cat([s.pos_gt_labels for s in samples])
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"logits need one row per sampled positive ({labels.shape[0]}), got {logits.shape[0]}")
        channel = torch.zeros_like(labels) if self.class_agnostic else labels
        chosen = logits[torch.arange(logits.shape[0], device=logits.device), channel].float()
        return F.binary_cross_entropy_with_logits(chosen, mask_targets(samples, gt_masks, logits.shape[-1]), reduction="mean")

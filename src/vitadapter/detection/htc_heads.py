"""HTC's mask branch: mmdet 2.22's ``HTCMaskHead`` (an FCN mask head that takes the previous stage's
last conv feature through ``conv_res``: mask information flow) and the three-stage test-time pass."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .conv_module import ConvModule
from .mask_head import FCNMaskHead


class HTCMaskHead(FCNMaskHead):
    """The FCN mask head with mask information flow: with ``with_conv_res`` it first adds
    ``ReLU(conv_res(res_feat))`` to its input, ``res_feat`` being the previous stage's last conv output.
    Module names are mmdet's (``convs.{i}``, ``upsample``, ``conv_logits``, ``conv_res``): a checkpoint's
    ``roi_head.mask_head.{k}.*`` entries load with the prefix stripped.
    """

    def __init__(
        self,
        num_convs: int = 4,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_classes: int = 80,
        with_conv_res: bool = True,
        class_agnostic: bool = False,
    ):
        super().__init__(in_channels, num_classes, num_convs, conv_out_channels, class_agnostic=class_agnostic)
        self.in_channels = in_channels
        self.conv_res = ConvModule(conv_out_channels, conv_out_channels, 1) if with_conv_res else None

    def features(self, x: torch.Tensor, res_feat: torch.Tensor | None = None) -> torch.Tensor:
        """The last conv unit's output, what the next stage's ``conv_res`` reads (mmdet's
        ``return_logits=False``; HTC training recomputes the earlier stages this way)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (R, {self.in_channels}, h, w) RoI features, got {tuple(x.shape)}")
        if res_feat is not None:
            if self.conv_res is None:
                raise ValueError("this stage has no conv_res (with_conv_res=False): it takes no res_feat")
            x = x + self.conv_res(res_feat)
        return super().features(x)

    def forward(self, x: torch.Tensor, res_feat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mask_logits, last_feat)``, mmdet's ``return_logits=True, return_feat=True``."""
        feat = self.features(x, res_feat)
        return self.logits(feat), feat


def mask_info_flow(heads: Sequence[HTCMaskHead], mask_feats: torch.Tensor) -> list[torch.Tensor]:
    """HTC's test-time mask pass: every stage runs on the same RoI features (the final boxes'), stage k
    also reading stage k-1's last conv feature. Returns each stage's logits; they are not accumulated
    (HTC averages their sigmoids)."""
    outputs, last_feat = [], None
    for head in heads:
        logits, last_feat = head(mask_feats, last_feat)
        outputs.append(logits)
    return outputs

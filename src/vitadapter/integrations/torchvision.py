"""A vitadapter backbone for torchvision's detection models (Mask R-CNN, Faster R-CNN, RetinaNet, ...).

    from torchvision.models.detection import MaskRCNN
    from vitadapter.integrations.torchvision import vit_adapter_fpn

    model = MaskRCNN(vit_adapter_fpn("vit_adapter_b_det"), num_classes=91)

torchvision's own ``BackboneWithFPN`` cannot take the model: it runs the backbone's children one
after another (the image would go into ``vit``). ``ViTAdapterFPN`` calls the whole model and puts
torchvision's ``FeaturePyramidNetwork`` on its four levels, P2-P5 plus a max-pooled P6 ("pool"), the
levels and names torchvision's detection heads expect by default (as upstream's Mask R-CNN
configs use). It is ``torch.fx``-traceable, so ``create_feature_extractor`` works on it too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .._factory import create_model


class ViTAdapterFPN(nn.Module):
    """``body`` (a ViTAdapter) -> its levels -> an FPN: an ordered dict of ``out_channels``-wide maps,
    "0" ... "3" at strides 4 to 32 (of the levels the body keeps) and the extra block's ("pool" by
    default, stride 64). ``out_channels`` is what torchvision's detectors read."""

    def __init__(
        self,
        body: nn.Module,
        out_channels: int = 256,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        self.body = body
        channels = [body.feature_info[i]["num_chs"] for i in body.kept_levels]
        self.fpn = FeaturePyramidNetwork(
            channels, out_channels, extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = self.body(x)
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(levels)))


def vit_adapter_fpn(
    name: str,
    pretrained: bool = False,
    out_channels: int = 256,
    extra_blocks: Optional[ExtraFPNBlock] = None,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
    **kwargs: Any,
) -> ViTAdapterFPN:
    """A torchvision detection backbone: ``vitadapter.create_model(name, pretrained, **kwargs)`` under an
    FPN of ``out_channels`` (see ``ViTAdapterFPN``). Its five maps fit the default anchor generators
    and RoI poolers of ``MaskRCNN``, ``FasterRCNN`` and ``RetinaNet`` (one anchor size per map)."""
    return ViTAdapterFPN(create_model(name, pretrained=pretrained, **kwargs), out_channels, extra_blocks, norm_layer)

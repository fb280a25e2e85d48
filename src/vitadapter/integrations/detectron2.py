"""vitadapter as a detectron2 backbone: ``ViTAdapterBackbone`` and the registered
``build_vit_adapter_fpn_backbone``.

detectron2 is not on PyPI; this module needs it importable (its pure-Python part is enough: the
backbone, FPN, RPN and RoI heads run on torchvision's ops). Importing the module registers the
builder in detectron2's ``BACKBONE_REGISTRY``.

- yacs configs: ``add_vit_adapter_config(cfg)``, then ``cfg.MODEL.BACKBONE.NAME =
  "build_vit_adapter_fpn_backbone"`` and ``cfg.MODEL.VIT_ADAPTER.NAME = "vit_adapter_b_det"``;
  ``cfg.MODEL.FPN`` (``IN_FEATURES`` res2-res5, ``OUT_CHANNELS``, ``NORM``, ``FUSE_TYPE``) applies.
- LazyConfig: ``model.backbone.bottom_up = L(ViTAdapterBackbone)(name="vit_adapter_b_det",
  out_features=["res2", "res3", "res4", "res5"])`` in detectron2's Mask R-CNN FPN config (its FPN
  reads ``bottom_up.out_features``), giving p2-p6.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from .._factory import create_model

LEVEL_NAMES = ("res2", "res3", "res4", "res5")


class ViTAdapterBackbone(Backbone):
    """A vitadapter model as detectron2's bottom-up backbone: "res2" ... "res5" at strides 4 to 32.

    ``name`` is a registered name (built by ``vitadapter.create_model(name, pretrained, **kwargs)``)
    or a model already built. Any input size works (``size_divisibility`` 0: the model pads
    internally); an FPN on top asks for its own divisibility (32).
    """

    def __init__(
        self,
        name: Union[str, nn.Module] = "vit_adapter_b_det",
        pretrained: bool = False,
        out_features: Sequence[str] = LEVEL_NAMES,
        **kwargs: Any,
    ):
        super().__init__()
        unknown = [f for f in out_features if f not in LEVEL_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features must be among {LEVEL_NAMES}, got {list(out_features)}")
        if isinstance(name, str):
            name = create_model(name, pretrained=pretrained, **kwargs)
        self.model = name
        self._out_features = [f for f in LEVEL_NAMES if f in out_features]
        keep = [LEVEL_NAMES.index(f) for f in self._out_features]
        if keep != list(range(len(LEVEL_NAMES))):
            self.model.prune_intermediate_layers(keep)  # no parameter is left out of forward
        info = self.model.feature_info
        self._out_feature_strides = {f: info[LEVEL_NAMES.index(f)]["reduction"] for f in self._out_features}
        self._out_feature_channels = {f: info[LEVEL_NAMES.index(f)]["num_chs"] for f in self._out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self._out_features, self.model(x)))


def add_vit_adapter_config(cfg: CfgNode) -> None:
    """Adds ``cfg.MODEL.VIT_ADAPTER`` (``NAME``, ``PRETRAINED``) with defaults."""
    cfg.MODEL.VIT_ADAPTER = CfgNode()
    cfg.MODEL.VIT_ADAPTER.NAME = "vit_adapter_b_det"
    cfg.MODEL.VIT_ADAPTER.PRETRAINED = False


@BACKBONE_REGISTRY.register()
def build_vit_adapter_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``cfg.MODEL.VIT_ADAPTER`` under detectron2's FPN (``cfg.MODEL.FPN``) with a max-pooled p6, as
    upstream's Mask R-CNN configs: p2-p6 at strides 4-64."""
    adapter = cfg.MODEL.VIT_ADAPTER
    bottom_up = ViTAdapterBackbone(adapter.NAME, pretrained=adapter.PRETRAINED, in_chans=input_shape.channels,
                                   out_features=cfg.MODEL.FPN.IN_FEATURES)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

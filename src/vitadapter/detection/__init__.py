"""Detector parts after the backbone, one file per stage of the data flow, with mmdet 2.x's numerics and
parameter names: neck (``fpn``, ``channel_mapper``), ``anchors`` + ``rpn``, RoI pooling (``poolers``),
box and mask heads, ``roi_heads`` (Mask R-CNN, cascade), ``postprocess`` (NMS, mask pasting), and
``two_stage`` wiring them. Box coding (``box_coder``) is shared by the RPN and every stage. HTC++'s own
parts: ``extra_attention`` (the neck in front of its FPN), ``semantic_head``, ``htc_heads`` (mask
information flow), ``soft_nms``, ``htc_roi_heads`` (the HTC RoI stage wiring them) and ``test_time_aug``
(upstream's multi-scale flip test). Training beside the stages: ``assigner``, ``sampler``, ``box_losses``,
the ``loss`` methods of the RPN, box and mask heads, and ``training`` wiring them."""
from .anchors import AnchorGenerator
from .box_coder import DeltaXYWHBBoxCoder
from .box_head import ConvFCBBoxHead
from .channel_mapper import ChannelMapperWithPooling
from .fpn import FPN
from .htc_roi_heads import HTCRoIHeads
from .mask_head import FCNMaskHead
from .poolers import RoIPooler, map_roi_levels
from .postprocess import batched_nms, multiclass_nms, paste_masks
from .roi_heads import CascadeRoIHeads, RoIHeads
from .rpn import RPNHead
from .test_time_aug import AugTest
from .two_stage import TwoStageDetectorHeads

__all__ = [
    "AnchorGenerator", "AugTest", "CascadeRoIHeads", "ChannelMapperWithPooling", "ConvFCBBoxHead", "DeltaXYWHBBoxCoder", "FCNMaskHead",
    "FPN", "HTCRoIHeads", "RPNHead", "RoIHeads", "RoIPooler", "TwoStageDetectorHeads", "batched_nms", "map_roi_levels",
    "multiclass_nms", "paste_masks",
]

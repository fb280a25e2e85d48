"""Model families; importing this registers them in timm's registry."""
from . import beit_adapter, dino_adapter, uniperceiver_adapter  # noqa: F401  (registration)
from . import mask2former, upernet  # noqa: F401  (after the backbones: entries point at their release files)
from . import cascade_rcnn, htc, mask_rcnn  # noqa: F401  (likewise)
from .detector import Detector
from .segmentor import Segmentor
from .vit_adapter import ViTAdapter

# the modules whose architectures vitadapter lists as its own: backbones (image -> pyramid),
# segmentors (image -> class logits) and detectors (image -> boxes, scores, labels, masks)
BACKBONE_MODULES = ("vit_adapter", "beit_adapter", "dino_adapter", "uniperceiver_adapter")
SEGMENTOR_MODULES = ("upernet", "mask2former")
DETECTOR_MODULES = ("mask_rcnn", "cascade_rcnn", "htc")
FAMILY_MODULES = BACKBONE_MODULES + SEGMENTOR_MODULES + DETECTOR_MODULES

__all__ = ["BACKBONE_MODULES", "DETECTOR_MODULES", "FAMILY_MODULES", "SEGMENTOR_MODULES", "Detector", "Segmentor", "ViTAdapter"]

"""Model families; importing this registers them in timm's registry."""
from . import beit_adapter, dino_adapter, uniperceiver_adapter  # noqa: F401  (registration)
from . import mask2former, upernet  # noqa: F401  (after the backbones: entries point at their release files)
from .segmentor import Segmentor
from .vit_adapter import ViTAdapter

# the modules whose architectures vitadapter lists as its own: backbones (image -> pyramid) and
# segmentors (image -> class logits)
BACKBONE_MODULES = ("vit_adapter", "beit_adapter", "dino_adapter", "uniperceiver_adapter")
SEGMENTOR_MODULES = ("upernet", "mask2former")
FAMILY_MODULES = BACKBONE_MODULES + SEGMENTOR_MODULES

__all__ = ["BACKBONE_MODULES", "FAMILY_MODULES", "SEGMENTOR_MODULES", "Segmentor", "ViTAdapter"]

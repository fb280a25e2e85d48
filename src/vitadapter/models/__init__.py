"""Model families; importing this registers them in timm's registry."""
from . import beit_adapter, dino_adapter  # noqa: F401  (registration)
from .vit_adapter import ViTAdapter

# the modules whose architectures vitadapter lists as its own
FAMILY_MODULES = ("vit_adapter", "beit_adapter", "dino_adapter")

__all__ = ["FAMILY_MODULES", "ViTAdapter"]

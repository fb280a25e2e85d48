"""Model families; importing this registers them in timm's registry."""
from .vit_adapter import ViTAdapter

__all__ = ["ViTAdapter"]

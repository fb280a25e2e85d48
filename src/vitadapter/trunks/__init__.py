"""Per-family drivers that run a timm ViT block by block between the adapter's interactions."""
from .vit import VisionTransformerTrunk, create_vit

__all__ = ["VisionTransformerTrunk", "create_vit"]

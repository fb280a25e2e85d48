"""Per-family drivers that run a timm ViT block by block between the adapter's interactions."""
from .vit import VisionTransformerTrunk, create_vit, trunk_state_from_timm

__all__ = ["VisionTransformerTrunk", "create_vit", "trunk_state_from_timm"]

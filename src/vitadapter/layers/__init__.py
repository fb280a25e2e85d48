"""Adapter building blocks, one concern per file."""
from .interaction import ConvFFN, Extractor, Injector, InteractionBlock
from .msda import MSDeformAttn
from .msda_op import ms_deform_attn, ms_deform_attn_reference
from .spatial_prior import SpatialPriorModule
from .window_attn import windowed_attention

__all__ = [
    "ConvFFN",
    "Extractor",
    "Injector",
    "InteractionBlock",
    "MSDeformAttn",
    "SpatialPriorModule",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "windowed_attention",
]

"""vitadapter: ViT-Adapter feature pyramids on real timm ViTs, in pure PyTorch."""
from ._factory import create_model, list_models, list_pretrained
from .hub import push_to_hub, save_pretrained
from .layers.msda_op import ms_deform_attn
from .models import ViTAdapter
from .upstream import load_upstream

__version__ = "0.1.0"

__all__ = [
    "ViTAdapter",
    "create_model",
    "list_models",
    "list_pretrained",
    "load_upstream",
    "ms_deform_attn",
    "push_to_hub",
    "save_pretrained",
]

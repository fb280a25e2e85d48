"""Decode heads, one file per head: pyramid -> class logits (see ``base.DecodeHead``)."""
from .fcn import FCNHead
from .uper import UPerHead

__all__ = ["FCNHead", "UPerHead"]

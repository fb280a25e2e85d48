"""Decode heads, one file per head: pyramid -> class logits (``semantic_logits``) and training
losses (``loss``); ``base.DecodeHead`` for the convolutional ones, ``mask2former`` for the query-based one."""
from .fcn import FCNHead
from .mask2former import Mask2FormerHead, Mask2FormerOutput
from .uper import UPerHead

__all__ = ["FCNHead", "Mask2FormerHead", "Mask2FormerOutput", "UPerHead"]

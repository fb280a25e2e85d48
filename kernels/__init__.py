"""Triton kernels of vitadapter, installed as ``vitadapter.kernels``.

Importing this module imports Triton. Set ``TRITON_INTERPRET=1`` before the import to run the
kernels on CPU tensors through Triton's interpreter (slow: for tests on small shapes).
"""
from .msda import msda_backward, msda_forward, msda_fused_backward, msda_fused_forward

__all__ = ["msda_backward", "msda_forward", "msda_fused_backward", "msda_fused_forward"]

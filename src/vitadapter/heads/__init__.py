"""Segmentation heads that take an adapter's 4-level pyramid (strides 4, 8, 16, 32)."""

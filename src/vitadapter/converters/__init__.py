"""Key and config maps for the adapters of other codebases (DINOv2's, DINOv3's).

Each module turns that code's constructor kwargs into ``ViTAdapter`` kwargs and its state dict
into this package's layout; ``vitadapter.load_upstream`` picks the module by codebase name.
"""

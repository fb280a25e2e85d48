"""Foreign configs and checkpoints -> vitadapter's: the only place that knows other codebases' names.

``backbone`` (upstream ViT-Adapter's backbones, and every checkpoint layout a ViTAdapter loads),
``mmseg`` / ``mmseg_mask2former`` (upstream's segmentation heads), ``mmdet`` (its detectors),
``dinov2``, ``dinov3`` and ``uniperceiver``. Dicts in, dicts out: a converter returns constructor
keyword arguments and renamed state dicts; ``vitadapter.models`` builds and loads.
"""

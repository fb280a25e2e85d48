"""The registry as data: every architecture's weight tags, preprocessing, size and compute.

``vitadapter list`` and ``vitadapter describe`` read ``catalog.json`` so that they answer without
importing torch (seconds on a small machine). The file is generated from the registry; a test
checks that it still matches. After adding or changing an architecture or a tag, regenerate it:

    python -m vitadapter.catalog
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("catalog.json")


def load() -> dict[str, Any]:
    """``{"architectures": {arch: {...}}, "weights": {"arch.tag": {...}}}``, in registry order."""
    return json.loads(PATH.read_text())


def build() -> dict[str, Any]:
    """The catalog computed from the registry: models are built on the meta device (no memory, no
    weights) and their FLOPs counted at the default input size, batch 1, as ``count_flops`` does."""
    import torch
    from timm.models import get_pretrained_cfg

    from . import create_model, list_models, list_pretrained
    from .hub import WEIGHTS_NAME

    architectures = {}
    for arch in list_models():
        default = get_pretrained_cfg(arch)
        with torch.device("meta"):
            model = create_model(arch).eval()
            image = torch.empty(1, *default.input_size)
        architectures[arch] = {
            "default_tag": default.tag,
            "input_size": list(default.input_size),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vit_parameters": sum(p.numel() for p in model.vit.parameters()),
            "levels": [{"channels": info["num_chs"], "stride": info["reduction"]} for info in model.feature_info],
            "flops": count_flops(model, image),
        }
    weights = {}
    for name in list_pretrained():
        cfg = get_pretrained_cfg(name)
        weights[name] = {
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "input_size": list(cfg.input_size),
            "hf_hub_id": cfg.hf_hub_id,
            "hf_hub_filename": cfg.hf_hub_filename or WEIGHTS_NAME if cfg.hf_hub_id else None,
            "url": cfg.url or None,
        }
    return {"architectures": architectures, "weights": weights}


def count_flops(model: Any, image: Any) -> int:
    """Forward FLOPs with attention counted: torch's counter skips the fused CPU attention kernel, so
    the math backend is forced (the deformable-attention op's gathers count as no FLOPs)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image)
    return counter.get_total_flops()


if __name__ == "__main__":
    PATH.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {PATH}")

"""The registry as data: every architecture's weight tags, preprocessing, size and compute.

``vitadapter list`` and ``vitadapter describe`` read ``catalog.json`` so that they answer without
importing torch (seconds on a small machine). The file is generated from the registry; a test
checks that it still matches. After adding or changing an architecture or a tag, regenerate it:

    python -m vitadapter.catalog

Only the reading side is imported at the top: building the catalog needs torch and the models, which
the functions that build it import themselves, so that ``vitadapter list`` starts without them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .weights.staging import write_atomically

PATH = Path(__file__).with_name("catalog.json")


def load() -> dict[str, Any]:
    """``{"architectures": {arch: {...}}, "weights": {"arch.tag": {...}}}``, in registry order."""
    return json.loads(PATH.read_text())


def build() -> dict[str, Any]:
    """The catalog computed from the registry (a minute on 2 cores: every model is built)."""
    from . import list_models

    return {"architectures": {arch: architecture(arch) for arch in list_models()}, "weights": weights()}


def architecture(arch: str, flops: bool = True) -> dict[str, Any]:
    """One architecture's entry: its default tag and input size, parameters and levels from the model
    built on the meta device (no memory, no weights), and its FLOPs at the default input size, batch
    1. An architecture that needs arguments to be built (``vit_adapter``: a trunk) says which."""
    from timm.models import get_pretrained_cfg

    from . import create_model
    from ._meta import meta_device

    default = get_pretrained_cfg(arch)
    entry: dict[str, Any] = {"default_tag": default.tag or None, "input_size": list(default.input_size)}
    try:
        with meta_device():
            model = create_model(arch).eval()
    except ValueError as e:
        return dict(entry, requires=str(e))
    backbone = getattr(model, "backbone", model)  # a segmentor's, or the backbone itself
    entry.update(
        parameters=sum(p.numel() for p in model.parameters()),
        vit_parameters=sum(p.numel() for p in backbone.vit.parameters()),
        levels=[{"channels": info["num_chs"], "stride": info["reduction"]} for info in backbone.feature_info],
    )
    if backbone is not model:
        entry["num_classes"] = model.num_classes
        entry["task"] = "detection" if hasattr(model, "detect") else "segmentation"
    if flops:
        entry["flops"] = flops_without_memory(model, default.input_size)
    return entry


def weights() -> dict[str, dict[str, Any]]:
    """Every ``arch.tag`` with weights: preprocessing and where the weights come from."""
    from timm.models import get_pretrained_cfg

    from . import list_pretrained
    from .weights.fetch import WEIGHTS_NAME

    entries = {}
    for name in list_pretrained():
        cfg = get_pretrained_cfg(name)
        entries[name] = {
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "input_size": list(cfg.input_size),
            "hf_hub_id": cfg.hf_hub_id,
            "hf_hub_filename": cfg.hf_hub_filename or WEIGHTS_NAME if cfg.hf_hub_id else None,
            "url": cfg.url or None,
        }
    return entries


def count_flops(model: Any, image: Any) -> int:
    """Forward FLOPs with attention counted: torch's counter skips the fused CPU attention kernel, so
    the math backend is forced (the deformable-attention op's gathers count as no FLOPs)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image)
    return counter.get_total_flops()


def flops_without_memory(model: Any, input_size: Any) -> int:
    """``count_flops`` of a model built on the meta device, for one ``(C, H, W)`` image (a detector's
    ``dense_forward``: backbone, neck, RPN maps): the forward
    runs on fake CPU tensors (shapes only, so a 7B trunk costs nothing; a CPU device, unlike meta, is
    one autocast and every op know)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    # no parameter needs grad: the counter's module tracker hooks tensors that do, and a parameter
    # used as is (Mask2Former's learned queries) has no graph node to hook under inference mode
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu").requires_grad_(False)
        # a detector's RoI stage depends on the proposals that survive: its dense part is counted
        return count_flops(getattr(model, "dense_forward", model), torch.empty(1, *input_size))


if __name__ == "__main__":
    text = json.dumps(build(), indent=1) + "\n"
    write_atomically(PATH, lambda path: path.write_text(text))
    print(f"wrote {PATH}")

"""Loads Hub models in a fresh interpreter for test_weights.py.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so each
phase of the Hub round trip runs here with the environment the test gives it. Usage:
``python hub_client.py OUT_DIR [EMPTY_CACHE_DIR]``: writes ``repo.safetensors`` and
``trunk.safetensors`` (the loaded state dicts) and, given an empty cache, ``empty_cache_error.txt``
(what loading the trunk tag from it raised).
"""
import sys
from pathlib import Path
from typing import Optional

from safetensors.torch import save_file

import vitadapter

LOADS = {
    "repo": ("hf-hub:vitadapter-test/tiny-det", {}),
    "trunk": ("vit_adapter_t.deit_in1k", dict(depth=4)),
}


def main(out: Path, empty_cache: Optional[Path]) -> None:
    for label, (name, kwargs) in LOADS.items():
        model = vitadapter.create_model(name, pretrained=True, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"{label}.safetensors")
    if empty_cache is None:
        return
    name, kwargs = LOADS["trunk"]
    try:
        vitadapter.create_model(name, pretrained=True, cache_dir=empty_cache, **kwargs)
        message = "no error"
    except FileNotFoundError as e:
        message = f"FileNotFoundError: {e}"
    (out / "empty_cache_error.txt").write_text(message)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)

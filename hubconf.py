"""torch.hub entry points: every architecture vitadapter registers.

    model = torch.hub.load("OWNER/vitadapter", "vit_adapter_b", pretrained=True)

Each entry point is ``vitadapter.create_model(name, pretrained=False, **kwargs)``; the package is
imported from this checkout's ``src`` folder.
"""
import os
import sys

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

import vitadapter  # noqa: E402


def _entry_point(name: str):
    def create(pretrained: bool = False, **kwargs):
        return vitadapter.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"vitadapter.create_model({name!r}, pretrained, **kwargs)"
    return create


for _name in vitadapter.list_models():
    globals()[_name] = _entry_point(_name)

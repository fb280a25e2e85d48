"""The adapters of DINOv2 and DINOv3 on timm's DINOv2 and DINOv3 trunks.

DINOv2's adapter is upstream's injector+extractor design on a patch-14 trunk whose cls (and register)
tokens ride along inside the ViT blocks. DINOv3's is extractor-only over a frozen trunk that runs once;
its outputs at four even depths go through the trunk's final norm. Tags are timm's trunk tags (a fresh
adapter, as both authors train theirs); adapter hyper-parameters follow each author's code: DINOv3's
class defaults, and for DINOv2 upstream's per-size deformable heads with DINOv2's deform ratio 0.5.
"""
from __future__ import annotations

from typing import Any, Callable

from timm.models import generate_default_cfgs, register_model

from .vit_adapter import ViTAdapter, _create_vit_adapter, _trunk

_DINOV2 = {  # size: (timm size name, deformable-attention heads, drop path)
    "s": ("small", 6, 0.1), "b": ("base", 12, 0.2), "l": ("large", 16, 0.3), "g": ("giant", 24, 0.3),
}
_DINOV3 = {  # size: (timm size name, timm tags)
    "t": ("tiny", ("eupe_lvd1689m",)), "s": ("small", ("lvd1689m",)), "s_plus": ("small_plus", ("lvd1689m",)),
    "b": ("base", ("lvd1689m",)), "l": ("large", ("lvd1689m", "sat493m")), "h_plus": ("huge_plus", ("lvd1689m",)),
    "7b": ("7b", ("lvd1689m", "sat493m")),
}


def _dinov3_trunk(size: str) -> str:
    # timm's tiny DINOv3 exists only with q/v biases
    return f"vit_{_DINOV3[size][0]}_patch16_dinov3" + ("_qkvb" if size == "t" else "")


def _dinov2_trunk(size: str, registers: bool) -> str:
    return f"vit_{_DINOV2[size][0]}_patch14_{'reg4_' if registers else ''}dinov2"


default_cfgs = generate_default_cfgs({
    **{
        f"vit_adapter_dinov2{'_reg4' if reg else ''}_{size}.lvd142m": _trunk(
            f"timm/{_dinov2_trunk(size, reg)}.lvd142m", input_size=(3, 518, 518)
        )
        for size in _DINOV2
        for reg in (False, True)
    },
    **{
        f"vit_adapter_dinov3_{size}.{tag}": _trunk(
            f"timm/{_dinov3_trunk(size)}.{tag}", license="dinov3-license", input_size=(3, 512, 512),
            **({"mean": (0.430, 0.411, 0.296), "std": (0.213, 0.156, 0.143)} if tag == "sat493m" else {}),
        )
        for size, (_, tags) in _DINOV3.items()
        for tag in tags
    },
})


def _dinov2(size: str, registers: bool) -> Callable[..., ViTAdapter]:
    name = f"vit_adapter_dinov2{'_reg4' if registers else ''}_{size}"
    _, heads, drop_path = _DINOV2[size]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
        args = dict(trunk=_dinov2_trunk(size, registers), conv_inplane=64, n_points=4, deform_num_heads=heads,
                    deform_ratio=0.5, init_values=0.0, drop_path_rate=drop_path)
        return _create_vit_adapter(name, pretrained, **dict(args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"DINOv2's adapter on timm's {_dinov2_trunk(size, registers)} (patch 14, cls token carried)."
    return entrypoint


def _dinov3(size: str) -> Callable[..., ViTAdapter]:
    name = f"vit_adapter_dinov3_{size}"

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ViTAdapter:
        args = dict(trunk=_dinov3_trunk(size), extractor_only=True, freeze_trunk=True, conv_inplane=64, n_points=4,
                    deform_num_heads=16, deform_ratio=0.5, init_values=0.0, drop_path_rate=0.3)
        return _create_vit_adapter(name, pretrained, **dict(args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"DINOv3's extractor-only adapter over timm's frozen {_dinov3_trunk(size)}."
    return entrypoint


# timm registers an entrypoint under its function name; one per trunk size and register variant
for _size in _DINOV2:
    for _registers in (False, True):
        register_model(_dinov2(_size, _registers))
for _size in _DINOV3:
    register_model(_dinov3(_size))

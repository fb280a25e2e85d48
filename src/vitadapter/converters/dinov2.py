"""DINOv2's segmentation adapter (``dinov2/eval/segmentation_m2f``'s ``ViTAdapter``) -> ``ViTAdapter``.

Its ViT is a timm-style ViT with a cls token and a cls row in the position table (patch 14 in the
released models), LayerNorm eps 1e-6, layer scale ``gamma1``/``gamma2``, and either a plain MLP or an
unpacked SwiGLU (``w1``, ``w2``, ``w3``). The adapter is upstream ViT-Adapter's segmentation design
with the cls token carried through the ViT blocks. timm's ``vit_*_patch14_dinov2`` is the same ViT.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .fields import as_bool, as_float, as_int

# accepted and without effect on the computed function
_IGNORED = ("pretrained", "with_cp", "memeff", "_delete_", "type")
_ADAPTER = ("conv_inplane", "n_points", "deform_num_heads", "init_values", "interaction_indexes", "with_cffn",
            "cffn_ratio", "deform_ratio", "add_vit_feature", "use_extra_extractor", "drop_path_rate")
# DINOv2's class defaults
_DEFAULTS = dict(pretrain_size=224, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, layer_scale=True, ffn_type="mlp", use_cls=True, deform_num_heads=6,
                 deform_ratio=1.0, init_values=0.0, conv_inplane=64)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: two thirds of the MLP width, rounded up to a multiple of 8."""
    return (int(2 * int(dim * mlp_ratio) / 3) + 7) // 8 * 8


def _int(cfg: dict[str, Any], name: str) -> int:
    return as_int(cfg.pop(name), f"DINOv2 adapter {name}", low=1)


def _bool(cfg: dict[str, Any], name: str) -> bool:
    return as_bool(cfg.pop(name), f"DINOv2 adapter {name}")


def adapter_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**_DEFAULTS, **config}
    for name in _IGNORED:
        cfg.pop(name, None)
    adapter = {k: cfg.pop(k) for k in _ADAPTER if k in cfg}
    patch, dim = _int(cfg, "patch_size"), _int(cfg, "embed_dim")
    pretrain_size, img_size = _int(cfg, "pretrain_size"), _int(cfg, "img_size")
    if pretrain_size // patch != img_size // patch:
        raise ValueError(
            f"img_size {img_size} and pretrain_size {pretrain_size} give different position grids for patch "
            f"{patch}: DINOv2's adapter reshapes the table to pretrain_size // patch, so it cannot run either"
        )
    if cfg.pop("pre_norm", False):
        raise ValueError("pre_norm=True (CLIP-style norm before the blocks) is not supported")
    if cfg.pop("window_attn", False) or cfg.pop("window_size", None) is not None:
        raise ValueError("window_attn is not supported for DINOv2's adapter (its released models use none)")
    ffn_type, mlp_ratio = cfg.pop("ffn_type"), as_float(cfg.pop("mlp_ratio"), "DINOv2 adapter mlp_ratio")
    if ffn_type == "mlp":
        base = "vit_base_patch14_dinov2"
    elif ffn_type == "swiglu":
        base, mlp_ratio = "vit_giant_patch14_dinov2", 2 * swiglu_hidden(dim, mlp_ratio) / dim
    else:
        raise ValueError(f"ffn_type must be 'mlp' or 'swiglu', got {ffn_type!r}")
    trunk_kwargs = dict(
        img_size=pretrain_size, patch_size=patch, embed_dim=dim, depth=_int(cfg, "depth"),
        num_heads=_int(cfg, "num_heads"), mlp_ratio=mlp_ratio, qkv_bias=_bool(cfg, "qkv_bias"),
        init_values=1.0 if _bool(cfg, "layer_scale") else None, class_token=_bool(cfg, "use_cls"),
        reg_tokens=0, no_embed_class=False,
    )
    if adapter.get("drop_path_rate"):
        trunk_kwargs["drop_path_rate"] = adapter["drop_path_rate"]
    freeze = as_bool(cfg.pop("freeze_vit", False), "DINOv2 adapter freeze_vit")
    if cfg:
        raise ValueError(f"unsupported DINOv2 adapter option(s): {sorted(cfg)}")
    return dict(trunk=base, trunk_kwargs=trunk_kwargs, freeze_trunk=freeze, **adapter)


def convert_state(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 adapter keys -> this model's: trunk keys get ``vit.``, layer scale and SwiGLU renamed."""
    out, swiglu = {}, {}
    trunk = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm_pre.")
    for key, value in state.items():
        if not key.startswith(trunk):
            out[key] = value
            continue
        key = key.replace(".gamma1", ".ls1.gamma").replace(".gamma2", ".ls2.gamma")
        if ".mlp.w" in key:
            swiglu[key] = value
            continue
        if key == "pos_embed" and model.vit.cls_token is None:
            value = value[:, 1:]  # the table keeps a cls row even when the cls token is not used
        out["vit." + key] = value
    for key in [k for k in swiglu if ".mlp.w1." in k]:
        block, kind = key.split(".mlp.w1.")
        out[f"vit.{block}.mlp.fc1.{kind}"] = torch.cat([swiglu[key], swiglu[f"{block}.mlp.w2.{kind}"]])
        out[f"vit.{block}.mlp.fc2.{kind}"] = swiglu[f"{block}.mlp.w3.{kind}"]
    return out

"""DINOv3's segmentation adapter (``DINOv3_Adapter`` over a ``DinoVisionTransformer``) -> ``ViTAdapter``.

The adapter is extractor-only over a frozen trunk: the ViT runs once, its outputs at the interaction
indexes go through its final norm, and cls/register tokens never reach the adapter. The ViT is
timm's DINOv3 ``Eva`` (RoPE, 4 register tokens, layer scale, LayerNorm eps 1e-5); timm's own checkpoint
filter maps its keys. The config is ``{"vit": DinoVisionTransformer kwargs, "adapter": DINOv3_Adapter
kwargs}``; the state dict holds the ViT under ``backbone.`` and the adapter at the top level.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.models.eva import checkpoint_filter_fn

_ADAPTER = ("conv_inplane", "n_points", "deform_num_heads", "drop_path_rate", "init_values", "with_cffn",
            "cffn_ratio", "deform_ratio", "add_vit_feature", "use_extra_extractor", "interaction_indexes")
# DINOv3_Adapter's class defaults
_ADAPTER_DEFAULTS = dict(interaction_indexes=[9, 19, 29, 39], conv_inplane=64, n_points=4, deform_num_heads=16,
                         drop_path_rate=0.3, init_values=0.0, deform_ratio=0.5)
# DinoVisionTransformer options that only matter in training (coordinate augmentation) or are dtype plumbing
_VIT_IGNORED = ("pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords",
                "pos_embed_rope_dtype", "drop_path_rate", "in_chans", "img_size", "mask_k_bias",
                "untie_global_and_local_cls_norm")
_VIT_DEFAULTS = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, qkv_bias=True,
                     layerscale_init=None, norm_layer="layernorm", ffn_layer="mlp", ffn_bias=True, proj_bias=True,
                     n_storage_tokens=0, pos_embed_rope_base=100.0, pos_embed_rope_min_period=None,
                     pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate",
                     untie_cls_and_patch_norms=False)


def adapter_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping) or set(config) - {"vit", "adapter"}:
        raise ValueError('a DINOv3 config is {"vit": DinoVisionTransformer kwargs, "adapter": DINOv3_Adapter kwargs}')
    vit = {**_VIT_DEFAULTS, **config.get("vit", {})}
    adapter = {**_ADAPTER_DEFAULTS, **config.get("adapter", {})}
    adapter.pop("pretrain_size", None)  # no absolute position table: RoPE
    adapter.pop("with_cp", None)
    kwargs = {k: adapter.pop(k) for k in _ADAPTER if k in adapter}
    if adapter:
        raise ValueError(f"unsupported DINOv3 adapter option(s): {sorted(adapter)}")
    for name in _VIT_IGNORED:
        vit.pop(name, None)
    for name, wanted in (("pos_embed_rope_normalize_coords", "separate"), ("norm_layer", ("layernorm", "layernormbf16")),
                         ("untie_cls_and_patch_norms", False), ("ffn_bias", True), ("proj_bias", True),
                         ("pos_embed_rope_min_period", None), ("pos_embed_rope_max_period", None)):
        value = vit.pop(name)
        if value not in (wanted if isinstance(wanted, tuple) else (wanted,)):
            raise ValueError(f"DINOv3 ViT option {name}={value!r} is not supported (supported: {wanted!r})")
    ffn = vit.pop("ffn_layer")
    if ffn not in ("mlp", "swiglu"):
        raise ValueError(f"DINOv3 ffn_layer {ffn!r} is not supported (supported: 'mlp', 'swiglu')")
    qkv_bias = bool(vit.pop("qkv_bias"))
    base = "vit_small_plus_patch16_dinov3" if ffn == "swiglu" else "vit_small_patch16_dinov3"
    base += "_qkvb" if qkv_bias else ""
    layer_scale = vit.pop("layerscale_init")
    trunk_kwargs = dict(
        patch_size=int(vit.pop("patch_size")), embed_dim=int(vit.pop("embed_dim")), depth=int(vit.pop("depth")),
        num_heads=int(vit.pop("num_heads")), mlp_ratio=float(vit.pop("ffn_ratio")), qkv_bias=qkv_bias,
        init_values=float(layer_scale) if layer_scale else None, num_reg_tokens=int(vit.pop("n_storage_tokens")),
        rope_temperature=float(vit.pop("pos_embed_rope_base")),
    )
    if vit:
        raise ValueError(f"unsupported DINOv3 ViT option(s): {sorted(vit)}")
    return dict(trunk=base, trunk_kwargs=trunk_kwargs, extractor_only=True, freeze_trunk=True, **kwargs)


def convert_state(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``backbone.*`` through timm's DINOv3 key map (under ``vit.``), the adapter keys as they are.

    timm recomputes the RoPE periods; released files store theirs (rounded to bf16), the ones the
    trunk was trained with, so they replace timm's (a buffer outside the state dict)."""
    trunk = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    for key, value in checkpoint_filter_fn(trunk, model.vit).items():
        out["vit." + key] = value
    periods = trunk.get("rope_embed.periods")
    rope = getattr(model.vit, "rope", None)
    if periods is not None and isinstance(getattr(rope, "periods", None), torch.Tensor):
        if periods.shape != rope.periods.shape:
            raise ValueError(f"rope_embed.periods: checkpoint {tuple(periods.shape)} vs model {tuple(rope.periods.shape)}")
        # timm keeps the periods out of the state dict, so they are set on the module directly
        with torch.no_grad():
            rope.periods.copy_(periods)
    return out

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

from .fields import as_bool, as_float, as_int

_ADAPTER = ("conv_inplane", "n_points", "deform_num_heads", "drop_path_rate", "init_values", "with_cffn",
            "cffn_ratio", "deform_ratio", "add_vit_feature", "use_extra_extractor", "interaction_indexes")
# DINOv3_Adapter's class defaults
_ADAPTER_DEFAULTS = dict(interaction_indexes=[9, 19, 29, 39], conv_inplane=64, n_points=4, deform_num_heads=16,
                         drop_path_rate=0.3, init_values=0.0, deform_ratio=0.5)
# DinoVisionTransformer options that cannot change the adapter's output
_VIT_IGNORED = (
    "img_size",  # the patch embedding's nominal size: RoPE has no position table, every grid runs alike
    # RoPE augmentations and stochastic depth act in training mode only; the frozen trunk runs in eval mode
    "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords", "drop_path_rate",
    # local_cls_norm: the authors apply it to local crops' cls and register tokens in training only
    "untie_global_and_local_cls_norm",
    # cls_norm normalises only the cls and register tokens, which the adapter drops (convert_state drops its weights)
    "untie_cls_and_patch_norms",
    # masks the key third of qkv.bias: convert_state applies the checkpoint's mask and requires that third
    # to be zero, as timm's DINOv3 attention has no key bias
    "mask_k_bias",
    "device",  # where the authors' module is built
)
# DinoVisionTransformer's defaults as the hub's builder (``_make_dinov3_vit``) passes them: the class's
# own, but RoPE in float32 as every hub ViT computes it
_VIT_DEFAULTS = dict(patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, qkv_bias=True,
                     layerscale_init=None, norm_layer="layernorm", ffn_layer="mlp", ffn_bias=True, proj_bias=True,
                     n_storage_tokens=0, pos_embed_rope_base=100.0, pos_embed_rope_min_period=None,
                     pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate",
                     pos_embed_rope_dtype="fp32")
# Values timm's DINOv3 ``Eva`` computes with, and why no other can be matched
_VIT_FIXED = {
    "in_chans": (3, "DINOv3_Adapter's spatial prior module takes RGB images"),
    "norm_layer": ("layernormbf16", "timm's DINOv3 trunk normalises with LayerNorm eps 1e-5 ('layernormbf16', as every "
                   "hub ViT); 'layernorm' (eps 1e-6) and 'rmsnorm' compute other numbers"),
    "pos_embed_rope_dtype": ("fp32", "timm's DINOv3 trunk computes RoPE in float32 (as every hub ViT); bf16 or fp16 "
                             "rounds the rotation"),
    "pos_embed_rope_normalize_coords": ("separate", "timm's DINOv3 RoPE normalises each axis by its own length"),
    "pos_embed_rope_min_period": (None, "timm's DINOv3 RoPE takes its periods from pos_embed_rope_base"),
    "pos_embed_rope_max_period": (None, "timm's DINOv3 RoPE takes its periods from pos_embed_rope_base"),
    "ffn_bias": (True, "timm's DINOv3 blocks have MLP biases"),
    "proj_bias": (True, "timm's DINOv3 blocks have attention output biases"),
}
# ffn_layer -> the multiple the authors round the SwiGLU hidden width up to (None: a GELU MLP)
FFN_ALIGN = {"mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def swiglu_hidden(dim: int, ffn_ratio: float, align_to: int) -> int:
    """The authors' SwiGLU width: the block's MLP width ``int(dim * ffn_ratio)``, two thirds of it
    truncated, rounded up to a multiple of ``align_to``."""
    width = int(int(dim * ffn_ratio) * 2 / 3)
    return width + (-width % align_to)


def adapter_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``ViTAdapter`` kwargs for ``{"vit": ..., "adapter": ...}``: every option of the hub's seven ViTs
    is mapped or, where it cannot change the output, ignored; anything else is refused by name."""
    if not isinstance(config, Mapping) or set(config) - {"vit", "adapter"}:
        raise ValueError('a DINOv3 config is {"vit": DinoVisionTransformer kwargs, "adapter": DINOv3_Adapter kwargs}')
    for part in ("vit", "adapter"):
        if not isinstance(config.get(part, {}), Mapping):
            raise ValueError(f"DINOv3 config {part!r} must be a dict of keyword arguments, got {config[part]!r}")
    vit = {**_VIT_DEFAULTS, **config.get("vit", {})}
    adapter = {**_ADAPTER_DEFAULTS, **config.get("adapter", {})}
    adapter.pop("pretrain_size", None)  # no absolute position table: RoPE
    adapter.pop("with_cp", None)
    kwargs = {k: adapter.pop(k) for k in _ADAPTER if k in adapter}
    if adapter:
        raise ValueError(f"unsupported DINOv3 adapter option(s): {sorted(adapter)}")
    for name in _VIT_IGNORED:
        vit.pop(name, None)
    for name, (wanted, why) in _VIT_FIXED.items():
        value = vit.pop(name)
        if value != wanted or isinstance(value, bool) != isinstance(wanted, bool):
            raise ValueError(f"DINOv3 ViT option {name}={value!r} is not supported (only {wanted!r}): {why}")
    ffn = vit.pop("ffn_layer")
    if not isinstance(ffn, str) or ffn not in FFN_ALIGN:
        raise ValueError(f"DINOv3 ffn_layer {ffn!r} is not supported (supported: {', '.join(map(repr, FFN_ALIGN))})")
    qkv_bias = as_bool(vit.pop("qkv_bias"), "DINOv3 vit.qkv_bias")
    dim = as_int(vit.pop("embed_dim"), "DINOv3 vit.embed_dim", low=1)
    ffn_ratio = as_float(vit.pop("ffn_ratio"), "DINOv3 vit.ffn_ratio")
    layer_scale = vit.pop("layerscale_init")
    if layer_scale is not None:
        layer_scale = as_float(layer_scale, "DINOv3 vit.layerscale_init") or None  # 0 turns LayerScale off, as None
    trunk_kwargs = dict(
        patch_size=as_int(vit.pop("patch_size"), "DINOv3 vit.patch_size"), embed_dim=dim,
        depth=as_int(vit.pop("depth"), "DINOv3 vit.depth"), num_heads=as_int(vit.pop("num_heads"), "DINOv3 vit.num_heads"),
        mlp_ratio=ffn_ratio, qkv_bias=qkv_bias, init_values=layer_scale,
        num_reg_tokens=as_int(vit.pop("n_storage_tokens"), "DINOv3 vit.n_storage_tokens", low=0),
        rope_temperature=as_float(vit.pop("pos_embed_rope_base"), "DINOv3 vit.pos_embed_rope_base"),
    )
    if vit:
        raise ValueError(f"unsupported DINOv3 ViT option(s): {sorted(vit)}")
    align = FFN_ALIGN[ffn]
    if align is None:
        base = "vit_small_patch16_dinov3"
    else:
        # timm sizes its SwiGLU as int(dim * mlp_ratio) rounded up to swiglu_align_to: the authors'
        # width over dim gives the same width (already a multiple of align, any float error rounds back)
        base = "vit_small_plus_patch16_dinov3"
        trunk_kwargs["mlp_ratio"] = swiglu_hidden(dim, ffn_ratio, align) / dim
        trunk_kwargs["swiglu_align_to"] = align
    return dict(trunk=base + ("_qkvb" if qkv_bias else ""), trunk_kwargs=trunk_kwargs, extractor_only=True,
                freeze_trunk=True, **kwargs)


def convert_state(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``backbone.*`` through timm's DINOv3 key map (under ``vit.``), the adapter keys as they are.

    timm recomputes the RoPE periods; released files store theirs (rounded to bf16), the ones the
    trunk was trained with, so they replace timm's (a buffer outside the state dict)."""
    trunk = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    trunk = {k: v for k, v in trunk.items() if not k.startswith("cls_norm.")}  # cls/register tokens only
    _fold_key_bias_masks(trunk)
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


def _fold_key_bias_masks(trunk: dict[str, torch.Tensor]) -> None:
    """``qkv.bias`` times its ``bias_mask`` (``mask_k_bias=True``) as the authors compute it; timm's
    attention has q and v biases only, so the key third must come out zero (the masked case)."""
    for key in [k for k in trunk if k.endswith(".qkv.bias")]:
        bias, mask = trunk[key], trunk.pop(key[: -len("bias")] + "bias_mask", None)
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] % 3:
            continue  # left to the shape checks, which name the key
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != bias.shape:
                raise ValueError(f"backbone.{key[:-len('bias')]}bias_mask must be a tensor shaped like its bias {tuple(bias.shape)}")
            bias = bias * mask.to(bias.dtype)
            trunk[key] = bias
        if bias.is_floating_point() and bias.chunk(3)[1].any():
            raise ValueError(
                f"backbone.{key}: the key third of the bias is nonzero; timm's DINOv3 attention has no key bias "
                "(the authors' hub ViTs zero it with mask_k_bias=True and a bias_mask)"
            )

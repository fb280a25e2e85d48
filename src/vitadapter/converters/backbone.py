"""Upstream's backbone configs and every checkpoint layout a ViT-Adapter loads -> vitadapter's.

Upstream ViT-Adapter's mm-style ``model.backbone`` dicts (``ViTAdapter``, ``BEiTAdapter``,
``UniPerceiverAdapter``, segmentation and detection codebases) become ``ViTAdapter`` keyword
arguments (``upstream_kwargs``); checkpoints in upstream's layout, vitadapter's own or a timm trunk's
become a ViTAdapter state dict (``convert_checkpoint``). Dicts in, dicts out: the caller builds and
loads the model.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import torch
from timm.models import adapt_input_conv
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_filter
from torch import nn

from ..trunks import trunk_state_from_timm
from ..trunks.beit import beit_state_for
from ..weights.read import as_dict, unwrap
from . import uniperceiver

CODEBASES = ("segmentation", "detection", "dinov2", "dinov3")

# upstream ViTAdapter / TIMMVisionTransformer kwargs that map one-to-one onto ViTAdapter's
_SAME_NAME = (
    "pretrain_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "layer_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "conv_inplane", "n_points",
    "deform_num_heads", "deform_ratio", "init_values", "interaction_indexes", "with_cffn", "cffn_ratio",
    "add_vit_feature", "use_extra_extractor",
)
_TYPES = ("ViTAdapter", "BEiTAdapter", "UniPerceiverAdapter")
# accepted and without effect on the computed function (weights come from ``checkpoint``;
# ``_delete_`` is an mm-config merge directive, present when a config file's dict is pasted as is)
_IGNORED = ("pretrained", "num_classes", "with_cp", "_delete_")


def upstream_kwargs(backbone_cfg: Mapping[str, Any], codebase: str) -> dict[str, Any]:
    """Translate an upstream backbone config (``ViTAdapter``, ``BEiTAdapter`` or ``UniPerceiverAdapter``)
    into ``ViTAdapter`` kwargs."""
    if codebase not in CODEBASES:
        raise ValueError(f"codebase must be one of {CODEBASES}, got {codebase!r}")
    cfg = dict(backbone_cfg)
    kind = cfg.pop("type", "ViTAdapter")
    if kind not in _TYPES:
        raise ValueError(f"backbone type {kind!r} is not supported (supported: {', '.join(map(repr, _TYPES))})")
    for name in _IGNORED:
        cfg.pop(name, None)
    if kind == "BEiTAdapter":
        kwargs = _beit_kwargs(cfg, codebase)
    elif kind == "UniPerceiverAdapter":
        kwargs = uniperceiver.adapter_kwargs(cfg, codebase, _windows(cfg, cfg.get("depth", 12)))
    else:
        kwargs = _vit_kwargs(cfg)
        kwargs["vit_feature_source"] = "interactions" if codebase == "segmentation" else "final"
    if cfg:
        raise ValueError(f"unsupported upstream {kind} option(s): {sorted(cfg)}")
    return kwargs


def _vit_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Upstream's ``ViTAdapter`` options (consumed from ``cfg``)."""
    kwargs = {name: cfg.pop(name) for name in _SAME_NAME if name in cfg}
    img_size = cfg.pop("img_size", None)
    pretrain_size = kwargs.setdefault("pretrain_size", 224)
    if img_size is not None and _as_int_size(img_size) != pretrain_size:
        raise ValueError(
            f"img_size {img_size} differs from pretrain_size {pretrain_size}: upstream reshapes the "
            "position embedding to pretrain_size/16, so such a config cannot run upstream either"
        )
    if cfg.pop("residual_indices", None):
        raise ValueError("residual_indices (ViTDet-style residual blocks) are not supported")
    windows = _windows(cfg, kwargs.get("depth", 12))
    if windows:
        kwargs["window_size"] = windows
    # upstream's class defaults where they differ from ViTAdapter's
    kwargs.setdefault("num_heads", 12)
    kwargs.setdefault("layer_scale", True)
    kwargs.setdefault("deform_num_heads", 6)
    return kwargs


# upstream BEiT trunk options -> timm ``Beit`` keyword arguments
_BEIT_TRUNK = {
    "img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim",
    "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
    "attn_drop_rate": "attn_drop_rate", "drop_path_rate": "drop_path_rate", "use_abs_pos_emb": "use_abs_pos_emb",
    "use_rel_pos_bias": "use_rel_pos_bias", "use_shared_rel_pos_bias": "use_shared_rel_pos_bias",
}
# upstream BEiTAdapter adapter options that keep their names
_BEIT_ADAPTER = ("conv_inplane", "n_points", "deform_num_heads", "deform_ratio", "with_cffn", "cffn_ratio",
                 "interaction_indexes", "add_vit_feature")
# upstream BEiT's class defaults (its configs override most of them)
_BEIT_DEFAULTS = dict(img_size=512, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                      mlp_ratio=4.0, qkv_bias=False, use_abs_pos_emb=False, use_rel_pos_bias=True)


def _beit_kwargs(cfg: dict[str, Any], codebase: str) -> dict[str, Any]:
    """Upstream's ``BEiTAdapter`` (consumed from ``cfg``): a timm ``Beit`` trunk with upstream's shape.

    The segmentation BEiT carries its cls token through every block group; the detection BEiT has
    none and attends within windows (the Beit driver turns the trunk into that layout).
    """
    trunk = dict(_BEIT_DEFAULTS)
    trunk.update({_BEIT_TRUNK[k]: cfg.pop(k) for k in list(cfg) if k in _BEIT_TRUNK})
    trunk["img_size"] = _as_int_size(trunk["img_size"])
    adapter = {k: cfg.pop(k) for k in _BEIT_ADAPTER if k in cfg}
    drop_rate = cfg.pop("drop_rate", 0.0)
    trunk.update(pos_drop_rate=drop_rate, proj_drop_rate=drop_rate)
    if cfg.pop("qk_scale", None) is not None:
        raise ValueError("qk_scale is not supported: BEiT scales attention by head_dim ** -0.5")
    init_values = cfg.pop("init_values", 0.0)
    if not init_values:
        raise ValueError(
            f"init_values {init_values!r}: BEiTAdapter needs a positive layer-scale init (its configs use 1e-6); "
            "0 would zero every block's residual branch"
        )
    pretrain_size = cfg.pop("pretrain_size", 224)
    if trunk["use_abs_pos_emb"] and (codebase == "segmentation" or _as_int_size(pretrain_size) != trunk["img_size"]):
        raise ValueError(
            "use_abs_pos_emb: upstream's BEiTAdapter reshapes the position table to pretrain_size/16 "
            "without its cls row, which only works in the detection codebase with pretrain_size == img_size"
        )
    version = cfg.pop("version", "new")
    if codebase == "segmentation":
        source = "interactions"
    elif version in ("new", "old"):
        source = "final" if version == "new" else "interactions"
    else:
        raise ValueError(f"version must be 'new' or 'old', got {version!r}")
    kwargs = dict(
        trunk="beit_base_patch16_224",
        trunk_kwargs=dict(trunk, init_values=float(init_values)),
        drop_path_rate=trunk.get("drop_path_rate", 0.0),
        init_values=float(init_values),
        **{"deform_num_heads": 6, "deform_ratio": 1.0, **adapter},
        vit_feature_source=source,
    )
    windows = _windows(cfg, trunk["depth"])
    if codebase == "detection" and not windows:
        raise ValueError("a detection BEiTAdapter without window_attn is not supported (upstream's detection BEiTs use windows)")
    if codebase == "segmentation" and windows:
        raise ValueError("window_attn: upstream's segmentation BEiT has no windowed attention")
    if windows:
        kwargs["window_size"] = windows
    return kwargs


def _windows(cfg: dict[str, Any], depth: int) -> Optional[list[Optional[int]]]:
    """Per-block windows from upstream's ``window_attn``/``window_size`` (``None``: none asked)."""
    window_attn = _per_block(cfg.pop("window_attn", False), depth, "window_attn")
    window_size = _per_block(cfg.pop("window_size", 14), depth, "window_size")
    if not all(isinstance(on, bool) for on in window_attn):
        raise ValueError(f"window_attn must be true/false, or a list of them per block, got {window_attn!r}")
    if not any(window_attn):
        return None
    return [s if on else None for on, s in zip(window_attn, window_size)]  # sizes checked with the rest



class Conversion(NamedTuple):
    """A checkpoint turned into a model's state dict, and what happened to its keys."""

    state: dict[str, torch.Tensor]  # every key of the model
    dropped: list[str]  # checkpoint keys left out: task heads, classifier parts
    initialised: list[str]  # model keys the checkpoint lacks, kept at their fresh (upstream) init


# the convolutions that read the image: the trunk's patch embedding and the spatial prior's stem
INPUT_CONVS = ("vit.patch_embed.proj.weight", "spm.stem.0.weight")


def adapt_input_convs(model: nn.Module, state: dict[str, Any]) -> None:
    """RGB weights for a model of another channel count: both input convolutions adapted as timm
    adapts its models' ``first_conv`` (1 channel: the sum; more: RGB repeated and rescaled)."""
    own = model.state_dict()
    for key in INPUT_CONVS:
        weight, expected = state.get(key), own.get(key)
        if not isinstance(weight, torch.Tensor) or expected is None or weight.dim() != 4 or not weight.is_floating_point():
            continue
        if weight.shape[1] == 3 and expected.shape[1] != 3 and weight.shape[0] == expected.shape[0]:
            state[key] = adapt_input_conv(expected.shape[1], weight)



def convert_checkpoint(checkpoint: Mapping[str, Any], model: nn.Module) -> Conversion:
    """Any supported checkpoint layout -> a full state dict for ``model``.

    Layouts: vitadapter's own (``vit.*`` keys, as in ``model.safetensors``), upstream's (mm-style,
    ``backbone.`` prefix, heads; Uni-Perceiver's BERT names, whole backbones or upstream's converted
    encoder files) and a timm checkpoint of the trunk's family (the trunk only: the adapter keeps its
    fresh upstream initialisation).
    """
    state, dropped = unwrap(as_dict(checkpoint, "this checkpoint"))
    beit_state = any(".relative_position_bias_table" in k or k.endswith((".q_bias", ".v_bias")) for k in state)
    if beit_state and not isinstance(model.vit, Beit):
        raise ValueError(
            f"this is a BEiT checkpoint (relative position bias tables, q/v biases) and the model's trunk is "
            f"a {type(model.vit).__name__}: use a BEiT architecture"
        )
    if any(k.startswith("vit.") for k in state):
        return Conversion(dict(state), dropped, [])
    if uniperceiver.is_uniperceiver_state(state):
        return _uniperceiver_conversion(state, dropped, model)
    if any(k.startswith(("spm.", "level_embed", "interactions.")) for k in state):
        convert = _upstream_beit_keys if beit_state else _upstream_keys
        return Conversion(convert(state), dropped, [])
    if "patch_embed.proj.weight" in state:
        if isinstance(model.vit, Beit):
            state, gone = beit_state_for(dict(state), model.vit)
            dropped = dropped + gone
        elif isinstance(model.vit, Eva):
            state = eva_filter(state, model.vit)  # maps DINOv3/EVA release names onto timm's module
        trunk, classifier = trunk_state_from_timm(state, model.vit)
        full = {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")}
        initialised = sorted(full)
        full.update({"vit." + k: v for k, v in trunk.items()})
        return Conversion(full, dropped + classifier, initialised)
    shown = ", ".join(list(state)[:5]) or "none"
    raise ValueError(f"not a ViT-Adapter, vitadapter or timm ViT checkpoint (no patch embedding or adapter: {shown})")


def _uniperceiver_conversion(state: Mapping[str, torch.Tensor], dropped: list[str], model: nn.Module) -> Conversion:
    """An upstream Uni-Perceiver adapter backbone, or the encoder alone (then the adapter keeps its
    fresh upstream initialisation)."""
    if not isinstance(getattr(model.vit, "norm_pre", None), torch.nn.LayerNorm) or model.vit.cls_token is not None:
        raise ValueError(
            f"this is a Uni-Perceiver checkpoint and the model's trunk is a {type(model.vit).__name__} of another "
            "kind: use a uniperceiver_adapter_* architecture"
        )
    converted, gone = uniperceiver.convert_state(state)
    if any(not k.startswith("vit.") for k in converted):
        return Conversion(converted, dropped + gone, [])
    full = {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")}
    initialised = sorted(full)
    full.update(converted)
    return Conversion(full, dropped + gone, initialised)



def _upstream_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream backbone keys -> this model's keys (layer scale ``gamma1/2`` is timm's ``ls1/2.gamma``)."""
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            value = _drop_cls_slot(value)
        if key.startswith(("pos_embed", "patch_embed.", "blocks.")):
            key = "vit." + key.replace(".gamma1", ".ls1.gamma").replace(".gamma2", ".ls2.gamma")
        out[key] = value
    return out


def _upstream_beit_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream BEiTAdapter keys -> this model's: the trunk's names are timm ``Beit``'s already.
    ``relative_position_index`` is derived (and missing from released files), so it is dropped."""
    trunk = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "rel_pos_bias.")
    return {
        ("vit." + k if k.startswith(trunk) else k): v
        for k, v in state.items()
        if not k.endswith("relative_position_index")
    }


def _drop_cls_slot(pos_embed: torch.Tensor) -> torch.Tensor:
    """Upstream's grid is square and follows one cls slot, which its ViT never uses."""
    cells = pos_embed.shape[1] - 1 if pos_embed.dim() == 3 else -1
    if cells > 0 and math.isqrt(cells) ** 2 == cells:
        return pos_embed[:, 1:]
    return pos_embed


def _per_block(value: Any, depth: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} lists {len(values)} entries for a depth-{depth} ViT")
    return values


def _as_int_size(size: Any) -> int:
    if isinstance(size, (list, tuple)) and len(size) == 2:
        if size[0] != size[1]:
            raise ValueError(f"non-square img_size {size} is not supported")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"img_size must be an integer or [height, width], got {size!r}")
    return size

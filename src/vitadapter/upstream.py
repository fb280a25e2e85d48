"""Upstream ViT-Adapter configs and checkpoints -> vitadapter models.

The only module that knows upstream's names: the mm-style ``model.backbone`` dicts of the
segmentation and detection codebases and the checkpoint key layout (SPEC §4, §7).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping, Optional, Union

import torch

from .models.vit_adapter import ViTAdapter

CODEBASES = ("segmentation", "detection")

# upstream ViTAdapter / TIMMVisionTransformer kwargs that map one-to-one onto ViTAdapter's
_SAME_NAME = (
    "pretrain_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "layer_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "conv_inplane", "n_points",
    "deform_num_heads", "deform_ratio", "init_values", "interaction_indexes", "with_cffn", "cffn_ratio",
    "add_vit_feature", "use_extra_extractor",
)
# accepted and without effect on the computed function (weights come from ``checkpoint``)
_IGNORED = ("pretrained", "num_classes", "with_cp")


def load_upstream(
    backbone_cfg: Mapping[str, Any],
    codebase: str,
    checkpoint: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
) -> ViTAdapter:
    """Build the exact equivalent of an upstream config's ``model.backbone`` and load its weights.

    ``codebase`` is "segmentation" (pyramid levels get each interaction's ViT output) or "detection"
    (all levels get the final ViT output). ``checkpoint`` is a path or an already loaded dict in
    upstream's layout (``state_dict``/``model`` wrapper, ``backbone.`` and ``module.`` prefixes,
    head keys are dropped). ``with_cp`` turns on activation checkpointing as upstream does.
    """
    model = ViTAdapter(**upstream_kwargs(backbone_cfg, codebase))
    if backbone_cfg.get("with_cp"):
        model.set_grad_checkpointing(True)
    if checkpoint is not None:
        load_upstream_checkpoint(model, checkpoint)
    return model


def upstream_kwargs(backbone_cfg: Mapping[str, Any], codebase: str) -> dict[str, Any]:
    """Translate an upstream backbone config into ``ViTAdapter`` keyword arguments."""
    if codebase not in CODEBASES:
        raise ValueError(f"codebase must be one of {CODEBASES}, got {codebase!r}")
    cfg = dict(backbone_cfg)
    kind = cfg.pop("type", "ViTAdapter")
    if kind != "ViTAdapter":
        raise ValueError(f"backbone type {kind!r} is not supported yet (supported: 'ViTAdapter')")
    kwargs = {name: cfg.pop(name) for name in _SAME_NAME if name in cfg}
    for name in _IGNORED:
        cfg.pop(name, None)

    img_size = cfg.pop("img_size", None)
    pretrain_size = kwargs.setdefault("pretrain_size", 224)
    if img_size is not None and _as_int_size(img_size) != pretrain_size:
        raise ValueError(
            f"img_size {img_size} differs from pretrain_size {pretrain_size}: upstream reshapes the "
            "position embedding to pretrain_size/16, so such a config cannot run upstream either"
        )
    if cfg.pop("residual_indices", None):
        raise ValueError("residual_indices (ViTDet-style residual blocks) are not supported")

    depth = kwargs.get("depth", 12)
    window_attn = cfg.pop("window_attn", False)
    window_size = cfg.pop("window_size", 14)
    window_attn = _per_block(window_attn, depth, "window_attn")
    window_size = _per_block(window_size, depth, "window_size")
    if any(window_attn):
        kwargs["window_size"] = [int(s) if on else None for on, s in zip(window_attn, window_size)]

    if cfg:
        raise ValueError(f"unsupported upstream backbone option(s): {sorted(cfg)}")
    # upstream's class defaults where they differ from ViTAdapter's
    kwargs.setdefault("num_heads", 12)
    kwargs.setdefault("layer_scale", True)
    kwargs.setdefault("deform_num_heads", 6)
    kwargs["vit_feature_source"] = "interactions" if codebase == "segmentation" else "final"
    return kwargs


def load_upstream_checkpoint(model: ViTAdapter, checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> None:
    """Load an upstream-layout checkpoint (path or dict) into ``model``, strictly."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state = convert_state_dict(checkpoint, model)
    check_state_dict(model, state)
    model.load_state_dict(state)


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """Read a ``torch.save`` checkpoint without executing code from it (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"could not read checkpoint {path}: it is truncated, corrupt or not a torch file ({e})") from e


def convert_state_dict(checkpoint: Mapping[str, Any], model: ViTAdapter) -> dict[str, torch.Tensor]:
    """Upstream backbone keys -> this model's keys (SPEC §4, §7)."""
    state = checkpoint
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}

    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is not a tensor ({type(value).__name__})")
        if key == "pos_embed":
            value = _drop_cls_slot(value, model)
        if key.startswith(("pos_embed", "patch_embed.", "blocks.")):
            key = "vit." + key.replace(".gamma1", ".ls1.gamma").replace(".gamma2", ".ls2.gamma")
        out[key] = value
    return out


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise ValueError("checkpoint does not fit the model; " + "; ".join(problems))


def _drop_cls_slot(pos_embed: torch.Tensor, model: ViTAdapter) -> torch.Tensor:
    gh, gw = model.vit.patch_embed.grid_size
    if pos_embed.dim() == 3 and pos_embed.shape[1] == gh * gw + 1:
        return pos_embed[:, 1:]
    return pos_embed


def _per_block(value: Any, depth: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} lists {len(values)} entries for a depth-{depth} ViT")
    return values


def _as_int_size(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square img_size {size} is not supported")
        size = size[0]
    return int(size)

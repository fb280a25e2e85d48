"""Upstream's ``UniPerceiverAdapter`` (both codebases) -> ``ViTAdapter`` on timm's Uni-Perceiver encoder.

The config: ``UnifiedBertEncoder``'s options (the trunk: ``vit_*_patch16_uniperceiver``) and the
adapter's, whose injector/extractor norms are torch's default LayerNorm (eps 1e-5). The keys: BERT
names (``layers.{i}.self_attn.in_proj``, ``linear1``, ``gamma_1``, ...) -> timm's, and the position
tables (``nn.Embedding``s) -> ``pos_embed``. Upstream's converted Uni-Perceiver release files also
hold parts of Uni-Perceiver's text and prompt side, which the adapter never runs: they are dropped by
name (``DROPPED``); any other key is refused.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from ..trunks.uniperceiver import vit_base_patch16_uniperceiver, vit_large_patch16_uniperceiver

# UnifiedBertEncoder's options, as the trunk takes them
_TRUNK = ("img_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
# UniPerceiverAdapter's options that keep their names
_ADAPTER = ("conv_inplane", "n_points", "deform_num_heads", "init_values", "with_cffn", "cffn_ratio", "deform_ratio",
            "add_vit_feature", "drop_path_rate")
# the two classes' defaults (upstream's configs override most)
_DEFAULTS = dict(img_size=224, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, deform_num_heads=6,
                 deform_ratio=1.0, init_values=0.0)
# the registered encoders, by (embed_dim, depth, num_heads): a config of one of their sizes names it
_SIZES = {
    (768, 12, 12): vit_base_patch16_uniperceiver.__name__,
    (1024, 24, 16): vit_large_patch16_uniperceiver.__name__,
}
# torch's LayerNorm default, which upstream's Uni-Perceiver adapter builds its norms with
NORM_EPS = 1e-5

# Checkpoint keys outside the visual encoder, dropped by name. The first is the data-type embedding of
# Uni-Perceiver's visual tokenizer, which upstream's port leaves out of its forward; the others are
# Uni-Perceiver's text tokenizer, prompts, loss and classification parts (upstream's own key
# converter removes the first two kinds; a file converted otherwise may keep them).
DROPPED = (
    "visual_embed.embeddings_type.weight",
    "token_embed.",
    "loss_prepare.",
    "prompt_embed.",
    "fc_prompt.",
    "s_token_bias",
    "similarity_weight",
    "cls_token.weight",
)
_SPATIAL = "visual_embed.patch_embed.spatial_pos_embed.weight"
_TEMPORAL = "visual_embed.patch_embed.temporal_pos_embed.weight"
# upstream name -> this package's, for the encoder's other parameters
_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.gamma_([12])$"), r"vit.blocks.\1.ls\2.gamma"),
    (re.compile(r"^layers\.(\d+)\.self_attn\.in_proj\.(weight|bias)$"), r"vit.blocks.\1.attn.qkv.\2"),
    (re.compile(r"^layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$"), r"vit.blocks.\1.attn.proj.\2"),
    (re.compile(r"^layers\.(\d+)\.linear([12])\.(weight|bias)$"), r"vit.blocks.\1.mlp.fc\2.\3"),
    (re.compile(r"^layers\.(\d+)\.(norm[12])\.(weight|bias)$"), r"vit.blocks.\1.\2.\3"),
    (re.compile(r"^visual_embed\.embeddings_norm\.(weight|bias)$"), r"vit.norm_pre.\1"),
    (re.compile(r"^visual_embed\.patch_embed\.proj\.(weight|bias)$"), r"vit.patch_embed.proj.\1"),
)
# the adapter's own keys, named as here
_ADAPTER_KEYS = re.compile(r"^(level_embed|spm\.|interactions\.|up\.|norm[1-4]\.)")


def is_uniperceiver_state(state: Mapping[str, Any]) -> bool:
    """Whether a checkpoint (``backbone.`` and wrappers removed) is in upstream's Uni-Perceiver layout."""
    return any(k.startswith(("visual_embed.", "layers.")) for k in state)


def adapter_kwargs(cfg: dict[str, Any], codebase: str, window_size: Optional[list[Optional[int]]]) -> dict[str, Any]:
    """``ViTAdapter`` kwargs of an upstream ``UniPerceiverAdapter`` config (its options consumed from
    ``cfg``, whatever is left there is not supported; ``window_size``: the per-block windows its
    ``window_attn``/``window_size`` ask for)."""
    for name, value in _DEFAULTS.items():
        cfg.setdefault(name, value)
    patch_size = cfg.pop("patch_size", 16)
    if patch_size != 16:
        raise ValueError(f"patch_size {patch_size!r}: upstream's Uni-Perceiver computes its token grid as size // 16, so only 16 runs there")
    # the position table's grid is img_size's; the adapter's pretrain_size is stored by upstream and never read
    cfg.pop("pretrain_size", None)
    img_size = cfg["img_size"]
    if isinstance(img_size, (list, tuple)) or isinstance(img_size, bool) or not isinstance(img_size, int):
        raise ValueError(f"img_size must be an integer (upstream's position table is square), got {img_size!r}")
    trunk_kwargs = {k: cfg.pop(k) for k in _TRUNK}
    trunk_kwargs["mlp_ratio"] = float(trunk_kwargs["mlp_ratio"])
    adapter = {k: cfg.pop(k) for k in _ADAPTER if k in cfg}
    indexes = cfg.pop("interaction_indexes", None)
    if indexes is None:
        raise ValueError("interaction_indexes is required: upstream's UniPerceiverAdapter has no default for it")
    for name in ("norm_layer", "embed_layer"):
        if name in cfg:
            raise ValueError(f"{name}: upstream's Uni-Perceiver takes a class here; only its default is supported")
    in_chans = trunk_kwargs.pop("in_chans")
    size = (trunk_kwargs["embed_dim"], trunk_kwargs["depth"], trunk_kwargs["num_heads"])
    trunk = _SIZES.get(size, _SIZES[(768, 12, 12)])
    if size in _SIZES:  # the registered encoder's own shape: config.json then names just it
        for name in ("embed_dim", "depth", "num_heads"):
            del trunk_kwargs[name]
        if trunk_kwargs["mlp_ratio"] == 4.0:
            del trunk_kwargs["mlp_ratio"]
    return dict(
        trunk=trunk,
        trunk_kwargs=trunk_kwargs,
        in_chans=in_chans,
        interaction_indexes=indexes,
        adapter_norm_eps=NORM_EPS,
        vit_feature_source="interactions" if codebase == "segmentation" else "final",
        window_size=window_size,
        **adapter,
    )


def convert_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Upstream Uni-Perceiver keys (an adapter backbone, or the encoder alone) -> this package's, and
    the keys dropped (``DROPPED``, and the temporal position rows past the first, which a single
    image never uses). A key that is neither raises a ``ValueError`` naming it."""
    out, dropped, unknown = {}, [], []
    for key, value in state.items():
        if key in (_SPATIAL, _TEMPORAL):
            continue
        if key.startswith(DROPPED):
            dropped.append(key)
        elif _ADAPTER_KEYS.match(key):
            out[key] = value
        else:
            for pattern, name in _RENAMES:
                if pattern.match(key):
                    out[pattern.sub(name, key)] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"unknown key(s) in this Uni-Perceiver checkpoint: {shown}")
    if (_SPATIAL in state) != (_TEMPORAL in state):
        missing = _TEMPORAL if _SPATIAL in state else _SPATIAL
        raise ValueError(f"this Uni-Perceiver checkpoint lacks {missing}: the position rows need both tables")
    if _SPATIAL in state:
        spatial, temporal = state[_SPATIAL], state[_TEMPORAL]
        if spatial.dim() != 2 or temporal.dim() != 2 or temporal.shape[0] < 1 or spatial.shape[1] != temporal.shape[1]:
            raise ValueError(
                f"{_SPATIAL} {tuple(spatial.shape)} and {_TEMPORAL} {tuple(temporal.shape)} must be "
                "(cells, width) and (frames, width) tables"
            )
        # a single image is frame 0: its temporal row is added to every spatial row
        out["vit.pos_embed"] = (spatial + temporal[0]).unsqueeze(0)
        if temporal.shape[0] > 1:
            dropped.append(f"{_TEMPORAL}[1:]")
    return out, dropped

"""Drive a timm ``VisionTransformer`` (DeiT, AugReg, DINOv2, ...) block by block for the adapter.

The ViT stays the model timm builds; this file only knows how to build upstream's ViT, map timm
ImageNet checkpoints onto it, and run a range of blocks with upstream's windowed attention.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping, Optional, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..layers.window_attn import windowed_attention
from .base import Grid, TrunkDriver
from .uniperceiver import UniPerceiverEncoder


def create_vit(
    *,
    pretrain_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    layer_scale: bool,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path_rate: float,
) -> VisionTransformer:
    """A timm ViT shaped like upstream's: no cls token, no final norm or head, LayerNorm eps 1e-6."""
    return VisionTransformer(
        img_size=pretrain_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        init_values=1.0 if layer_scale else None,
        class_token=False,
        final_norm=False,
        dynamic_img_size=True,
        pos_drop_rate=drop_rate,
        proj_drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


# Parts of a timm ImageNet ViT that upstream's adapter never uses: prefix tokens, final norms, heads.
_CLASSIFIER_PARTS = ("cls_token", "dist_token", "reg_token", "norm.", "fc_norm.", "head.", "head_dist.")


def trunk_state_from_timm(
    state: Mapping[str, torch.Tensor], vit: VisionTransformer
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm ImageNet ViT checkpoint -> this trunk's state dict, and the keys it dropped.

    The prefix slots of ``pos_embed`` go and its grid keeps the pretrain size (it is resized at run time). DeiT and
    AugReg checkpoints have no layer scale: the gammas keep their 1.0 init, as in upstream. Keys that
    are neither the ViT's nor known classifier parts are kept, so a mismatch is reported, not hidden.
    """
    expected = vit.state_dict()
    grid = vit.patch_embed.grid_size[0] * vit.patch_embed.grid_size[1]
    prefix = sum(state[k].shape[1] for k in ("cls_token", "dist_token", "reg_token") if k in state)
    own = expected.get("pos_embed")
    kept, dropped = {}, []
    for key, value in state.items():
        # a trunk without prefix tokens (upstream's) drops their position slots; one with them keeps them
        if key == "pos_embed" and own is not None and own.shape[1] == grid and value.dim() == 3 and value.shape[1] == prefix + grid:
            value = value[:, prefix:]
        if key not in expected and key.startswith(_CLASSIFIER_PARTS):
            dropped.append(key)
        else:
            kept[key] = value
    for key, value in expected.items():
        if key.endswith((".ls1.gamma", ".ls2.gamma")):
            kept.setdefault(key, value)
    return kept, dropped


class VisionTransformerTrunk(TrunkDriver):
    """timm ``VisionTransformer``: DeiT, AugReg, DeiT3, DINOv2 (patch 14, registers), upstream's ViT.

    ``window_sizes[i]`` gives block i upstream's windowed attention (``None``: global). Windows
    need a trunk without prefix tokens, as upstream's detection ViTs are. Uni-Perceiver's encoder pads
    its windows' tokens rather than their q/k/v (``layers.window_attn``).
    """

    family = "VisionTransformer"

    def __init__(self, model: VisionTransformer, window_sizes: Optional[Sequence[Optional[int]]] = None):
        super().__init__(model, window_sizes)
        if any(w is not None for w in self.window_sizes) and self.prefix_tokens:
            raise ValueError(
                "windowed attention needs a trunk without cls/register tokens (upstream's detection "
                "ViTs have none): build the timm model with class_token=False, reg_tokens=0"
            )
        self.pad_tokens = isinstance(model, UniPerceiverEncoder)

    def _block(self, index: int, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        block, window = self.model.blocks[index], self.window_sizes[index]
        if window is None:
            return block(x)
        return _windowed_block(block, x, grid, window, self.pad_tokens)


def _windowed_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], window: int, pad_tokens: bool) -> torch.Tensor:
    """A timm ``Block`` forward with its attention restricted to windows."""
    x = x + block.drop_path1(block.ls1(windowed_attention(block.attn, block.norm1(x), grid, window, pad_tokens)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

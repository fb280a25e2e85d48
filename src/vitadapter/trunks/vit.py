"""Drive a timm ``VisionTransformer`` (DeiT, AugReg, ...) block by block for the adapter.

The ViT stays the model timm builds; this file only knows how to embed an image the way upstream
does and how to run a range of its blocks, with upstream's windowed attention where asked.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.window_attn import windowed_attention


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

    The prefix slots of ``pos_embed`` go and its grid keeps the pretrain size (SPEC §1.3). DeiT and
    AugReg checkpoints have no layer scale: the gammas keep their 1.0 init, as in upstream. Keys that
    are neither the ViT's nor known classifier parts are kept, so a mismatch is reported, not hidden.
    """
    expected = vit.state_dict()
    grid = vit.patch_embed.grid_size[0] * vit.patch_embed.grid_size[1]
    prefix = sum(state[k].shape[1] for k in ("cls_token", "dist_token", "reg_token") if k in state)
    kept, dropped = {}, []
    for key, value in state.items():
        if key == "pos_embed" and value.dim() == 3 and value.shape[1] == prefix + grid:
            value = value[:, prefix:]
        if key not in expected and key.startswith(_CLASSIFIER_PARTS):
            dropped.append(key)
        else:
            kept[key] = value
    for key, value in expected.items():
        if key.endswith((".ls1.gamma", ".ls2.gamma")):
            kept.setdefault(key, value)
    return kept, dropped


class VisionTransformerTrunk:
    """Embedding and block-range execution for a timm ``VisionTransformer``.

    Holds no parameters of its own: ``vit`` is owned (and registered) by the adapter model.
    ``window_sizes[i]`` is the attention window of block i, ``None`` for global attention.
    """

    def __init__(self, vit: VisionTransformer, window_sizes: Sequence[Optional[int]]):
        if len(window_sizes) != len(vit.blocks):
            raise ValueError(f"window_size lists {len(window_sizes)} blocks, the ViT has {len(vit.blocks)}")
        self.vit = vit
        self.window_sizes = list(window_sizes)
        self.grad_checkpointing = False

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Patch tokens (B, H*W, D) with the position grid resized to H x W; no prefix tokens."""
        vit = self.vit
        x = vit.patch_embed(image)  # (B, H, W, D)
        batch, h, w, dim = x.shape
        x = x.reshape(batch, h * w, dim) + self.position_embedding(h, w)
        return vit.pos_drop(x), None

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Upstream resizes the stored grid every forward with bicubic, no antialias (SPEC §1.3)."""
        pos = self.vit.pos_embed
        gh, gw = self.vit.patch_embed.grid_size
        if (gh, gw) == (h, w):
            return pos
        grid = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def run(
        self,
        x: torch.Tensor,
        prefix: Optional[torch.Tensor],
        start: int,
        end: int,
        grid: tuple[int, int],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Blocks ``start..end`` inclusive (upstream's interaction ranges are inclusive)."""
        for i in range(start, end + 1):
            block, window = self.vit.blocks[i], self.window_sizes[i]
            if window is None:
                fn, args = block, (x,)
            else:
                fn, args = partial(_windowed_block, block, grid=grid, window=window), (x,)
            if self.grad_checkpointing and x.requires_grad and not torch.jit.is_scripting():
                x = checkpoint(fn, *args, use_reentrant=False)
            else:
                x = fn(*args)
        return x, prefix


def _windowed_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """A timm ``Block`` forward with its attention restricted to windows."""
    x = x + block.drop_path1(block.ls1(windowed_attention(block.attn, block.norm1(x), grid, window)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

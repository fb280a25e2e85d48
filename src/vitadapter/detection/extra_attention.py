"""Upstream's ``ExtraAttention`` neck (ViT-Adapter's HTC++ configs put it in front of the FPN): one
pre-norm transformer block with a final LayerNorm over the tokens of the coarsest pyramid level, giving
the stride-32 map global context before the FPN's top-down pass. The other levels pass through.

Parameter names are upstream's (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``ffn.fc1``,
``ffn.fc2``, ``final_norm``, optional ``gamma_1``/``gamma_2``): a checkpoint's ``neck.0.*`` entries load
with the prefix stripped.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import nn


class ExtraAttention(nn.Module):
    """``x + Attn(LN1 x)``, ``x + MLP(LN2 x)`` (exact GELU), then ``LN x`` on the last level's tokens.

    ``in_channels`` lists every level's width, as upstream's config does; only the last one is used.
    ``init_values`` enables layer scale (``gamma_1``, ``gamma_2``); ``with_ffn=False`` drops the MLP;
    ``with_cp`` (or :meth:`set_grad_checkpointing`) recomputes the block in backward to save memory.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_head: int,
        with_ffn: bool = True,
        ffn_ratio: float = 4.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        with_cp: bool = False,
        use_final_norm: bool = True,
    ):
        super().__init__()
        if isinstance(in_channels, int) or not in_channels:
            raise ValueError(f"in_channels must list the width of every pyramid level, got {in_channels!r}")
        dim = int(in_channels[-1])
        if num_head < 1 or dim % num_head:
            raise ValueError(f"num_head must divide the last level's width ({dim}), got {num_head}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_head, qkv_bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if with_ffn:
            self.norm2 = nn.LayerNorm(dim)
            self.ffn = Mlp(dim, hidden_features=int(dim * ffn_ratio))
        else:
            self.norm2 = self.ffn = None
        if init_values is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            # upstream creates both scales even without the MLP; its checkpoints then hold gamma_2
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.final_norm = nn.LayerNorm(dim) if use_final_norm else None
        self.grad_checkpointing = with_cp
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _block(self, tokens: torch.Tensor) -> torch.Tensor:
        update = self.attn(self.norm1(tokens))
        tokens = tokens + self.drop_path(update if self.gamma_1 is None else self.gamma_1 * update)
        if self.ffn is not None:
            update = self.ffn(self.norm2(tokens))
            tokens = tokens + self.drop_path(update if self.gamma_2 is None else self.gamma_2 * update)
        return tokens if self.final_norm is None else self.final_norm(tokens)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``feats``: the pyramid, one NCHW map per entry of ``in_channels``. Returns the same list with
        the last map replaced."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"ExtraAttention expects {len(self.in_channels)} pyramid levels, got {len(feats)}")
        last = feats[-1]
        if last.dim() != 4 or last.shape[1] != self.in_channels[-1]:
            raise ValueError(f"the last pyramid level must be (B, {self.in_channels[-1]}, H, W), got {tuple(last.shape)}")
        b, c, h, w = last.shape
        tokens = last.flatten(2).transpose(1, 2)
        if self.grad_checkpointing and tokens.requires_grad and torch.is_grad_enabled():
            tokens = torch.utils.checkpoint.checkpoint(self._block, tokens, use_reentrant=False)
        else:
            tokens = self._block(tokens)
        return [*feats[:-1], tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()]

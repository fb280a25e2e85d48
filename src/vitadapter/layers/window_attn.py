"""Upstream's windowed self-attention, run with the weights of a timm ``Attention`` module.

Upstream projects qkv first and then zero-pads q, k and v on the right/bottom to a multiple of the
window, attending within each window without a mask: padded positions take part in the softmax with
zero keys (score 0) and zero values. Reproducing that exactly is what makes detection checkpoints
give upstream's numbers when the grid is not a multiple of the window (docs/upstream.md, "Windowed
attention").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def windowed_attention(
    attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], window: int, pad_tokens: bool = False
) -> torch.Tensor:
    """Self-attention of tokens ``x`` (B, H*W, C) within ``window``-sized squares of the ``grid``.

    ``pad_tokens``: pad the tokens with zeros before the projection, as upstream's Uni-Perceiver does
    (padded positions then carry the q/k/v biases), instead of padding q, k and v."""
    batch, tokens, _ = x.shape
    h, w = grid
    heads, head_dim = attn.num_heads, attn.head_dim
    pad_h, pad_w = -h % window, -w % window
    if pad_tokens:
        qkv = attn.qkv(F.pad(x.view(batch, h, w, -1), (0, 0, 0, pad_w, 0, pad_h)))
    else:
        qkv = F.pad(attn.qkv(x).view(batch, h, w, -1), (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (h + pad_h) // window, (w + pad_w) // window
    qkv = qkv.view(batch, rows, window, cols, window, 3, heads, head_dim)
    qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, batch * rows * cols, heads, window * window, head_dim)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.view(batch, rows, cols, heads, window, window, head_dim)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, rows * window, cols * window, heads * head_dim)
    out = out[:, :h, :w].reshape(batch, tokens, heads * head_dim)
    return attn.proj_drop(attn.proj(attn.norm(out)))

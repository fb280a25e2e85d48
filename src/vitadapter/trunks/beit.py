"""Drive a timm ``Beit`` (BEiT, BEiTv2) for the adapter, with relative position bias on any grid.

A BEiT block's attention adds a learned bias looked up by the relative offset of two tokens, from a
table sized for one grid (``(2gh-1)*(2gw-1)`` rows, plus 3 rows for cls<->token and cls<->cls when
there is a cls token). timm's module only knows its table's grid; here the bias is built for the
grid at hand: on the table's own grid exactly as upstream, on any other grid from the table resized
bicubically (how BEiT itself moves to a new resolution). Offsets are cached per grid and device.

Upstream's detection BEiT has no cls token and attends within windows, each block's table sized for
its window; upstream pads the normalised tokens with zeros *before* the qkv projection (so padded
keys are 0 and padded values equal ``v_bias``) and uses no mask. Giving a ``Beit`` windows turns it
into that model: the cls token goes and the tables are cut to their windows.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from torch import nn

from .base import Grid, TrunkDriver

# Rows after the grid part of a table when the model has a cls token: token->cls, cls->token, cls->cls.
CLS_ROWS = 3


class BeitTrunk(TrunkDriver):
    """timm ``Beit``: per-block (and optional shared) relative position bias, optional windows."""

    family = "Beit"

    def __init__(self, model: Beit, window_sizes: Optional[Sequence[Optional[int]]] = None):
        super().__init__(model, window_sizes)
        self._index_cache: dict[tuple, torch.Tensor] = {}
        if any(w is not None for w in self.window_sizes):
            if model.rel_pos_bias is not None:
                raise ValueError("windowed attention with a shared relative position bias is not supported")
            _to_detection_layout(model, self.window_sizes)

    def _block(self, index: int, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        block, window = self.model.blocks[index], self.window_sizes[index]
        y = block.norm1(x)
        y = self._global_attention(block.attn, y, grid) if window is None else self._windowed_attention(block.attn, y, grid, window)
        x = x + block.drop_path1(y if block.gamma_1 is None else block.gamma_1 * y)
        y = block.mlp(block.norm2(x))
        return x + block.drop_path2(y if block.gamma_2 is None else block.gamma_2 * y)

    def _global_attention(self, attn: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        with_cls = x.shape[1] == grid[0] * grid[1] + 1
        bias = None
        for source in (attn, self.model.rel_pos_bias):
            table = getattr(source, "relative_position_bias_table", None)
            if table is not None:
                term = self._bias(table, tuple(source.window_size), grid, with_cls)
                bias = term if bias is None else bias + term
        return _attention(attn, x, bias)

    def _windowed_attention(self, attn: nn.Module, x: torch.Tensor, grid: Grid, window: int) -> torch.Tensor:
        batch, tokens, chs = x.shape
        h, w = grid
        pad_h, pad_w = -h % window, -w % window
        x = F.pad(x.view(batch, h, w, chs), (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (h + pad_h) // window, (w + pad_w) // window
        x = x.view(batch, rows, window, cols, window, chs).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch * rows * cols, window * window, chs)
        table = attn.relative_position_bias_table
        bias = None if table is None else self._bias(table, tuple(attn.window_size), (window, window), False)
        x = _attention(attn, x, bias)
        out_chs = x.shape[-1]
        x = x.view(batch, rows, cols, window, window, out_chs).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, rows * window, cols * window, out_chs)
        return x[:, :h, :w].reshape(batch, tokens, out_chs)

    def _bias(self, table: torch.Tensor, table_grid: Grid, grid: Grid, with_cls: bool) -> torch.Tensor:
        """(1, heads, N, N) bias for ``grid`` (N = cells, + 1 with a cls token)."""
        key = (grid, with_cls, table.device)
        index = self._index_cache.get(key)
        if index is None:
            index = self._index_cache[key] = relative_position_index(grid, with_cls, table.device)
        table = resize_bias_table(table, table_grid, grid)
        size = index.shape[0]
        return table[index.view(-1)].view(size, size, -1).permute(2, 0, 1).unsqueeze(0)


def _attention(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A timm BEiT ``Attention``'s computation with an explicit bias (k has no bias, as in BEiT)."""
    batch, tokens, _ = x.shape
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, tokens, -1)))


def relative_position_index(grid: Grid, with_cls: bool, device: torch.device) -> torch.Tensor:
    """Row of the bias table for every (query, key) pair of ``grid``, BEiT's layout (cls first)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    if not with_cls:
        return index
    grid_rows = (2 * h - 1) * (2 * w - 1)
    full = torch.empty(h * w + 1, h * w + 1, dtype=index.dtype, device=device)
    full[1:, 1:] = index
    full[0, :] = grid_rows
    full[:, 0] = grid_rows + 1
    full[0, 0] = grid_rows + 2
    return full


def resize_bias_table(table: torch.Tensor, table_grid: Grid, grid: Grid) -> torch.Tensor:
    """A table for ``table_grid`` as a table for ``grid``: the offset plane resized bicubically, the
    cls rows kept. The table's own grid returns it unchanged (upstream's numbers)."""
    if tuple(table_grid) == tuple(grid):
        return table
    th, tw = 2 * table_grid[0] - 1, 2 * table_grid[1] - 1
    plane, extra = table[: th * tw], table[th * tw :]
    plane = plane.t().reshape(1, -1, th, tw)
    plane = F.interpolate(plane, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic", align_corners=False)
    return torch.cat([plane.flatten(2)[0].t(), extra])


def _to_detection_layout(model: Beit, window_sizes: Sequence[Optional[int]]) -> None:
    """Upstream's detection BEiT: no cls token, each windowed block's table sized for its window."""
    if model.cls_token is not None:
        model.cls_token = None
        model.num_prefix_tokens = 0
        if model.pos_embed is not None:
            model.pos_embed = nn.Parameter(model.pos_embed.detach()[:, 1:])
    for block, window in zip(model.blocks, window_sizes):
        attn = block.attn
        table = attn.relative_position_bias_table
        if table is None:
            continue
        table_grid = tuple(attn.window_size)
        cells = (2 * table_grid[0] - 1) * (2 * table_grid[1] - 1)
        target = table_grid if window is None else (window, window)
        with torch.no_grad():
            new = resize_bias_table(table.detach()[:cells], table_grid, target)
        if new.shape != table.shape:
            attn.relative_position_bias_table = nn.Parameter(new.clone(), requires_grad=table.requires_grad)
        attn.window_size = target


def beit_state_for(state: dict[str, torch.Tensor], model: Beit) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm-layout BEiT checkpoint fitted to ``model``: bias tables resized to each block's grid
    (cls rows dropped where the model has none) and, for a model without cls token, its token and
    position row dropped. Returns (state, dropped keys)."""
    own = model.state_dict()
    out, dropped = {}, []
    for key, value in state.items():
        if key == "cls_token" and model.cls_token is None:
            dropped.append(key)
            continue
        if key == "pos_embed" and "pos_embed" in own and value.shape[1] == own[key].shape[1] + 1:
            value = value[:, 1:]
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            value = _fit_table(value, model.get_submodule(key.rsplit(".", 1)[0]))
        if key.endswith("relative_position_index"):
            continue
        out[key] = value
    return out, dropped


def _fit_table(table: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    rows = table.shape[0]
    for extra in (CLS_ROWS, 0):
        side = math.isqrt(rows - extra)
        if side * side == rows - extra and side % 2:
            grid = ((side + 1) // 2, (side + 1) // 2)
            break
    else:
        raise ValueError(f"a relative position table of {rows} rows is not a square grid's")
    target = tuple(owner.window_size)
    wanted = owner.relative_position_bias_table.shape[0]
    plane = resize_bias_table(table[: rows - extra], grid, target)
    missing = wanted - plane.shape[0]
    if missing == CLS_ROWS and extra == CLS_ROWS:
        return torch.cat([plane, table[rows - extra :]])
    if missing:
        raise ValueError(f"cannot fit a {rows}-row relative position table into {wanted} rows")
    return plane

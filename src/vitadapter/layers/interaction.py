"""Injector, extractor and their ConvFFN: the two directions of ViT <-> pyramid exchange
(docs/upstream.md, "Forward")."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from .msda import MSDeformAttn
from .msda_op import Shapes

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class DWConv(nn.Module):
    """3x3 depthwise conv applied to each pyramid grid of a token sequence, same weights for all."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grids: Shapes) -> torch.Tensor:
        batch, _, chs = x.shape
        parts = x.split([h * w for h, w in grids], dim=1)
        # tokens are channels-last already: convolve them as such and skip two layout copies
        out = [
            self.dwconv(part.reshape(batch, h, w, chs).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(batch, h * w, chs)
            for part, (h, w) in zip(parts, grids)
        ]
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, grids: Shapes) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), grids)))


class Injector(nn.Module):
    """ViT tokens query the pyramid: ``x + gamma * MSDA(x, c)`` over the three pyramid levels."""

    def __init__(self, dim: int, num_heads: int, num_points: int, deform_ratio: float, init_values: float):
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        self.attn = MSDeformAttn(dim, num_heads, num_levels=3, num_points=num_points, value_ratio=deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, reference_points: torch.Tensor, c_grids: Shapes) -> torch.Tensor:
        return torch.addcmul(x, self.gamma, self.attn(self.query_norm(x), reference_points, self.feat_norm(c), c_grids))


class Extractor(nn.Module):
    """Pyramid tokens query the ViT grid, then a ConvFFN refines them."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_points: int,
        deform_ratio: float,
        with_cffn: bool,
        cffn_ratio: float,
        drop_path: float,
    ):
        super().__init__()
        self.query_norm = LayerNorm(dim)
        self.feat_norm = LayerNorm(dim)
        self.attn = MSDeformAttn(dim, num_heads, num_levels=1, num_points=num_points, value_ratio=deform_ratio)
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = LayerNorm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.ffn = None

    def forward(
        self,
        c: torch.Tensor,
        x: torch.Tensor,
        reference_points: torch.Tensor,
        vit_grid: tuple[int, int],
        c_grids: Shapes,
    ) -> torch.Tensor:
        c = _add_residual(c, self.attn(self.query_norm(c), reference_points, self.feat_norm(x), [vit_grid]))
        if self.ffn is not None:
            c = _add_residual(c, self.drop_path(self.ffn(self.ffn_norm(c), c_grids)))
        return c


def _add_residual(c: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``c + branch``, summed into ``branch`` (a fresh output that autograd does not keep) where the
    dtypes agree: one pyramid-sized buffer less to allocate and fill per sum. Under autocast the
    branch comes back in lower precision and the sum is taken out of place, in ``c``'s dtype."""
    if branch.dtype == c.dtype and branch.shape == c.shape:
        return branch.add_(c)
    return c + branch


class InteractionBlock(nn.Module):
    """The adapter half of one interaction: an injector before the ViT blocks (``None`` in the
    extractor-only design, where the ViT never sees the adapter), extractor(s) after."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_points: int,
        deform_ratio: float,
        init_values: float,
        with_cffn: bool,
        cffn_ratio: float,
        drop_path: float,
        extra_extractors: bool,
        with_injector: bool = True,
    ):
        super().__init__()
        self.injector = Injector(dim, num_heads, num_points, deform_ratio, init_values) if with_injector else None

        def extractor() -> Extractor:
            return Extractor(dim, num_heads, num_points, deform_ratio, with_cffn, cffn_ratio, drop_path)

        self.extractor = extractor()
        self.extra_extractors = nn.Sequential(extractor(), extractor()) if extra_extractors else None

    def extract(self, c: torch.Tensor, x: torch.Tensor, reference_points: torch.Tensor, vit_grid: tuple[int, int], c_grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        c = self.extractor(c, x, reference_points, vit_grid, c_grids)
        for extra in self.extra_extractors or ():
            c = extra(c, x, reference_points, vit_grid, c_grids)
        return c

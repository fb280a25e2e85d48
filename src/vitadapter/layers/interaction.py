"""Injector, extractor and their ConvFFN: the two directions of ViT <-> pyramid exchange
(docs/upstream.md, "Forward")."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from .msda import MSDeformAttn, is_plain_linear
from .msda_op import Shapes

# upstream's adapter norms: eps 1e-6 on its ViTs, torch's 1e-5 on Uni-Perceiver (``norm_eps``)
NORM_EPS = 1e-6


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
        return self.fc2(self.hidden(x, grids))

    def hidden(self, x: torch.Tensor, grids: Shapes) -> torch.Tensor:
        """Everything before ``fc2``."""
        return self.act(self.dwconv(self.fc1(x), grids))


class Injector(nn.Module):
    """ViT tokens query the pyramid: ``x + gamma * MSDA(x, c)`` over the three pyramid levels."""

    def __init__(
        self, dim: int, num_heads: int, num_points: int, deform_ratio: float, init_values: float, norm_eps: float = NORM_EPS
    ):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.feat_norm = nn.LayerNorm(dim, eps=norm_eps)
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
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.feat_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MSDeformAttn(dim, num_heads, num_levels=1, num_points=num_points, value_ratio=deform_ratio)
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = nn.LayerNorm(dim, eps=norm_eps)
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
        attended = self.attn.attend(self.query_norm(c), reference_points, self.feat_norm(x), [vit_grid])
        c = _plus_linear(c, self.attn.output_proj, attended)
        if self.ffn is None:
            return c
        hidden = self.ffn.hidden(self.ffn_norm(c), c_grids)
        if self.training and isinstance(self.drop_path, DropPath):
            return c + self.drop_path(self.ffn.fc2(hidden))
        # c is this call's own sum now, not the caller's tensor: the second sum may go into it
        return _plus_linear(c, self.ffn.fc2, hidden, into_residual=True)


def _plus_linear(residual: torch.Tensor, linear: nn.Linear, x: torch.Tensor, into_residual: bool = False) -> torch.Tensor:
    """``residual + linear(x)``; in eager inference with the sum taken inside the matmul: the bias
    goes onto the residual and ``addmm`` accumulates the product onto that, writing into its own
    input. A separate sum would write and read one more pyramid-sized tensor (5376 x dim at
    512 x 512), and on the CPU the matmul fills its output with the bias first anyway.

    Plainly elsewhere: autograd takes no ``out=``, compilers fuse the sum themselves, autocast gives
    the product its own dtype (the sum then stays in the residual's), and a wrapped or hooked layer
    must be called as a module. ``into_residual``: the residual is the caller's own scratch, and
    the sum may overwrite it (one fresh pyramid-sized buffer less)."""
    if (
        not is_plain_linear(linear)
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (residual, x, linear.weight)))
        or torch.is_autocast_enabled(x.device.type)
        or not residual.dtype == x.dtype == linear.weight.dtype
    ):
        return residual + linear(x)
    if into_residual and residual.is_contiguous():
        out = residual if linear.bias is None else residual.add_(linear.bias)
    else:
        out = (residual + linear.bias if linear.bias is not None else residual.clone()).contiguous()
    flat = out.view(-1, out.shape[-1])
    torch.addmm(flat, x.reshape(-1, x.shape[-1]), linear.weight.t(), out=flat)
    return out


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
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        self.injector = (
            Injector(dim, num_heads, num_points, deform_ratio, init_values, norm_eps) if with_injector else None
        )

        def extractor() -> Extractor:
            return Extractor(dim, num_heads, num_points, deform_ratio, with_cffn, cffn_ratio, drop_path, norm_eps)

        self.extractor = extractor()
        self.extra_extractors = nn.Sequential(extractor(), extractor()) if extra_extractors else None

    def extract(self, c: torch.Tensor, x: torch.Tensor, reference_points: torch.Tensor, vit_grid: tuple[int, int], c_grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        c = self.extractor(c, x, reference_points, vit_grid, c_grids)
        for extra in self.extra_extractors or ():
            c = extra(c, x, reference_points, vit_grid, c_grids)
        return c

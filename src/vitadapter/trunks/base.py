"""What every trunk driver does the same way: patch tokens, position rows, prefix tokens, block loops.

A driver wraps a timm ViT module it does not own (the adapter registers it as ``vit``) and exposes
the three steps the adapter interleaves with its own layers:

- ``embed(image)`` -> patch tokens (B, H*W, D), prefix tokens (B, P, D) or ``None``, and the token grid;
- ``run(tokens, prefix, start, end, grid)`` -> the same after blocks ``start..end`` (inclusive), with
  the prefix tokens (cls, registers) in front of the patch tokens inside the blocks only;
- ``final_norm(tokens)`` -> the trunk's last norm, which DINOv3's extractor-only design applies to
  every intermediate output.

Families differ only in what a block needs besides the tokens (windows, relative position bias,
RoPE): each subclass implements ``_block``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

Grid = tuple[int, int]


class TrunkDriver(nn.Module):
    """Embedding and block-range execution for one timm ViT family (see the module docstring).

    A module without parameters of its own: the adapter registers it (so that ``torch.fx`` can
    pass it to the adapter's traced-as-one-call body), while the timm model it drives stays
    registered only where the adapter keeps it (``vit``): ``model`` is not a child of the driver.
    """

    family = "?"

    def __init__(self, model: nn.Module, window_sizes: Optional[Sequence[Optional[int]]] = None):
        super().__init__()
        self._driven = (model,)  # a tuple, so nn.Module does not register it a second time
        depth = len(model.blocks)
        window_sizes = [None] * depth if window_sizes is None else list(window_sizes)
        if len(window_sizes) != depth:
            raise ValueError(f"window_size lists {len(window_sizes)} blocks, the trunk has {depth}")
        for size in window_sizes:
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"window sizes must be positive integers or None, got {size!r}")
        self.window_sizes = window_sizes
        self.grad_checkpointing = False

    @property
    def model(self) -> nn.Module:
        """The timm ViT this driver runs."""
        return self._driven[0]

    def extra_repr(self) -> str:
        return f"drives {type(self.model).__name__}"

    # ---- facts about the trunk -------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def patch_size(self) -> int:
        size = self.model.patch_embed.patch_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size[0] != size[1]:
            raise ValueError(f"non-square patches {size} are not supported")
        return int(size[0])

    @property
    def in_chans(self) -> int:
        return int(self.model.patch_embed.proj.in_channels)

    @property
    def prefix_tokens(self) -> list[torch.Tensor]:
        """Learned tokens put in front of the patch tokens (cls, then registers)."""
        return [t for t in (getattr(self.model, "cls_token", None), getattr(self.model, "reg_token", None)) if t is not None]

    def token_grid(self, height: int, width: int) -> Grid:
        """The patch grid of an image: pixels beyond the last whole patch are not seen (as a strided conv)."""
        return height // self.patch_size, width // self.patch_size

    # ---- forward steps ---------------------------------------------------------------------------

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Grid]:
        patch = self.patch_size
        grid = self.token_grid(*image.shape[-2:])
        # The projection conv is called directly: timm's PatchEmbed may assert a fixed input size.
        image = image[..., : grid[0] * patch, : grid[1] * patch]
        x = self.model.patch_embed.proj(image).flatten(2).transpose(1, 2)
        x = self.model.patch_embed.norm(x)
        x, prefix = self._add_positions(x, grid)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        x = getattr(self.model, "norm_pre", nn.Identity())(self.model.pos_drop(x))
        prefix, x = self._split(x, prefix)
        return x, prefix, grid

    def run(
        self, tokens: torch.Tensor, prefix: Optional[torch.Tensor], start: int, end: int, grid: Grid
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
        for i in range(start, end + 1):
            if self.grad_checkpointing and x.requires_grad and not torch.jit.is_scripting():
                x = checkpoint(self._block, i, x, grid, use_reentrant=False)
            else:
                x = self._block(i, x, grid)
        prefix, tokens = self._split(x, prefix)
        return tokens, prefix

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.norm(tokens)

    def _block(self, index: int, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared pieces ---------------------------------------------------------------------------

    def _add_positions(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Absolute position rows (resized to ``grid``) and prefix tokens, in timm's two layouts: the
        position table covers the prefix tokens too, or (``no_embed_class``) only the patches."""
        batch = x.shape[0]
        prefix = [t.expand(batch, -1, -1) for t in self.prefix_tokens]
        prefix = torch.cat(prefix, dim=1) if prefix else None
        pos = getattr(self.model, "pos_embed", None)
        if pos is None:
            return x, prefix
        stored = self._stored_grid()
        cells = stored[0] * stored[1]
        pos_prefix, pos_grid = pos[:, : pos.shape[1] - cells], pos[:, pos.shape[1] - cells :]
        x = x + resize_position_grid(pos_grid, stored, grid)
        if prefix is not None and pos_prefix.shape[1]:
            prefix = prefix + pos_prefix
        return x, prefix

    def _stored_grid(self) -> Grid:
        gh, gw = self.model.patch_embed.grid_size
        return int(gh), int(gw)

    @staticmethod
    def _split(x: torch.Tensor, prefix: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        if prefix is None:
            return None, x
        return x[:, : prefix.shape[1]], x[:, prefix.shape[1] :]


def resize_position_grid(pos: torch.Tensor, stored: Grid, grid: Grid) -> torch.Tensor:
    """(1, gh*gw, D) position rows -> (1, H*W, D): bicubic, ``align_corners=False``, no antialias.

    Upstream ViT-Adapter and DINOv2's adapter resize this way every forward; timm's own resampler
    antialiases when shrinking and gives different numbers.
    """
    # a symbolic grid (an export with dynamic height and width) is resized even where it happens to
    # match: a same-size bicubic resize is the identity, and the graph stays valid for every size
    if all(statically_known_true(a == b) for a, b in zip(stored, grid)):
        return pos
    rows = pos.reshape(1, *stored, -1).permute(0, 3, 1, 2)
    rows = F.interpolate(rows, size=grid, mode="bicubic", align_corners=False)
    return rows.flatten(2).transpose(1, 2)

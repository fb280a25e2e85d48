"""Drive a timm ``Eva`` (EVA-02, DINOv3) for the adapter: blocks take rotary position embeddings.

The rotary embedding depends only on the token grid and the rope's buffers, so it is built once per
grid, device and buffer version (loading new periods invalidates it) and reused by every block of a
forward and by later forwards at the same size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.models.eva import Eva

from .base import Grid, TrunkDriver


class EvaTrunk(TrunkDriver):
    """timm ``Eva``: absolute position rows if the model has them, RoPE on the patch tokens."""

    family = "Eva"

    def __init__(self, model: Eva, window_sizes: Optional[Sequence[Optional[int]]] = None):
        super().__init__(model, window_sizes)
        if any(w is not None for w in self.window_sizes):
            raise ValueError("windowed attention is not supported for Eva trunks (EVA-02, DINOv3): use window_size=None")
        self._rope_cache: dict[tuple, Optional[torch.Tensor]] = {}

    def _block(self, index: int, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        rope = self._rope(grid, x.device)
        if rope is not None and getattr(self.model, "rope_mixed", False):
            rope = rope[index]
        return self.model.blocks[index](x, rope=rope)

    def _rope(self, grid: Grid, device: torch.device) -> Optional[torch.Tensor]:
        if self.model.rope is None:
            return None
        rope = self.model.rope
        key = (grid, device, tuple(b._version for b in rope.buffers()))
        if key not in self._rope_cache:
            self._rope_cache.clear()  # one live entry: older keys are stale versions or other sizes
            rope = rope.get_embed(shape=list(grid))
            if rope.shape[-2] != grid[0] * grid[1]:
                raise ValueError(
                    f"this Eva's rotary embedding is fixed to its build grid, not {grid[0]}x{grid[1]}: "
                    "create the timm model with dynamic_img_size=True"
                )
            self._rope_cache[key] = rope
        return self._rope_cache[key]

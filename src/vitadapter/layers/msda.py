"""Multi-scale deformable attention: the op (reference form) and the module around it.

Semantics follow SPEC §2: per head, per level, per point a bilinear sample of the value map at
``loc * size - 0.5`` pixels (corners outside the map contribute zero), weighted and summed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Shapes = Sequence[tuple[int, int]]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch deformable attention, any device and dtype, differentiable in all three inputs.

    value (B, S, heads, head_dim); sampling_locations (B, Q, heads, levels, points, 2) as (x, y) in
    [0, 1]; attention_weights (B, Q, heads, levels, points) -> (B, Q, heads * head_dim). Equal to
    ``F.grid_sample(..., padding_mode="zeros", align_corners=False)`` per level, weighted and
    summed (SPEC §2).
    """
    sizes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=sampling_locations.dtype, device=value.device)
    pixels = sampling_locations * sizes.view(-1, 1, 2) - 0.5
    return sample_pixels(value, spatial_shapes, pixels[..., 0], pixels[..., 1], attention_weights)


def sample_pixels(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    x: torch.Tensor,
    y: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The op with locations in pixel coordinates of their level (pixel centres at integers).

    x, y, attention_weights: (B, Q, heads, levels, points). Computed as one gather-and-weighted-sum
    (``embedding_bag``) over the four bilinear corners of every point: no (heads, head_dim, Q,
    points) intermediate as with grid_sample, and no layout copies.
    """
    batch, _, heads, head_dim = value.shape
    queries = x.shape[1]
    # Each level gets a zero border, 1 px before and 2 after, and locations are clamped to
    # [-1, size]: every corner then lands on a real or a zero pixel, which is exactly zero padding
    # (a point beyond the border has both corners on zeros; its gradient is zero either way).
    padded, starts, table_len = [], [], 0
    for (h, w), part in zip(spatial_shapes, value.split([h * w for h, w in spatial_shapes], dim=1)):
        padded.append(F.pad(part.reshape(batch, h, w, heads * head_dim), (0, 0, 1, 2, 1, 2)).flatten(1, 2))
        starts.append(table_len)
        table_len += (h + 3) * (w + 3)
    table = torch.cat(padded, 1).view(batch * table_len * heads, head_dim)
    # table row of (batch b, position s, head m) is (b * table_len + s) * heads + m
    row_offset = (
        torch.arange(heads, device=value.device)
        + torch.arange(batch, device=value.device).view(batch, 1, 1) * (table_len * heads)
    ).view(batch, 1, heads, 1)

    rows, corner_weights = [], []
    for level, (h, w) in enumerate(spatial_shapes):
        px = x[:, :, :, level].clamp(-1, w)
        py = y[:, :, :, level].clamp(-1, h)
        x0, y0 = px.floor(), py.floor()
        fx, fy = px - x0, py - y0
        lower = attention_weights[:, :, :, level] * fy
        upper = attention_weights[:, :, :, level] - lower
        upper_right, lower_right = upper * fx, lower * fx
        corner_weights.append(torch.stack([upper - upper_right, upper_right, lower - lower_right, lower_right], -1))
        pitch = w + 3
        top_left = x0.add(y0, alpha=pitch).add_(pitch + 1 + starts[level]).to(torch.int64) * heads + row_offset
        steps = torch.tensor([0, heads, pitch * heads, (pitch + 1) * heads], device=value.device)
        rows.append(top_left.unsqueeze(-1) + steps)
    out = F.embedding_bag(
        torch.stack(rows, 3).view(batch * queries * heads, -1),
        table,
        per_sample_weights=torch.stack(corner_weights, 3).to(value.dtype).view(batch * queries * heads, -1),
        mode="sum",
    )
    return out.view(batch, queries, heads * head_dim)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable attention with upstream's tensor contract.

    ``spatial_shapes`` is a (levels, 2) integer tensor of (H, W); ``level_start_index`` the offset of
    each level in ``value``'s S axis. ``backend``: "auto" or "reference" (the Triton kernels are not
    part of this release yet, so both run the reference).
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r}")
    for name, t, dims in (
        ("value", value, 4),
        ("sampling_locations", sampling_locations, 6),
        ("attention_weights", attention_weights, 5),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D tensor, got {_describe(t)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (levels, 2), got {tuple(spatial_shapes.shape)}")
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    if level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial_shapes {shapes}")
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} positions but spatial_shapes cover {sum(h * w for h, w in shapes)}")
    b, q, heads, levels, points, _ = sampling_locations.shape
    if value.shape[0] != b or value.shape[2] != heads or levels != len(shapes):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not fit value {tuple(value.shape)} "
            f"with {len(shapes)} levels"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be {tuple(sampling_locations.shape[:-1])}, got {tuple(attention_weights.shape)}"
        )
    return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class MSDeformAttn(nn.Module):
    """Deformable attention of ``dim``-wide queries into a multi-level value sequence."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, value_ratio: float = 1.0):
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(f"dim*deform_ratio ({value_dim}) must be divisible by deform heads ({num_heads})")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.head_dim = value_dim // num_heads
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's start: head m samples along direction 2*pi*m/heads, point p at distance p+1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float64) * (2 * math.pi / self.num_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)
        direction = direction / direction.abs().amax(-1, keepdim=True)
        distance = torch.arange(1, self.num_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = direction.view(self.num_heads, 1, 1, 2) * distance
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: Shapes,
    ) -> torch.Tensor:
        """query (B, Q, dim), reference_points (Q, 2) in [0, 1], features (B, S, dim) -> (B, Q, dim)."""
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(features).view(batch, features.shape[1], heads, self.head_dim)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        # offsets are in pixels of their level: add them to the reference point in those pixels,
        # in at least float32 (a bfloat16 coordinate on a 128-px map is off by up to half a pixel)
        coord_dtype = torch.promote_types(query.dtype, torch.float32)
        sizes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=coord_dtype, device=query.device)
        ref = (reference_points.to(coord_dtype).view(queries, 1, 2) * sizes - 0.5).view(1, queries, 1, levels, 1, 2)
        x = offsets[..., 0] + ref[..., 0]
        y = offsets[..., 1] + ref[..., 1]
        out = sample_pixels(value, spatial_shapes, x, y, weights.view(batch, queries, heads, levels, points))
        return self.output_proj(out)

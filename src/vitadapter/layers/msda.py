"""The multi-scale deformable attention module: projections around the op (docs/upstream.md,
"Deformable attention")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .msda_op import Shapes, deform_attn_from_projections


class MSDeformAttn(nn.Module):
    """Deformable attention of ``dim``-wide queries into a multi-level value sequence.

    ``backend`` ("auto", "triton", "reference") picks the op's implementation, see msda_op.py;
    the Triton path fuses the softmax and the location math into the sampling kernel.
    """

    backend = "auto"

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
        return self.output_proj(self.attend(query, reference_points, features, spatial_shapes))

    def attend(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: Shapes,
    ) -> torch.Tensor:
        """The attention before its output projection: (B, Q, dim * value_ratio)."""
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(features).view(batch, features.shape[1], heads, self.head_dim)
        offsets, logits = self._query_projections(query)
        offsets = offsets.unflatten(-1, (heads, levels, points, 2))
        logits = logits.unflatten(-1, (heads, levels * points))
        return deform_attn_from_projections(value, spatial_shapes, reference_points, offsets, logits, self.backend)

    def _query_projections(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling offsets and attention logits, in one matmul where both are plain Linear layers:
        one read of the query (pyramid-sized in the extractors) instead of two."""
        if is_plain_linear(self.sampling_offsets) and is_plain_linear(self.attention_weights):
            weight = torch.cat([self.sampling_offsets.weight, self.attention_weights.weight])
            bias = torch.cat([self.sampling_offsets.bias, self.attention_weights.bias])
            return F.linear(query, weight, bias).split([self.sampling_offsets.out_features, self.attention_weights.out_features], -1)
        return self.sampling_offsets(query), self.attention_weights(query)


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose arithmetic may be done with its weights directly: not a subclass or
    a quantised or wrapped replacement, and with no hooks that expect it to be called."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)

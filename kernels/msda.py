"""Triton kernels for multi-scale deformable attention (SPEC §2), forward and backward.

One program handles ``BLOCK_Q`` queries of one (batch, head) pair and all of the head's channels.
For every level and point it computes the bilinear corners in registers and gathers the value rows,
so nothing of size (queries x points x channels) is ever written out. Arithmetic is float32 for
float32/float16/bfloat16 inputs (float64 for float64, so gradcheck can verify the kernels);
``grad_value`` is scattered with atomics into a buffer of that dtype and cast at the end
(low-precision atomics would lose small contributions).

Layouts (all contiguous): value (B, S, heads, D); sampling_locations (B, Q, heads, L, P, 2) as
(x, y) in [0, 1]; attention_weights (B, Q, heads, L, P); spatial_shapes (L, 2) as (H, W);
level_start_index (L,). Output (B, Q, heads * D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _corner(value_base, row_stride, start, cx, cy, width, height, d, q_mask, d_mask, COMPUTE: tl.constexpr):
    """Value rows at integer pixel (cx, cy) of one level, zero where the pixel is off the map."""
    inside = q_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    row = (start + cy * width + cx).to(tl.int64)
    ptrs = value_base + row[:, None] * row_stride + d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)


@triton.jit
def _pixel(loc_ptr, k, q_mask, size, COMPUTE: tl.constexpr):
    """Location component -> pixel coordinate (centres on integers), its floor and fraction.

    Far-away points are clamped to two pixels outside the map: their corners stay off the map
    (zero value, zero gradient, as without clamping) and the integer cast cannot overflow.
    """
    size_f = size.to(COMPUTE)
    pix = tl.load(loc_ptr + k, mask=q_mask, other=0.0).to(COMPUTE) * size_f - 0.5
    pix = tl.minimum(tl.maximum(pix, -2.0), size_f + 1.0)
    low = tl.floor(pix)
    return low.to(tl.int32), pix - low


@triton.jit
def _point(value_base, row_stride, start, loc_ptr, k, width, height, d, q_mask, d_mask, COMPUTE: tl.constexpr):
    """Sampling point k: its top-left corner pixel, fractions, and the four corner value rows."""
    x0, fx = _pixel(loc_ptr, 2 * k, q_mask, width, COMPUTE)
    y0, fy = _pixel(loc_ptr, 2 * k + 1, q_mask, height, COMPUTE)
    v00 = _corner(value_base, row_stride, start, x0, y0, width, height, d, q_mask, d_mask, COMPUTE)
    v01 = _corner(value_base, row_stride, start, x0 + 1, y0, width, height, d, q_mask, d_mask, COMPUTE)
    v10 = _corner(value_base, row_stride, start, x0, y0 + 1, width, height, d, q_mask, d_mask, COMPUTE)
    v11 = _corner(value_base, row_stride, start, x0 + 1, y0 + 1, width, height, d, q_mask, d_mask, COMPUTE)
    return x0, y0, fx, fy, v00, v01, v10, v11


@triton.jit
def _msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    num_queries, num_keys, num_heads, head_dim, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_mask = q < num_queries
    d_mask = d < head_dim
    row_stride = num_heads * head_dim
    value_base = value_ptr + b.to(tl.int64) * num_keys * row_stride + h * head_dim
    # index of (b, q, h) in the (B, Q, heads, ...) tensors
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=COMPUTE)
    for level in range(num_levels):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in range(num_points):
            k = (bqh * num_levels + level) * num_points + point
            a = tl.load(attn_ptr + k, mask=q_mask, other=0.0).to(COMPUTE)
            x0, y0, fx, fy, v00, v01, v10, v11 = _point(
                value_base, row_stride, start, loc_ptr, k, width, height, d, q_mask, d_mask, COMPUTE
            )
            top = v00 + fx[:, None] * (v01 - v00)
            bottom = v10 + fx[:, None] * (v11 - v10)
            acc += a[:, None] * (top + fy[:, None] * (bottom - top))
    out_ptrs = out_ptr + bqh[:, None] * head_dim + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter(grad_value_base, row_stride, start, cx, cy, width, height, q_mask, contribution, d, d_mask):
    """Add a corner's contribution to its grad_value rows, where the pixel is on the map."""
    inside = q_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    row = (start + cy * width + cx).to(tl.int64)
    ptrs = grad_value_base + row[:, None] * row_stride + d[None, :]
    tl.atomic_add(ptrs, contribution, mask=inside[:, None] & d_mask[None, :])


@triton.jit
def _msda_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_queries, num_keys, num_heads, head_dim, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_mask = q < num_queries
    d_mask = d < head_dim
    row_stride = num_heads * head_dim
    value_base = value_ptr + b.to(tl.int64) * num_keys * row_stride + h * head_dim
    grad_value_base = grad_value_ptr + b.to(tl.int64) * num_keys * row_stride + h * head_dim
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h
    grad = tl.load(grad_out_ptr + bqh[:, None] * head_dim + d[None, :],
                   mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)
    for level in range(num_levels):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in range(num_points):
            k = (bqh * num_levels + level) * num_points + point
            a = tl.load(attn_ptr + k, mask=q_mask, other=0.0).to(COMPUTE)
            x0, y0, fx, fy, v00, v01, v10, v11 = _point(
                value_base, row_stride, start, loc_ptr, k, width, height, d, q_mask, d_mask, COMPUTE
            )
            gx = 1.0 - fx
            gy = 1.0 - fy
            top = v00 + fx[:, None] * (v01 - v00)
            bottom = v10 + fx[:, None] * (v11 - v10)
            sample = top + fy[:, None] * (bottom - top)
            tl.store(grad_attn_ptr + k, tl.sum(grad * sample, axis=1).to(grad_attn_ptr.dtype.element_ty),
                     mask=q_mask)
            # d sample / d pixel, times d pixel / d location (the map size), times the weight
            d_x = gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
            d_y = bottom - top
            grad_x = tl.sum(grad * d_x, axis=1) * a * width.to(COMPUTE)
            grad_y = tl.sum(grad * d_y, axis=1) * a * height.to(COMPUTE)
            tl.store(grad_loc_ptr + 2 * k, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * k + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            weighted = grad * a[:, None]
            _scatter(grad_value_base, row_stride, start, x0, y0, width, height, q_mask,
                     weighted * (gx * gy)[:, None], d, d_mask)
            _scatter(grad_value_base, row_stride, start, x0 + 1, y0, width, height, q_mask,
                     weighted * (fx * gy)[:, None], d, d_mask)
            _scatter(grad_value_base, row_stride, start, x0, y0 + 1, width, height, q_mask,
                     weighted * (gx * fy)[:, None], d, d_mask)
            _scatter(grad_value_base, row_stride, start, x0 + 1, y0 + 1, width, height, q_mask,
                     weighted * (fx * fy)[:, None], d, d_mask)


def _compute_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _launch_shape(value: torch.Tensor, sampling_locations: torch.Tensor) -> tuple[tuple, dict]:
    batch, _, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    block_d = triton.next_power_of_2(head_dim)
    # keep the (BLOCK_Q, BLOCK_D) float32 tiles at 2K elements: four corners and an accumulator
    # stay in registers for head dims up to 128
    block_q = max(16, min(64, 2048 // block_d))
    grid = (triton.cdiv(queries, block_q), batch * heads)
    compute = tl.float64 if _compute_dtype(value) == torch.float64 else tl.float32
    return grid, dict(BLOCK_Q=block_q, BLOCK_D=block_d, COMPUTE=compute)


def _sizes(value: torch.Tensor, sampling_locations: torch.Tensor) -> tuple[int, ...]:
    batch, keys, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    return queries, keys, heads, head_dim, levels, points


def msda_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward of the op on contiguous inputs; the output has ``value``'s dtype."""
    batch, _, heads, head_dim = value.shape
    out = value.new_empty(batch, sampling_locations.shape[1], heads * head_dim)
    grid, blocks = _launch_shape(value, sampling_locations)
    _msda_forward_kernel[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        *_sizes(value, sampling_locations), **blocks,
    )
    return out


def msda_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for value, sampling_locations and attention_weights, each in its input's dtype."""
    grad_value = torch.zeros(value.shape, dtype=_compute_dtype(value), device=value.device)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    grid, blocks = _launch_shape(value, sampling_locations)
    _msda_backward_kernel[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
        grad_value, grad_loc, grad_attn,
        *_sizes(value, sampling_locations), **blocks,
    )
    return grad_value.to(value.dtype), grad_loc, grad_attn

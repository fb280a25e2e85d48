"""Triton kernels for multi-scale deformable attention, forward and backward (the op is defined in
docs/upstream.md, "Deformable attention").

One program handles ``BLOCK_Q`` queries of one (batch, head) pair and all of the head's channels.
For every level and point it computes the bilinear corners in registers and gathers the value rows,
so nothing of size (queries x points x channels) is ever written out. Arithmetic is float32 for
float32/float16/bfloat16 inputs (float64 for float64, so gradcheck can verify the kernels);
``grad_value`` is scattered with atomics into a buffer of that dtype and cast at the end
(low-precision atomics would lose small contributions).

Two input forms share the kernels (``FUSED`` is a compile-time switch):
- the op's contract: sampling_locations (B, Q, heads, L, P, 2) as (x, y) in [0, 1] and
  attention_weights (B, Q, heads, L, P);
- the module's raw projections: reference_points (Q, 2) in [0, 1], offsets (B, Q, heads, L, P, 2)
  in pixels of their level and logits (B, Q, heads, L * P). Softmax and location math then happen
  in registers instead of in separate kernels with their own round trips through memory.
Other layouts (all contiguous): value (B, S, heads, D); spatial_shapes (L, 2) as (H, W);
level_start_index (L,). Output (B, Q, heads * D).

Installed as ``vitadapter.kernels.msda``. Importing it imports Triton; set ``TRITON_INTERPRET=1``
before the import to run the kernels on CPU tensors through Triton's interpreter (slow: for tests on
small shapes). The folder has no ``__init__.py`` on purpose: a regular package named ``kernels`` at the
repository's root would shadow the PyPI package ``kernels`` (which transformers imports) for anything
started there, while a namespace portion yields to any regular package of that name on ``sys.path``.
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
def _pixel(loc_ptr, ref_ptr, k, q, q_mask, size, axis, FUSED: tl.constexpr, COMPUTE: tl.constexpr):
    """One coordinate of point k in pixels of its level (centres on integers): floor and fraction.

    Far-away points are clamped to two pixels outside the map: their corners stay off the map
    (zero value, zero gradient, as without clamping) and the integer cast cannot overflow.
    """
    size_f = size.to(COMPUTE)
    loc = tl.load(loc_ptr + 2 * k + axis, mask=q_mask, other=0.0).to(COMPUTE)
    if FUSED:
        ref = tl.load(ref_ptr + 2 * q + axis, mask=q_mask, other=0.0).to(COMPUTE)
        pix = ref * size_f - 0.5 + loc
    else:
        pix = loc * size_f - 0.5
    pix = tl.minimum(tl.maximum(pix, -2.0), size_f + 1.0)
    low = tl.floor(pix)
    return low.to(tl.int32), pix - low


@triton.jit
def _point(value_base, row_stride, start, loc_ptr, ref_ptr, k, q, width, height, d, q_mask, d_mask,
           FUSED: tl.constexpr, COMPUTE: tl.constexpr):
    """Sampling point k: its top-left corner pixel, fractions, and the four corner value rows."""
    x0, fx = _pixel(loc_ptr, ref_ptr, k, q, q_mask, width, 0, FUSED, COMPUTE)
    y0, fy = _pixel(loc_ptr, ref_ptr, k, q, q_mask, height, 1, FUSED, COMPUTE)
    v00 = _corner(value_base, row_stride, start, x0, y0, width, height, d, q_mask, d_mask, COMPUTE)
    v01 = _corner(value_base, row_stride, start, x0 + 1, y0, width, height, d, q_mask, d_mask, COMPUTE)
    v10 = _corner(value_base, row_stride, start, x0, y0 + 1, width, height, d, q_mask, d_mask, COMPUTE)
    v11 = _corner(value_base, row_stride, start, x0 + 1, y0 + 1, width, height, d, q_mask, d_mask, COMPUTE)
    return x0, y0, fx, fy, v00, v01, v10, v11


@triton.jit
def _softmax_tile(attn_ptr, bqh, q_mask, cols, num_terms, COMPUTE: tl.constexpr):
    """Softmax over each query's levels x points logits, as a (BLOCK_Q, LP_BLOCK) tile."""
    col_mask = cols[None, :] < num_terms
    logits = tl.load(attn_ptr + bqh[:, None] * num_terms + cols[None, :],
                     mask=q_mask[:, None] & col_mask, other=float("-inf")).to(COMPUTE)
    top = tl.where(q_mask, tl.max(logits, axis=1), 0.0)
    e = tl.where(col_mask, tl.exp(logits - top[:, None]), 0.0)
    total = tl.where(q_mask, tl.sum(e, axis=1), 1.0)
    return e / total[:, None]


@triton.jit
def _weight(attn_ptr, k, q_mask, weights, cols, j, FUSED: tl.constexpr, COMPUTE: tl.constexpr):
    """Attention weight of point k (column j of the softmax tile when fused)."""
    if FUSED:
        return tl.sum(tl.where(cols[None, :] == j, weights, 0.0), axis=1)
    else:
        return tl.load(attn_ptr + k, mask=q_mask, other=0.0).to(COMPUTE)


@triton.jit
def _program_tile(num_queries, num_keys, num_heads, head_dim, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head) pair and query block: indices, masks, and where its rows live.

    Returns query indices, channel indices, their masks, the value row stride, the offset of this
    (batch, head) in value-shaped tensors, and the index of each (b, q, h) in (B, Q, heads, ...) tensors.
    """
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    h = batch_head % num_heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_stride = num_heads * head_dim
    value_offset = b.to(tl.int64) * num_keys * row_stride + h * head_dim
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h
    return q, d, q < num_queries, d < head_dim, row_stride, value_offset, bqh


@triton.jit
def _msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, ref_ptr, attn_ptr, out_ptr,
    num_queries, num_keys, num_heads, head_dim, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, LP_BLOCK: tl.constexpr,
    FUSED: tl.constexpr, COMPUTE: tl.constexpr,
):
    q, d, q_mask, d_mask, row_stride, value_offset, bqh = _program_tile(
        num_queries, num_keys, num_heads, head_dim, BLOCK_Q, BLOCK_D
    )
    cols = tl.arange(0, LP_BLOCK)
    value_base = value_ptr + value_offset
    weights = tl.zeros((BLOCK_Q, LP_BLOCK), dtype=COMPUTE)
    if FUSED:
        weights = _softmax_tile(attn_ptr, bqh, q_mask, cols, num_levels * num_points, COMPUTE)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=COMPUTE)
    for level in range(num_levels):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in range(num_points):
            j = level * num_points + point
            k = bqh * (num_levels * num_points) + j
            a = _weight(attn_ptr, k, q_mask, weights, cols, j, FUSED, COMPUTE)
            x0, y0, fx, fy, v00, v01, v10, v11 = _point(
                value_base, row_stride, start, loc_ptr, ref_ptr, k, q, width, height, d, q_mask, d_mask,
                FUSED, COMPUTE,
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
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, ref_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_queries, num_keys, num_heads, head_dim, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, LP_BLOCK: tl.constexpr,
    FUSED: tl.constexpr, COMPUTE: tl.constexpr,
):
    q, d, q_mask, d_mask, row_stride, value_offset, bqh = _program_tile(
        num_queries, num_keys, num_heads, head_dim, BLOCK_Q, BLOCK_D
    )
    cols = tl.arange(0, LP_BLOCK)
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset
    num_terms = num_levels * num_points
    grad = tl.load(grad_out_ptr + bqh[:, None] * head_dim + d[None, :],
                   mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)
    weights = tl.zeros((BLOCK_Q, LP_BLOCK), dtype=COMPUTE)
    if FUSED:
        weights = _softmax_tile(attn_ptr, bqh, q_mask, cols, num_terms, COMPUTE)
    grad_weights = tl.zeros((BLOCK_Q, LP_BLOCK), dtype=COMPUTE)
    for level in range(num_levels):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in range(num_points):
            j = level * num_points + point
            k = bqh * num_terms + j
            a = _weight(attn_ptr, k, q_mask, weights, cols, j, FUSED, COMPUTE)
            x0, y0, fx, fy, v00, v01, v10, v11 = _point(
                value_base, row_stride, start, loc_ptr, ref_ptr, k, q, width, height, d, q_mask, d_mask,
                FUSED, COMPUTE,
            )
            gx = 1.0 - fx
            gy = 1.0 - fy
            top = v00 + fx[:, None] * (v01 - v00)
            bottom = v10 + fx[:, None] * (v11 - v10)
            grad_a = tl.sum(grad * (top + fy[:, None] * (bottom - top)), axis=1)
            # d sample / d pixel times the weight; locations in [0, 1] also take d pixel / d location
            grad_x = tl.sum(grad * (gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)), axis=1) * a
            grad_y = tl.sum(grad * (bottom - top), axis=1) * a
            if FUSED:
                grad_weights = tl.where(cols[None, :] == j, grad_a[:, None], grad_weights)
            else:
                tl.store(grad_attn_ptr + k, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
                grad_x = grad_x * width.to(COMPUTE)
                grad_y = grad_y * height.to(COMPUTE)
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
    if FUSED:
        # softmax backward: dL/dlogit_j = w_j * (dL/dw_j - sum_i w_i dL/dw_i)
        mean = tl.sum(weights * grad_weights, axis=1)
        grad_logits = weights * (grad_weights - mean[:, None])
        tl.store(grad_attn_ptr + bqh[:, None] * num_terms + cols[None, :],
                 grad_logits.to(grad_attn_ptr.dtype.element_ty),
                 mask=q_mask[:, None] & (cols[None, :] < num_terms))


def _compute_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _launch(value: torch.Tensor, locations: torch.Tensor, fused: bool) -> tuple[tuple, tuple, dict]:
    """Grid, size arguments and compile-time constants for locations/offsets of (B, Q, heads, L, P, 2)."""
    batch, keys, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    block_d = triton.next_power_of_2(head_dim)
    # keep the (BLOCK_Q, BLOCK_D) float32 tiles at 2K elements: four corners and an accumulator
    # stay in registers for head dims up to 128
    block_q = max(16, min(64, 2048 // block_d))
    grid = (triton.cdiv(queries, block_q), batch * heads)
    sizes = (queries, keys, heads, head_dim, levels, points)
    compute = tl.float64 if _compute_dtype(value) == torch.float64 else tl.float32
    constants = dict(
        BLOCK_Q=block_q, BLOCK_D=block_d, LP_BLOCK=triton.next_power_of_2(levels * points),
        FUSED=fused, COMPUTE=compute,
    )
    return grid, sizes, constants


def _forward(value, spatial_shapes, level_start_index, locations, reference_points, attention, fused):
    batch, _, heads, head_dim = value.shape
    out = value.new_empty(batch, locations.shape[1], heads * head_dim)
    grid, sizes, constants = _launch(value, locations, fused)
    _msda_forward_kernel[grid](
        value, spatial_shapes, level_start_index, locations, reference_points, attention, out, *sizes, **constants
    )
    return out


def _backward(grad_output, value, spatial_shapes, level_start_index, locations, reference_points, attention, fused):
    grad_value = torch.zeros(value.shape, dtype=_compute_dtype(value), device=value.device)
    grad_locations = torch.empty_like(locations)
    grad_attention = torch.empty_like(attention)
    grid, sizes, constants = _launch(value, locations, fused)
    _msda_backward_kernel[grid](
        value, spatial_shapes, level_start_index, locations, reference_points, attention, grad_output,
        grad_value, grad_locations, grad_attention, *sizes, **constants,
    )
    return grad_value.to(value.dtype), grad_locations, grad_attention


def msda_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward of the op on contiguous inputs; the output has ``value``'s dtype."""
    return _forward(value, spatial_shapes, level_start_index, sampling_locations, sampling_locations,
                    attention_weights, fused=False)


def msda_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for value, sampling_locations and attention_weights, each in its input's dtype."""
    return _backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                     sampling_locations, attention_weights, fused=False)


def msda_fused_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Forward from the raw projections: softmax(logits) weights, reference point + pixel offsets."""
    return _forward(value, spatial_shapes, level_start_index, offsets, reference_points, logits, fused=True)


def msda_fused_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for value, offsets and logits of the fused forward."""
    return _backward(grad_output, value, spatial_shapes, level_start_index, offsets, reference_points, logits,
                     fused=True)

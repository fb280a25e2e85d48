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

import os

import torch
import triton
import triton.language as tl

# Launch configurations. A program holds (BLOCK_Q, BLOCK_D) float32 tiles: the forward four corner
# rows and an accumulator, the backward grad_output, four corners and their products besides. Each
# thread's share of a tile is fixed per kernel: 16 elements in the forward, 4 in the backward. More
# and some variant spills registers; fewer and a float32 value row is gathered in pieces narrower
# than 128 bits (tests/test_msda_sass.py checks both on sm_80 and sm_90). Every kernel may use all
# 255 registers: left to choose, ptxas aims at occupancy, stops some variants at 96 or 128 registers
# and spills a few values across the loops.
# Two configs meet each share at every head dim up to 128 (one tile, four or eight warps); on a GPU
# autotune times both, per key; in Triton's interpreter and without a GPU there is nothing to time
# and the first is taken.
_ELEMENTS_PER_THREAD = {"forward": 16, "backward": 4}
_SHAPES = {  # (BLOCK_Q, num_warps)
    "forward": ((256, 8), (128, 8), (128, 4), (64, 8), (64, 4), (32, 8), (32, 4), (16, 4)),
    "backward": ((64, 8), (32, 8), (32, 4), (16, 8), (16, 4), (8, 8), (8, 4)),
}
_REGISTER_LIMIT = 255
# autotune adds the tensors' dtypes to the key
_TUNE_KEY = ["head_dim", "num_levels", "POINTS", "FUSED", "query_bucket"]


def _tuning(kernel: str) -> dict:
    """Autotune arguments for ``kernel``: its configs, pruned to those of the right share per thread
    at the launch's head dim (beyond head dim 128 or so, the smallest tile)."""
    share = _ELEMENTS_PER_THREAD[kernel]

    def prune(configs, named_args, **kwargs):
        fitting = [c for c in configs if c.kwargs["BLOCK_Q"] * kwargs["BLOCK_D"] == share * 32 * c.num_warps]
        fitting = fitting or configs[-1:]
        on_gpu = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
        return fitting[:2] if on_gpu else fitting[:1]

    configs = [triton.Config({"BLOCK_Q": q}, num_warps=w, maxnreg=_REGISTER_LIMIT) for q, w in _SHAPES[kernel]]
    return dict(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})


@triton.jit
def _program_tile(num_queries, num_keys, num_heads, head_dim,
                  BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, INDEX: tl.constexpr):
    """This program's (batch, head) pair and query block: indices, masks, and where its rows live.

    Returns query indices, channel indices, their masks, the value row stride, the offset of this
    (batch, head) in value-shaped tensors, and the index of each (b, q, h) in (B, Q, heads, ...) tensors,
    all in ``INDEX`` (int32 wherever every tensor has fewer than 2^31 elements: half the address math).
    """
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(INDEX)
    h = batch_head % num_heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_stride = num_heads * head_dim
    value_offset = b * num_keys * row_stride + h * head_dim
    bqh = (b * num_queries + q) * num_heads + h
    return q, d, q < num_queries, d < head_dim, row_stride, value_offset, bqh


@triton.jit
def _point_mask(q_mask, POINTS: tl.constexpr, P_BLOCK: tl.constexpr):
    """Mask of a (BLOCK_Q, P_BLOCK) tile of per-point values. Without padding columns it is constant
    along a row, which lets Triton load and store each query's row with vector instructions."""
    if POINTS == P_BLOCK:
        return q_mask[:, None]
    else:
        return q_mask[:, None] & (tl.arange(0, P_BLOCK)[None, :] < POINTS)


@triton.jit
def _level_points(loc_ptr, ref_x, ref_y, attn_ptr, bqh, q_mask, level, num_levels, height, width, top, inv_total,
                  POINTS: tl.constexpr, P_BLOCK: tl.constexpr, FUSED: tl.constexpr, COMPUTE: tl.constexpr):
    """One level's points of every query as (BLOCK_Q, P_BLOCK) tiles: pixel x and y (centres on integers)
    and attention weight, each read with one tile load per level instead of one load per point.

    Far-away points are clamped to two pixels outside the map: their corners stay off the map
    (zero value, zero gradient, as without clamping) and the integer cast cannot overflow.
    """
    cols = tl.arange(0, P_BLOCK)
    mask = _point_mask(q_mask, POINTS, P_BLOCK)
    first = (bqh * num_levels + level) * POINTS
    pair = tl.arange(0, 2 * P_BLOCK)
    xy = tl.load(loc_ptr + 2 * first[:, None] + pair[None, :], mask=_point_mask(q_mask, 2 * POINTS, 2 * P_BLOCK),
                 other=0.0).to(COMPUTE)
    x, y = tl.split(tl.reshape(xy, (xy.shape[0], P_BLOCK, 2)))
    w_f = width.to(COMPUTE)
    h_f = height.to(COMPUTE)
    if FUSED:
        x = ref_x[:, None] * w_f - 0.5 + x
        y = ref_y[:, None] * h_f - 0.5 + y
        logits = tl.load(attn_ptr + first[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(COMPUTE)
        a = tl.exp(logits - top[:, None]) * inv_total[:, None]
    else:
        x = x * w_f - 0.5
        y = y * h_f - 0.5
        a = tl.load(attn_ptr + first[:, None] + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    x = tl.minimum(tl.maximum(x, -2.0), w_f + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), h_f + 1.0)
    return x, y, tl.where(mask, a, 0.0)


@triton.jit
def _column(tile, p, P_BLOCK: tl.constexpr):
    """Column p of a (BLOCK_Q, P_BLOCK) tile: a select among the P_BLOCK values each thread holds of
    its rows, no memory access."""
    return tl.sum(tl.where(tl.arange(0, P_BLOCK)[None, :] == p, tile, 0.0), axis=1)


@triton.jit
def _softmax_stats(attn_ptr, bqh, q_mask, num_levels, POINTS: tl.constexpr, P_BLOCK: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """Per query, the largest logit over all levels and points and the reciprocal of the sum of
    exp(logit - largest), one level's tile at a time (the softmax's weights are then
    exp(logit - largest) x reciprocal). The reciprocal is taken once, in float32 without IEEE
    rounding (within 2 ulp): a correctly rounded division is a subroutine call on NVIDIA GPUs, whose
    saved registers go to the stack."""
    cols = tl.arange(0, P_BLOCK)
    mask = _point_mask(q_mask, POINTS, P_BLOCK)
    top = tl.where(q_mask, -float("inf"), 0.0).to(COMPUTE)
    total = tl.zeros(top.shape, dtype=COMPUTE)
    for level in range(num_levels):
        first = (bqh * num_levels + level) * POINTS
        logits = tl.load(attn_ptr + first[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(COMPUTE)
        new_top = tl.where(q_mask, tl.maximum(top, tl.max(logits, axis=1)), 0.0)
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logits - new_top[:, None]), axis=1)
        top = new_top
    total = tl.where(q_mask, total, 1.0)
    if COMPUTE == tl.float32:
        return top, tl.fdiv(1.0, total, ieee_rounding=False)
    else:  # float64, for gradcheck: exact
        return top, 1.0 / total


@triton.jit
def _corner(value_base, row_stride, start, cx, cy, width, height, d, q_mask, d_mask, COMPUTE: tl.constexpr):
    """Value rows at integer pixel (cx, cy) of one level, zero where the pixel is off the map."""
    inside = q_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    ptrs = value_base + ((start + cy * width + cx) * row_stride)[:, None] + d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)


@triton.jit
def _sample_corners(value_base, row_stride, start, x, y, width, height, d, q_mask, d_mask, COMPUTE: tl.constexpr):
    """Top-left corner pixel, fractions, and the four corner value rows of one point."""
    x_low = tl.floor(x)
    y_low = tl.floor(y)
    x0 = x_low.to(tl.int32)
    y0 = y_low.to(tl.int32)
    v00 = _corner(value_base, row_stride, start, x0, y0, width, height, d, q_mask, d_mask, COMPUTE)
    v01 = _corner(value_base, row_stride, start, x0 + 1, y0, width, height, d, q_mask, d_mask, COMPUTE)
    v10 = _corner(value_base, row_stride, start, x0, y0 + 1, width, height, d, q_mask, d_mask, COMPUTE)
    v11 = _corner(value_base, row_stride, start, x0 + 1, y0 + 1, width, height, d, q_mask, d_mask, COMPUTE)
    return x0, y0, x - x_low, y - y_low, v00, v01, v10, v11


@triton.jit
def _query_inputs(ref_ptr, q, q_mask, attn_ptr, bqh, num_levels, POINTS: tl.constexpr, P_BLOCK: tl.constexpr,
                  FUSED: tl.constexpr, COMPUTE: tl.constexpr):
    """What the fused form needs once per query: the reference point and the softmax's statistics."""
    if FUSED:
        ref = tl.load(ref_ptr + 2 * q[:, None] + tl.arange(0, 2)[None, :], mask=q_mask[:, None], other=0.0)
        ref_x, ref_y = tl.split(ref.to(COMPUTE))
        top, inv_total = _softmax_stats(attn_ptr, bqh, q_mask, num_levels, POINTS, P_BLOCK, COMPUTE)
    else:
        ref_x = tl.zeros(q.shape, dtype=COMPUTE)
        ref_y = ref_x
        top = ref_x
        inv_total = ref_x
    return ref_x, ref_y, top, inv_total


@triton.autotune(**_tuning("forward"))
@triton.jit(do_not_specialize=["num_levels", "query_bucket"])
def _msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, ref_ptr, attn_ptr, out_ptr,
    num_queries, num_keys, num_heads, head_dim, num_levels, query_bucket,
    POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, P_BLOCK: tl.constexpr,
    FUSED: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    q, d, q_mask, d_mask, row_stride, value_offset, bqh = _program_tile(
        num_queries, num_keys, num_heads, head_dim, BLOCK_Q, BLOCK_D, INDEX
    )
    value_base = value_ptr + value_offset
    ref_x, ref_y, top, inv_total = _query_inputs(ref_ptr, q, q_mask, attn_ptr, bqh, num_levels, POINTS, P_BLOCK,
                                             FUSED, COMPUTE)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=COMPUTE)
    for level in range(num_levels):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        xs, ys, weights = _level_points(loc_ptr, ref_x, ref_y, attn_ptr, bqh, q_mask, level, num_levels, height,
                                        width, top, inv_total, POINTS, P_BLOCK, FUSED, COMPUTE)
        # a run-time loop: unrolled in Triton's IR, its layout pass takes time that grows with the square
        # of the points' memory instructions (compiles 3 to 4 times slower, so CI could not check every
        # variant); LLVM still unrolls it where that pays, and the SASS instructions per sample corner
        # stay within a few percent of the unrolled form's
        for p in range(POINTS):
            a = _column(weights, p, P_BLOCK)
            x0, y0, fx, fy, v00, v01, v10, v11 = _sample_corners(
                value_base, row_stride, start, _column(xs, p, P_BLOCK), _column(ys, p, P_BLOCK), width, height,
                d, q_mask, d_mask, COMPUTE,
            )
            top_row = v00 + fx[:, None] * (v01 - v00)
            bottom_row = v10 + fx[:, None] * (v11 - v10)
            acc += a[:, None] * (top_row + fy[:, None] * (bottom_row - top_row))
    out_ptrs = out_ptr + bqh[:, None] * head_dim + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter(grad_value_base, row_stride, start, cx, cy, width, height, q_mask, contribution, d, d_mask):
    """Add a corner's contribution to its grad_value rows, where the pixel is on the map."""
    inside = q_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    ptrs = grad_value_base + ((start + cy * width + cx) * row_stride)[:, None] + d[None, :]
    tl.atomic_add(ptrs, contribution, mask=inside[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _put(tile, p, column, P_BLOCK: tl.constexpr):
    """``tile`` with column p replaced by ``column``."""
    return tl.where(tl.arange(0, P_BLOCK)[None, :] == p, column[:, None], tile)


# grad_value collects atomics: zeroed again before each config autotune times
@triton.autotune(reset_to_zero=["grad_value_ptr"], **_tuning("backward"))
@triton.jit(do_not_specialize=["num_levels", "query_bucket"])
def _msda_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, ref_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_queries, num_keys, num_heads, head_dim, num_levels, query_bucket,
    POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, P_BLOCK: tl.constexpr,
    FUSED: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    q, d, q_mask, d_mask, row_stride, value_offset, bqh = _program_tile(
        num_queries, num_keys, num_heads, head_dim, BLOCK_Q, BLOCK_D, INDEX
    )
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset
    grad = tl.load(grad_out_ptr + bqh[:, None] * head_dim + d[None, :],
                   mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(COMPUTE)
    ref_x, ref_y, top, inv_total = _query_inputs(ref_ptr, q, q_mask, attn_ptr, bqh, num_levels, POINTS, P_BLOCK,
                                             FUSED, COMPUTE)
    cols = tl.arange(0, P_BLOCK)
    tile_mask = _point_mask(q_mask, POINTS, P_BLOCK)
    pair = tl.arange(0, 2 * P_BLOCK)
    # sum over all points of weight x d loss / d weight: the softmax backward's shared term
    weighted_sum = tl.zeros((BLOCK_Q,), dtype=COMPUTE)
    for level in range(num_levels):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        xs, ys, weights = _level_points(loc_ptr, ref_x, ref_y, attn_ptr, bqh, q_mask, level, num_levels, height,
                                        width, top, inv_total, POINTS, P_BLOCK, FUSED, COMPUTE)
        grad_weights = tl.zeros((BLOCK_Q, P_BLOCK), dtype=COMPUTE)
        grad_xs = tl.zeros((BLOCK_Q, P_BLOCK), dtype=COMPUTE)
        grad_ys = tl.zeros((BLOCK_Q, P_BLOCK), dtype=COMPUTE)
        for p in range(POINTS):  # a run-time loop, as in the forward
            a = _column(weights, p, P_BLOCK)
            x0, y0, fx, fy, v00, v01, v10, v11 = _sample_corners(
                value_base, row_stride, start, _column(xs, p, P_BLOCK), _column(ys, p, P_BLOCK), width, height,
                d, q_mask, d_mask, COMPUTE,
            )
            gx = 1.0 - fx
            gy = 1.0 - fy
            top_row = v00 + fx[:, None] * (v01 - v00)
            bottom_row = v10 + fx[:, None] * (v11 - v10)
            grad_weights = _put(grad_weights, p, tl.sum(grad * (top_row + fy[:, None] * (bottom_row - top_row)), axis=1),
                                P_BLOCK)
            # d sample / d pixel times the weight
            grad_xs = _put(grad_xs, p, tl.sum(grad * (gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)), axis=1) * a,
                           P_BLOCK)
            grad_ys = _put(grad_ys, p, tl.sum(grad * (bottom_row - top_row), axis=1) * a, P_BLOCK)
            weighted = grad * a[:, None]
            _scatter(grad_value_base, row_stride, start, x0, y0, width, height, q_mask,
                     weighted * (gx * gy)[:, None], d, d_mask)
            _scatter(grad_value_base, row_stride, start, x0 + 1, y0, width, height, q_mask,
                     weighted * (fx * gy)[:, None], d, d_mask)
            _scatter(grad_value_base, row_stride, start, x0, y0 + 1, width, height, q_mask,
                     weighted * (gx * fy)[:, None], d, d_mask)
            _scatter(grad_value_base, row_stride, start, x0 + 1, y0 + 1, width, height, q_mask,
                     weighted * (fx * fy)[:, None], d, d_mask)
        if not FUSED:  # locations in [0, 1] also take d pixel / d location
            grad_xs = grad_xs * width.to(COMPUTE)
            grad_ys = grad_ys * height.to(COMPUTE)
        first = (bqh * num_levels + level) * POINTS
        grad_xy = tl.reshape(tl.join(grad_xs, grad_ys), (BLOCK_Q, 2 * P_BLOCK))
        tl.store(grad_loc_ptr + 2 * first[:, None] + pair[None, :], grad_xy.to(grad_loc_ptr.dtype.element_ty),
                 mask=_point_mask(q_mask, 2 * POINTS, 2 * P_BLOCK))
        # the fused form's raw d loss / d weight waits in grad_attn for the softmax backward below
        tl.store(grad_attn_ptr + first[:, None] + cols[None, :], grad_weights.to(grad_attn_ptr.dtype.element_ty),
                 mask=tile_mask)
        if FUSED:
            weighted_sum += tl.sum(weights * grad_weights, axis=1)
    if FUSED:
        # softmax backward: dL/dlogit_j = w_j * (dL/dw_j - sum_i w_i dL/dw_i); every thread must see the
        # stores above before reading them back
        tl.debug_barrier()
        for level in range(num_levels):
            first = (bqh * num_levels + level) * POINTS
            logits = tl.load(attn_ptr + first[:, None] + cols[None, :], mask=tile_mask, other=float("-inf")).to(COMPUTE)
            weights = tl.exp(logits - top[:, None]) * inv_total[:, None]
            grad_weights = tl.load(grad_attn_ptr + first[:, None] + cols[None, :], mask=tile_mask, other=0.0).to(COMPUTE)
            tl.store(grad_attn_ptr + first[:, None] + cols[None, :],
                     (weights * (grad_weights - weighted_sum[:, None])).to(grad_attn_ptr.dtype.element_ty),
                     mask=tile_mask)


def _compute_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _launch(value: torch.Tensor, locations: torch.Tensor) -> tuple:
    """Grid, size arguments and compile-time constants for locations/offsets of (B, Q, heads, L, P, 2)."""
    batch, keys, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    compute = tl.float64 if _compute_dtype(value) == torch.float64 else tl.float32
    largest = max(value.numel(), locations.numel(), batch * queries * heads * head_dim)

    def grid(meta):
        return triton.cdiv(queries, meta["BLOCK_Q"]), batch * heads

    # autotune's choice per power-of-two query count (what decides how many programs are in flight)
    sizes = (queries, keys, heads, head_dim, levels, triton.next_power_of_2(queries))
    constants = dict(
        POINTS=points, BLOCK_D=triton.next_power_of_2(head_dim), P_BLOCK=triton.next_power_of_2(points),
        COMPUTE=compute, INDEX=tl.int32 if largest < 2**31 else tl.int64,
    )
    return grid, sizes, constants


def _forward(value, spatial_shapes, level_start_index, locations, reference_points, attention, fused):
    batch, _, heads, head_dim = value.shape
    out = value.new_empty(batch, locations.shape[1], heads * head_dim)
    grid, sizes, constants = _launch(value, locations)
    _msda_forward_kernel[grid](
        value, spatial_shapes, level_start_index, locations, reference_points, attention, out, *sizes,
        FUSED=fused, **constants,
    )
    return out


def _backward(grad_output, value, spatial_shapes, level_start_index, locations, reference_points, attention, fused):
    compute = _compute_dtype(value)
    grad_value = torch.zeros(value.shape, dtype=compute, device=value.device)
    grad_locations = torch.empty_like(locations)
    # the fused form keeps d loss / d weight there between its two passes: at full precision
    grad_attention = torch.empty(attention.shape, dtype=compute if fused else attention.dtype, device=value.device)
    grid, sizes, constants = _launch(value, locations)
    _msda_backward_kernel[grid](
        value, spatial_shapes, level_start_index, locations, reference_points, attention, grad_output,
        grad_value, grad_locations, grad_attention, *sizes, FUSED=fused, **constants,
    )
    return grad_value.to(value.dtype), grad_locations, grad_attention.to(attention.dtype)


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

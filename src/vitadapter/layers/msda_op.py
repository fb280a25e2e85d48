"""Multi-scale deformable attention as one torch op: ``vitadapter::ms_deform_attn``.

Semantics (docs/upstream.md, "Deformable attention"): per head, level and point, a bilinear sample
of the value map at pixel ``location * size - 0.5`` (corners off the map count as zero), weighted
and summed; exactly ``F.grid_sample(..., padding_mode="zeros", align_corners=False)`` per level.

Two implementations behind one op, registered with ``torch.library`` (fake tensor support and
autograd included, so it works under ``torch.compile`` and ``torch.export``):
- "triton": the kernels in ``vitadapter.kernels`` (CUDA; CPU tensors through Triton's
  interpreter when ``TRITON_INTERPRET=1``);
- "reference": pure PyTorch on any device, one gather-and-weighted-sum (``embedding_bag``) over the
  four bilinear corners of every point, with an analytic backward of the same form.
``backend="auto"`` picks Triton for CUDA tensors when Triton imports, the reference otherwise.

The adapter's modules enter through ``deform_attn_from_projections``: it takes the raw
projections (pixel offsets, logits), which the Triton path turns into locations and softmax
weights inside the kernel (``vitadapter::ms_deform_attn_fused``) instead of in separate passes.
The reference path goes through the op only where autograd, a compiler or a tracer records (or
for fake tensors); in eager inference it samples straight from pixel offsets (the op's dispatch
and the [0, 1] locations cost about a tenth of a CPU forward's deformable attention).
While ``torch.onnx.export`` runs, it uses neither op but standard ones that ONNX has
(``_deform_attn_portable``: ``grid_sample`` per level); ``ms_deform_attn`` itself, called with
tensor ``spatial_shapes``, stays the custom op, which ONNX export does not translate.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import torch.nn.functional as F

Shapes = Sequence[tuple[int, int]]
BACKENDS = ("auto", "triton", "reference")


# ---- reference ---------------------------------------------------------------------------------


class _Corners:
    """Rows of the four bilinear corners of every sampling point in a zero-bordered value table.

    Built from pixel coordinates, one (x, y) pair of (B, Q, heads, P) tensors per level, with pixel
    centres at whole numbers (``location * size - 0.5``). Each level gets a zero border, 1 px
    before and 2 after, and pixel coordinates are clamped to [-1, size]: every corner then lands on
    a real or a zero pixel, which is exactly zero padding (a point beyond the border has all
    corners on zeros; its gradient is zero either way).

    Written for the CPU's elementwise kernels, where an op on same-shaped tensors (or with a scalar
    or a value repeated along the innermost axes) runs 10-30x faster than one that broadcasts a
    small trailing axis or stacks into a new last axis (ViT-Adapter-T's extractor at 512x512: ~20
    us against 200-900 us per op on 5376 queries x 6 heads x 4 points). So: one level at a time
    with Python-number sizes, x and y as separate tensors, and results written into their slots of
    one buffer (``out=``) rather than stacked, except where autograd records (a differentiable
    stack then).
    """

    def __init__(self, value: torch.Tensor, spatial_shapes: Shapes, pixels: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        batch, _, heads, head_dim = value.shape
        device = value.device
        self.spatial_shapes = spatial_shapes
        self.pixels = pixels
        self.table, self.starts, self.table_len = _padded_table(value, spatial_shapes)
        table_len = self.table_len

        # embedding_bag takes int32 rows as well as int64: half the index traffic where they fit
        index_dtype = torch.int32 if batch * table_len * heads < 2**31 else torch.int64
        _, queries, _, points = pixels[0][0].shape
        # table row of (batch b, position s, head m) is (b * table_len + s) * heads + m; the (b, m)
        # part, laid out over (heads, points) so that adding it broadcasts over queries only
        batch_head = (
            torch.arange(heads, device=device).view(1, heads, 1)
            + torch.arange(batch, device=device).view(batch, 1, 1) * (table_len * heads)
        ).expand(batch, heads, points).reshape(batch, 1, heads, points)
        self.coord_dtype = pixels[0][0].dtype
        self.rows = torch.empty(batch, queries, heads, len(spatial_shapes), points, 4, dtype=index_dtype, device=device)
        self.fx, self.fy = [], []
        for level, ((h, w), (px, py)) in enumerate(zip(spatial_shapes, pixels)):
            px, py = px.clamp(-1, w), py.clamp(-1, h)
            x0, y0 = px.floor(), py.floor()
            self.fx.append(px.sub_(x0))
            self.fy.append(py.sub_(y0))
            # corner (y0, x0) sits at table position start + (y0 + 1) * pitch + x0 + 1: whole numbers
            # in floating point, exact up to 2^24 positions per image
            pitch = w + 3
            position = x0.add_(y0, alpha=pitch).to(index_dtype)
            first = (batch_head + (self.starts[level] + pitch + 1) * heads).to(index_dtype)
            top_left = torch.add(first, position, alpha=heads)
            slots = self.rows[:, :, :, level]
            for k, step in enumerate((0, heads, pitch * heads, (pitch + 1) * heads)):
                torch.add(top_left, step, out=slots[..., k])

    def weights(self, attention_weights: torch.Tensor) -> torch.Tensor:
        """attention x bilinear weight of each corner: (y0,x0) (y0,x1) (y1,x0) (y1,x1) on the last
        axis, (B, Q, heads, L, P, 4)."""
        attn = attention_weights.to(self.coord_dtype)
        recorded = torch.is_grad_enabled() and (attn.requires_grad or any(f.requires_grad for f in self.fx + self.fy))
        out = None if recorded else attn.new_empty(*attn.shape, 4)
        per_level = []
        for level, (fx, fy) in enumerate(zip(self.fx, self.fy)):
            lower = attn[:, :, :, level] * fy
            upper = attn[:, :, :, level] - lower
            if recorded:
                upper_right, lower_right = upper * fx, lower * fx
                per_level.append(torch.stack([upper - upper_right, upper_right, lower - lower_right, lower_right], -1))
            else:
                corner = out[:, :, :, level].unbind(-1)
                torch.mul(upper, fx, out=corner[1])
                torch.sub(upper, corner[1], out=corner[0])
                torch.mul(lower, fx, out=corner[3])
                torch.sub(lower, corner[3], out=corner[2])
        return torch.stack(per_level, 3) if recorded else out

    def frac(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fractional pixel coordinates x and y, (B, Q, heads, L, P) each."""
        return torch.stack(self.fx, 3), torch.stack(self.fy, 3)

    def inside_clamp(self) -> torch.Tensor:
        """Where the pixel coordinate was not clamped (the clamp passes gradient only there)."""
        return torch.stack([
            torch.stack([(px >= -1) & (px <= w), (py >= -1) & (py <= h)], -1)
            for (px, py), (h, w) in zip(self.pixels, self.spatial_shapes)
        ], 3)

    def sizes(self) -> torch.Tensor:
        return torch.tensor([(w, h) for h, w in self.spatial_shapes], dtype=self.coord_dtype, device=self.rows.device)


def _pixels_from_locations(sampling_locations: torch.Tensor, spatial_shapes: Shapes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level, x and y pixel coordinates of (B, Q, heads, L, P, 2) locations in [0, 1], in at
    least float32 (a bfloat16 coordinate on a 128-px map is off by up to half a pixel)."""
    dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    pixels = []
    for level, (h, w) in enumerate(spatial_shapes):
        xy = sampling_locations[:, :, :, level].to(dtype)
        pixels.append((xy[..., 0] * w - 0.5, xy[..., 1] * h - 0.5))
    return pixels


def _pixels_from_offsets(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: Shapes
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level, x and y pixel coordinates of ``reference + offset / size``: the reference point's
    pixel plus the offset, which skips the [0, 1] locations (one op per coordinate instead of three)."""
    dtype = torch.promote_types(offsets.dtype, torch.float32)
    reference = reference_points.to(dtype)
    queries = reference.shape[0]
    pixels = []
    for level, (h, w) in enumerate(spatial_shapes):
        centre_x = (reference[:, 0] * w - 0.5).view(1, queries, 1, 1)
        centre_y = (reference[:, 1] * h - 0.5).view(1, queries, 1, 1)
        xy = offsets[:, :, :, level].to(dtype)
        pixels.append((xy[..., 0] + centre_x, xy[..., 1] + centre_y))
    return pixels


def _padded_table(value: torch.Tensor, spatial_shapes: Shapes) -> tuple[torch.Tensor, list[int], int]:
    """Each level of ``value`` (B, S, heads, head_dim) inside a zero border (1 px before, 2 after),
    written in one pass (padding each level, then concatenating, wrote it three times): the
    (B * positions * heads, head_dim) rows, each level's first position and the positions per image."""
    batch, _, heads, head_dim = value.shape
    starts, table_len = [], 0
    for h, w in spatial_shapes:
        starts.append(table_len)
        table_len += (h + 3) * (w + 3)
    table = value.new_empty(batch, table_len, heads * head_dim)
    parts = value.split([h * w for h, w in spatial_shapes], dim=1)
    for (h, w), start, part in zip(spatial_shapes, starts, parts):
        level = table[:, start:start + (h + 3) * (w + 3)].view(batch, h + 3, w + 3, heads * head_dim)
        level[:, 1:h + 1, 1:w + 1] = part.reshape(batch, h, w, heads * head_dim)
        level[:, 0] = 0
        level[:, h + 1:] = 0
        level[:, 1:h + 1, 0] = 0
        level[:, 1:h + 1, w + 1:] = 0
    return table.view(batch * table_len * heads, head_dim), starts, table_len


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch forward, any device and dtype, differentiable by autograd in all inputs.

    value (B, S, heads, head_dim); sampling_locations (B, Q, heads, levels, points, 2) as (x, y) in
    [0, 1]; attention_weights (B, Q, heads, levels, points) -> (B, Q, heads * head_dim).
    """
    return _sample(value, spatial_shapes, _pixels_from_locations(sampling_locations, spatial_shapes), attention_weights)


def _sample(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    pixels: Sequence[tuple[torch.Tensor, torch.Tensor]],
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The reference's sampling from per-level pixel coordinates: one ``embedding_bag`` over the
    four bilinear corners of every point."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points = attention_weights.shape
    if not (batch and queries):  # an empty batch has no bags for embedding_bag to size
        return value.new_zeros(batch, queries, heads * head_dim)
    corners = _Corners(value, spatial_shapes, pixels)
    weights = corners.weights(attention_weights)
    bag = levels * points * 4
    out = F.embedding_bag(
        corners.rows.view(batch * queries * heads, bag),
        corners.table,
        per_sample_weights=weights.to(value.dtype).view(batch * queries * heads, bag),
        mode="sum",
    )
    return out.view(batch, queries, heads * head_dim)


def ms_deform_attn_reference_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the reference for value, sampling_locations and attention_weights, computed
    directly (the op's backward runs where autograd cannot record)."""
    batch, keys, heads, head_dim = value.shape
    corners = _Corners(value, spatial_shapes, _pixels_from_locations(sampling_locations, spatial_shapes))
    coord = corners.coord_dtype
    attn = attention_weights.to(coord)
    bilinear = corners.weights(torch.ones_like(attn))
    # one row per (batch, query, head), one column per corner of each of its points
    rows = corners.rows.flatten(3).flatten(0, 2)
    scaled = (bilinear * attn.unsqueeze(-1)).view(rows.shape)
    grad = grad_output.to(coord).reshape(rows.shape[0], head_dim)
    table = corners.table.to(coord)
    dots = torch.empty(rows.shape, dtype=coord, device=value.device)  # grad . value at each corner
    grad_table = torch.zeros(table.shape, dtype=coord, device=value.device)
    # gathered corner values are (rows, corners, head_dim): bound them to ~16 MB at a time
    step = max(1, (1 << 22) // (rows.shape[1] * head_dim))
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        dots[part] = torch.bmm(table[rows[part]], grad[part].unsqueeze(-1)).squeeze(-1)
        contributions = scaled[part].unsqueeze(-1) * grad[part].unsqueeze(1)
        grad_table.index_add_(0, rows[part].flatten(), contributions.view(-1, head_dim))
    dots = dots.view(bilinear.shape)
    grad_attn = (bilinear * dots).sum(-1)
    fx, fy = corners.frac()
    d00, d01, d10, d11 = dots.unbind(-1)
    d_x = (1 - fy) * (d01 - d00) + fy * (d11 - d10)
    d_y = (1 - fx) * (d10 - d00) + fx * (d11 - d01)
    grad_loc = torch.stack([d_x, d_y], -1) * attn.unsqueeze(-1) * corners.sizes().view(-1, 1, 2) * corners.inside_clamp()

    grad_table = grad_table.view(batch, corners.table_len, heads, head_dim)
    grad_value = torch.cat([
        grad_table[:, start:start + (h + 3) * (w + 3)].view(batch, h + 3, w + 3, heads, head_dim)[:, 1:h + 1, 1:w + 1]
        .reshape(batch, h * w, heads, head_dim)
        for start, (h, w) in zip(corners.starts, spatial_shapes)
    ], 1)
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )


# ---- the op --------------------------------------------------------------------------------------


@functools.cache
def _kernels():
    try:
        from vitadapter.kernels import msda
    except ImportError as e:  # no Triton on this platform
        raise RuntimeError(f"backend='triton' needs Triton, which does not import here ({e})") from e
    return msda


def _python_shapes(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


@torch.library.custom_op("vitadapter::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        return _kernels().msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, _python_shapes(spatial_shapes), sampling_locations, attention_weights)


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * head_dim)


@torch.library.custom_op("vitadapter::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().msda_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference_backward(
        grad_output, value, _python_shapes(spatial_shapes), sampling_locations, attention_weights
    )


@_ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend = backend


def _backward(ctx, grad_output):
    grads = _ms_deform_attn_backward_op(grad_output.contiguous(), *ctx.saved_tensors, ctx.backend)
    grad_value, grad_loc, grad_attn = grads
    return grad_value, None, None, grad_loc, grad_attn, None


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vitadapter::ms_deform_attn_fused", mutates_args=())
def _ms_deform_attn_fused_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    return _kernels().msda_fused_forward(value, spatial_shapes, level_start_index, reference_points, offsets, logits)


@_ms_deform_attn_fused_op.register_fake
def _(value, spatial_shapes, level_start_index, reference_points, offsets, logits):
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, offsets.shape[1], heads * head_dim)


@torch.library.custom_op("vitadapter::ms_deform_attn_fused_backward", mutates_args=())
def _ms_deform_attn_fused_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().msda_fused_backward(
        grad_output, value, spatial_shapes, level_start_index, reference_points, offsets, logits
    )


@_ms_deform_attn_fused_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, reference_points, offsets, logits):
    return torch.empty_like(value), torch.empty_like(offsets), torch.empty_like(logits)


def _setup_fused_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fused_backward(ctx, grad_output):
    grad_value, grad_offsets, grad_logits = _ms_deform_attn_fused_backward_op(
        grad_output.contiguous(), *ctx.saved_tensors
    )
    return grad_value, None, None, None, grad_offsets, grad_logits


_ms_deform_attn_fused_op.register_autograd(_fused_backward, setup_context=_setup_fused_context)


# ---- public entry points -----------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" for CUDA tensors when Triton imports, else "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' on {device.type} tensors runs through Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing vitadapter (slow; meant for tests), or use 'reference'"
        )
    return backend


@functools.cache
def _triton_available() -> bool:
    try:
        _kernels()
    except RuntimeError:
        return False
    return True


def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """The op without input checks (they read tensor values, which costs a sync and a graph break)."""
    return _ms_deform_attn_op(
        value.contiguous(),
        spatial_shapes,
        level_start_index,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        resolve_backend(backend, value.device),
    )


def deform_attn_from_projections(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable attention from a module's raw projections.

    value (B, S, heads, head_dim); reference_points (Q, 2) as (x, y) in [0, 1] (no gradient);
    offsets (B, Q, heads, levels, points, 2) in pixels of their level; logits (B, Q, heads,
    levels * points), softmax-normalised per head -> (B, Q, heads * head_dim).
    """
    if torch.onnx.is_in_onnx_export():
        return _deform_attn_portable(value, spatial_shapes, reference_points, offsets, logits)
    backend = resolve_backend(backend, value.device)
    batch, queries, heads, levels, points, _ = offsets.shape
    if backend == "reference":
        weights = _narrow_softmax(logits).view(batch, queries, heads, levels, points)
        if not _wants_the_op(value, offsets, logits):
            # eager inference: straight to the sampling, without the op's dispatch or [0, 1] locations
            return _sample(value, spatial_shapes, _pixels_from_offsets(reference_points, offsets, spatial_shapes), weights)
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64, device=value.device).view(-1, 2)
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    if backend == "triton":
        return _ms_deform_attn_fused_op(
            value.contiguous(), shapes, starts, reference_points.contiguous(), offsets.contiguous(), logits.contiguous()
        )
    # locations in at least float32: a bfloat16 coordinate on a 128-px map is off by up to half a pixel
    coord_dtype = torch.promote_types(offsets.dtype, torch.float32)
    inverse_sizes = torch.tensor([(1 / w, 1 / h) for h, w in spatial_shapes], dtype=coord_dtype, device=value.device)
    locations = torch.addcmul(
        reference_points.to(coord_dtype).view(1, queries, 1, 1, 1, 2), offsets, inverse_sizes.view(levels, 1, 2)
    )
    return ms_deform_attn_op(value, shapes, starts, locations, weights, "reference")


def _wants_the_op(*inputs: torch.Tensor) -> bool:
    """Whether this call goes through the custom op: where autograd, a compiler or a tracer records
    it (they see one node, and its backward recomputes the corners instead of keeping them), and
    for tensor subclasses such as fake tensors (shape propagation then runs the op's fake kernel
    instead of each of the sampling's ops)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if any(type(t) is not torch.Tensor for t in inputs):
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _deform_attn_portable(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    """``deform_attn_from_projections`` in standard ops only, for exporters (ONNX) that cannot
    carry the custom op: one ``grid_sample`` per level (ONNX ``GridSample``, zero padding, pixel
    centres as ``align_corners=False``) and a weighted sum over the points.

    Level sizes may be symbolic (an export with dynamic height and width): they are only used in
    shape arithmetic and scalar divisions, never turned into tensors.
    """
    batch, queries, heads, levels, points, _ = offsets.shape
    head_dim = value.shape[-1]
    weights = _narrow_softmax(logits).to(value.dtype).transpose(1, 2).reshape(batch * heads, queries, levels, points)
    # grid_sample wants one image per (batch, head) pair, channels first
    maps = value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, value.shape[1])
    offsets = offsets.permute(0, 2, 1, 3, 4, 5).reshape(batch * heads, queries, levels, points, 2)
    centres = reference_points.to(offsets.dtype).view(1, queries, 1, 2)
    out, start = None, 0
    for level, (h, w) in enumerate(spatial_shapes):
        level_map = maps[..., start:start + h * w].reshape(batch * heads, head_dim, h, w)
        start = start + h * w
        # location = centre + offset / size; grid_sample's coordinate is 2 * location - 1
        scale = torch.stack([2.0 / (offsets.new_ones(()) * w), 2.0 / (offsets.new_ones(()) * h)])
        grid = (centres * 2 - 1) + offsets[:, :, level] * scale
        sampled = F.grid_sample(level_map, grid.to(value.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * weights[:, None, :, level]).sum(-1)  # (B * heads, head_dim, Q)
        out = part if out is None else out + part
    return out.view(batch, heads * head_dim, queries).transpose(1, 2)


def _narrow_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, computed in at least float32 (as autocast computes softmax).

    Written out because that axis is levels * points wide (4 to 16): ``Tensor.softmax`` runs about
    3x slower than these three passes on such rows on the CPU (1.6 ms vs 0.5 ms for an extractor
    of ViT-Adapter-T at 512x512), where the reference path runs.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable attention with upstream's tensor contract, checked.

    value (B, S, heads, head_dim); spatial_shapes (levels, 2) integer (H, W); level_start_index
    (levels,) offset of each level in S; sampling_locations (B, Q, heads, levels, points, 2) as
    (x, y) in [0, 1]; attention_weights (B, Q, heads, levels, points) -> (B, Q, heads * head_dim)
    in ``value``'s dtype. ``backend``: "auto", "triton" or "reference".
    """
    for name, t, dims in (
        ("value", value, 4),
        ("spatial_shapes", spatial_shapes, 2),
        ("level_start_index", level_start_index, 1),
        ("sampling_locations", sampling_locations, 6),
        ("attention_weights", attention_weights, 5),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D tensor, got {_describe(t)}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    batch, queries, heads, levels, points, _ = sampling_locations.shape
    if spatial_shapes.shape != (levels, 2) or spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
        raise ValueError(f"spatial_shapes must be an integer ({levels}, 2) tensor, got {_describe(spatial_shapes)}")
    if value.shape[0] != batch or value.shape[2] != heads or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not fit value {tuple(value.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be {tuple(sampling_locations.shape[:-1])}, got {tuple(attention_weights.shape)}"
        )
    if not torch.compiler.is_compiling():
        shapes = _python_shapes(spatial_shapes)
        if any(h < 1 or w < 1 for h, w in shapes):
            raise ValueError(f"spatial_shapes must hold positive (height, width) pairs, got {shapes}")
        starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
        if level_start_index.tolist() != starts:
            raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial_shapes {shapes}")
        if sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"value has {value.shape[1]} positions but spatial_shapes cover {sum(h * w for h, w in shapes)}")
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

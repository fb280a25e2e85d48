"""Deformable attention: the reference op against a direct transcription of its definition
(docs/upstream.md), and its module."""
import math

import torch.nn.functional as F

import pytest
import torch

import vitadapter
from vitadapter.layers.msda import MSDeformAttn
from vitadapter.layers.msda_op import ms_deform_attn_reference


def naive_msda(value, shapes, loc, weights):
    """Bilinear sampling at pixel (x*W - .5, y*H - .5) with zero outside, one sample at a time."""
    b_, s_, heads, dim = value.shape
    _, q_, _, levels, points, _ = loc.shape
    out = torch.zeros(b_, q_, heads, dim, dtype=value.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        vmap = value[:, start:start + h * w].reshape(b_, h, w, heads, dim)
        start += h * w
        for b in range(b_):
            for q in range(q_):
                for m in range(heads):
                    for p in range(points):
                        x = loc[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = loc[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(dim, dtype=value.dtype)
                        for yy, xx, c in (
                            (y0, x0, (y0 + 1 - y) * (x0 + 1 - x)),
                            (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                            (y0 + 1, x0, (y - y0) * (x0 + 1 - x)),
                            (y0 + 1, x0 + 1, (y - y0) * (x - x0)),
                        ):
                            if 0 <= yy < h and 0 <= xx < w:
                                acc += c * vmap[b, yy, xx, m]
                        out[b, q, m] += weights[b, q, m, lvl, p] * acc
    return out.reshape(b_, q_, heads * dim)


def grid_sample_msda(value, shapes, loc, weights):
    """The op as docs/upstream.md states it: F.grid_sample per level, weighted and summed."""
    b_, _, heads, dim = value.shape
    _, q_, _, levels, points, _ = loc.shape
    out, start = 0, 0
    for lvl, (h, w) in enumerate(shapes):
        vmap = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(b_ * heads, dim, h, w)
        start += h * w
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).reshape(b_ * heads, q_, points, 2)
        s = F.grid_sample(vmap, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = weights[:, :, :, lvl].transpose(1, 2).reshape(b_ * heads, 1, q_, points)
        out = out + (s * a).sum(-1)
    return out.view(b_, heads * dim, q_).transpose(1, 2)


def random_inputs(shapes, batch=2, queries=5, heads=2, dim=3, points=2, dtype=torch.float64, spread=1.4):
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, dim, dtype=dtype)
    # locations reach outside [0, 1] so border and outside samples are exercised
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=dtype) * spread - (spread - 1) / 2
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=dtype)
    return value, loc, weights


@pytest.mark.parametrize("shapes", [[(4, 5)], [(6, 4), (3, 2), (1, 1)]])
def test_reference_equals_naive(shapes):
    value, loc, weights = random_inputs(shapes)
    got = ms_deform_attn_reference(value, shapes, loc, weights)
    assert torch.allclose(got, naive_msda(value, shapes, loc, weights), atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_reference_and_gradients_equal_grid_sample(dtype, tol):
    """Values and all three gradients against grid_sample's autograd, points inside, on and beyond
    the border of maps of several sizes."""
    shapes = [(9, 7), (5, 4), (2, 3), (1, 1)]
    value, loc, weights = random_inputs(shapes, batch=3, queries=17, heads=4, dim=5, points=3, dtype=dtype, spread=2.0)
    results = []
    for fn in (lambda *a: ms_deform_attn_reference(a[0], shapes, *a[1:]), lambda *a: grid_sample_msda(a[0], shapes, *a[1:])):
        inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
        out = fn(*inputs)
        out.backward(torch.ones_like(out) + torch.arange(out.shape[-1], dtype=dtype))
        results.append([out] + [t.grad for t in inputs])
    for name, got, want in zip(("out", "grad_value", "grad_loc", "grad_weights"), *results):
        assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item()), name


def test_exact_pixel_centres_and_outside():
    """A point on a pixel centre returns that pixel; a point a full pixel outside returns zero."""
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)
    shapes = [(3, 4)]
    centre = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 3], dtype=torch.float64)
    outside = torch.tensor([-1.0 / 4, 0.5], dtype=torch.float64)
    loc = torch.stack([centre, outside]).view(1, 2, 1, 1, 1, 2)
    out = ms_deform_attn_reference(value, shapes, loc, torch.ones(1, 2, 1, 1, 1, dtype=torch.float64))
    assert out[0, 0, 0].item() == 1 * 4 + 2
    assert out[0, 1, 0].item() == 0


def test_reference_gradcheck():
    shapes = [(3, 4), (2, 2)]
    value, loc, weights = random_inputs(shapes, batch=1, queries=3, heads=2, dim=2, points=2, spread=1.0)
    inputs = tuple(t.requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_reference(v, shapes, l, a), inputs)


def test_public_op_contract_and_errors():
    shapes = [(4, 5), (2, 3)]
    value, loc, weights = random_inputs(shapes)
    spatial = torch.tensor(shapes)
    starts = torch.tensor([0, 20])
    out = vitadapter.ms_deform_attn(value, spatial, starts, loc, weights)
    assert torch.equal(out, ms_deform_attn_reference(value, shapes, loc, weights))
    with pytest.raises(ValueError, match="level_start_index"):
        vitadapter.ms_deform_attn(value, spatial, torch.tensor([0, 7]), loc, weights)
    with pytest.raises(ValueError, match="backend"):
        vitadapter.ms_deform_attn(value, spatial, starts, loc, weights, backend="cuda-magic")
    with pytest.raises(ValueError, match="value"):
        vitadapter.ms_deform_attn(value[0], spatial, starts, loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        vitadapter.ms_deform_attn(value, spatial, starts, loc, weights[..., :1])


def test_module_initialisation_follows_upstream():
    attn = MSDeformAttn(dim=16, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y, each point p at distance p+1, the same on every level
    assert torch.allclose(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(bias[1, 1, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(bias[0, 0], bias[0, 1])
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0


def test_module_offsets_are_in_level_pixels():
    """With zero offsets and weights the module averages value_proj at each reference point."""
    attn = MSDeformAttn(dim=4, num_heads=1, num_levels=1, num_points=2).double()
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    torch.nn.init.eye_(attn.value_proj.weight)
    torch.nn.init.eye_(attn.output_proj.weight)
    feats = torch.randn(1, 6, 4, dtype=torch.float64)
    ref = torch.tensor([[(1 + 0.5) / 3, (1 + 0.5) / 2]], dtype=torch.float64)
    out = attn(torch.randn(1, 1, 4, dtype=torch.float64), ref, feats, [(2, 3)])
    assert torch.allclose(out[0, 0], feats[0, 4])
    # one pixel offset in x moves to the next column
    attn.sampling_offsets.bias.data[0::2] = 1.0
    out = attn(torch.randn(1, 1, 4, dtype=torch.float64), ref, feats, [(2, 3)])
    assert torch.allclose(out[0, 0], feats[0, 5])

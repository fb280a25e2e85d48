"""The op ``vitadapter::ms_deform_attn``: Triton kernels (through the interpreter without a GPU) and
the reference backward against autograd of the reference forward; registrations; compile; autocast."""
import pytest
import torch

import vitadapter
from upstream_reference import grid_sample_deform_attn
from vitadapter.layers.msda_op import (
    _ms_deform_attn_fused_op,
    _ms_deform_attn_op,
    deform_attn_from_projections,
    ms_deform_attn_op,
    ms_deform_attn_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def make_inputs(shapes, batch=2, queries=7, heads=2, head_dim=8, points=2, dtype=torch.float32,
                device=DEVICE, spread=1.6, seed=0):
    """Random inputs; locations reach beyond the maps on every side."""
    gen = torch.Generator().manual_seed(seed)
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, head_dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64)
    loc = loc * spread - (spread - 1) / 2
    attn = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=torch.float64)
    spatial = torch.tensor(shapes, device=device)
    starts = torch.cumsum(spatial.prod(1), 0) - spatial.prod(1)
    return [t.to(device=device, dtype=dtype) for t in (value, loc, attn)], spatial, starts


def reference_with_autograd(value, shapes, loc, attn, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_reference(inputs[0], shapes, *inputs[1:])
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


def op_with_grads(value, spatial, starts, loc, attn, grad, backend):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_op(inputs[0], spatial, starts, inputs[1], inputs[2], backend)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


CASES = {
    # shapes, heads, head_dim, points, batch
    "one-level": ([(4, 5)], 2, 8, 2, 1),
    "three-levels-dim24": ([(6, 5), (3, 3), (2, 1)], 2, 24, 2, 2),
    "dim48-one-pixel-level": ([(5, 4), (1, 1)], 1, 48, 3, 2),
    "dim96-four-points": ([(3, 6)], 1, 96, 4, 1),
    "dim16-eight-points": ([(5, 3), (2, 2)], 2, 16, 8, 1),
    "four-levels-five-points": ([(4, 4), (3, 2), (2, 2), (1, 1)], 1, 32, 5, 1),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_equal_autograd_of_the_reference(case, backend):
    shapes, heads, head_dim, points, batch = CASES[case]
    (value, loc, attn), spatial, starts = make_inputs(shapes, batch=batch, heads=heads, head_dim=head_dim,
                                                      points=points)
    grad = torch.randn(batch, loc.shape[1], heads * head_dim, device=DEVICE)
    want = reference_with_autograd(value, shapes, loc, attn, grad)
    got = op_with_grads(value, spatial, starts, loc, attn, grad, backend)
    for name, g, w in zip(("out", "grad_value", "grad_locations", "grad_weights"), got, want):
        assert g.dtype == w.dtype
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item()), name


def test_border_centres_and_far_outside_points():
    """Locations on pixel centres, exactly on the map edges and far away, all three gradients."""
    shapes = [(3, 4), (2, 2)]
    (value, loc, attn), spatial, starts = make_inputs(shapes, batch=1, queries=6, heads=1, head_dim=4, points=2)
    edges = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.125, 1 / 6], [-5.0, 0.5], [0.5, 7.0], [1.0, 0.5]], device=DEVICE)
    loc[0, :, 0, :, 0] = edges.view(6, 1, 2)
    grad = torch.randn(1, 6, 4, device=DEVICE)
    want = reference_with_autograd(value, shapes, loc, attn, grad)
    got = op_with_grads(value, spatial, starts, loc, attn, grad, "triton")
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
    # far-away points contribute nothing and get no location gradient
    assert torch.count_nonzero(got[2][0, 3:5, 0, :, 0]) == 0


@pytest.mark.parametrize("batch,queries", [(0, 5), (2, 0)])
def test_reference_with_no_batch_or_no_queries_gives_empty_outputs_and_gradients(batch, queries):
    (value, loc, attn), spatial, starts = make_inputs([(4, 5), (2, 3)], batch=batch, queries=queries, device="cpu")
    grad = torch.randn(batch, queries, 2 * 8)
    out, grad_value, grad_loc, grad_attn = op_with_grads(value, spatial, starts, loc, attn, grad, "reference")
    assert out.shape == (batch, queries, 16)
    assert grad_value.shape == value.shape and grad_loc.shape == loc.shape and grad_attn.shape == attn.shape
    assert not grad_value.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_matches_float32(dtype):
    shapes = [(5, 6), (3, 3)]
    (value, loc, attn), spatial, starts = make_inputs(shapes, head_dim=24)
    ref = ms_deform_attn_reference(value, shapes, loc, attn)
    for backend in ("triton", "reference"):
        out = ms_deform_attn_op(value.to(dtype), spatial, starts, loc, attn.to(dtype), backend)
        assert out.dtype == dtype
        assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()), backend


def test_bfloat16_backward_accumulates_in_float32():
    """Many points landing on one pixel: bf16 atomics would lose most of the sum."""
    shapes = [(2, 2)]
    (value, loc, attn), spatial, starts = make_inputs(shapes, batch=1, queries=64, heads=1, head_dim=8, points=4)
    loc.fill_(0.25)  # every point on pixel (0, 0)
    grad = torch.randn(1, 64, 8, device=DEVICE)
    want = reference_with_autograd(value, shapes, loc, attn, grad)[1]
    got = op_with_grads(value.bfloat16(), spatial, starts, loc, attn.bfloat16(), grad.bfloat16(), "triton")[1]
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


# float64 gradchecks: gradcheck runs the forward twice per input element, and a Triton kernel costs
# ~0.07 s a call in the interpreter, so the kernels get the smallest inputs that still have two
# levels, two heads, two channels and two queries (points per level, larger maps and the border are
# covered entry by entry against autograd of the reference above); the reference gets more. For
# the kernels, every entry of the Jacobian their backward gives (one backward per output element)
# must equal the reference's, which the full gradcheck here proves right, and gradcheck's fast mode
# (finite differences along random directions, a few kernel calls instead of ~110) checks the
# kernels' backward against their own forward: together what a full gradcheck of the kernels
# proved, at a tenth of the interpreter time (16 s before).
GRADCHECK_SIZES = {
    "triton": dict(shapes=[(2, 3), (1, 2)], queries=2, heads=2, head_dim=2, points=1),
    "reference": dict(shapes=[(3, 4), (2, 2)], queries=3, heads=2, head_dim=3, points=2),
}


def assert_jacobians_equal(fn, reference_fn, inputs):
    """Every entry of d fn / d inputs (one backward per output element) equals the reference's."""
    got = torch.autograd.functional.jacobian(fn, inputs)
    want = torch.autograd.functional.jacobian(reference_fn, inputs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert w.abs().max() > 0 and torch.allclose(g, w, rtol=1e-9, atol=1e-12), f"input {i}"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_op_gradcheck_float64(backend):
    sizes = dict(GRADCHECK_SIZES[backend])
    (value, loc, attn), spatial, starts = make_inputs(sizes.pop("shapes"), batch=1, dtype=torch.float64, spread=1.0,
                                                      **sizes)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))

    def op(backend):
        return lambda v, l, a: ms_deform_attn_op(v, spatial, starts, l, a, backend)

    if backend == "triton":
        assert_jacobians_equal(op("triton"), op("reference"), inputs)
    assert torch.autograd.gradcheck(op(backend), inputs, atol=1e-6, fast_mode=backend == "triton")
    if backend == "reference":  # the reference's Jacobian at the kernels' sizes too, all entries
        small = dict(GRADCHECK_SIZES["triton"])
        (value, loc, attn), spatial, starts = make_inputs(small.pop("shapes"), batch=1, dtype=torch.float64,
                                                          spread=1.0, **small)
        assert torch.autograd.gradcheck(op(backend), tuple(t.requires_grad_() for t in (value, loc, attn)), atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_op_registrations_pass_opcheck(backend):
    shapes = [(3, 4), (2, 2)]
    (value, loc, attn), spatial, starts = make_inputs(shapes, batch=1, queries=3, heads=2, head_dim=4)
    args = (value.requires_grad_(), spatial, starts, loc.requires_grad_(), attn.requires_grad_(), backend)
    torch.library.opcheck(_ms_deform_attn_op, args)


def test_compiles_fullgraph_with_no_graph_break():
    shapes = [(4, 5), (2, 3)]
    (value, loc, attn), spatial, starts = make_inputs(shapes)

    def fn(v, l, a):
        return vitadapter.ms_deform_attn(v, spatial, starts, l, a).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    compiled(*inputs).backward()
    ref = [t.clone().requires_grad_() for t in (value, loc, attn)]
    fn(*ref).backward()
    for a, b in zip(inputs, ref):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_autocast_keeps_bfloat16_and_model_runs_on_triton_backend():
    """Under autocast the op takes the dtypes it is given; the adapter runs on either backend. One
    interaction has every call site of the op (injector, extractor, the two extra extractors): four
    kernel calls a forward instead of ten, each ~0.25 s in the interpreter."""
    model = vitadapter.create_model("vit_adapter_t", embed_dim=24, depth=1, num_heads=3, deform_num_heads=3,
                                    conv_inplane=8, interaction_indexes=[0],
                                    vit_feature_source="final").eval().to(DEVICE)
    image = torch.randn(1, 3, 32, 64, device=DEVICE)  # small: the kernels run in the interpreter without a GPU
    with torch.no_grad():
        ref = model(image)
        for m in model.modules():
            if isinstance(m, vitadapter.layers.MSDeformAttn):
                m.backend = "triton"
        out = model(image)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            low = model(image)
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert low[0].dtype == torch.bfloat16


def make_projections(shapes, batch=2, queries=7, heads=2, head_dim=8, points=2, dtype=torch.float32, seed=0):
    """Inputs of the fused path: reference points, pixel offsets reaching off the maps, logits."""
    gen = torch.Generator().manual_seed(seed)
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, head_dim, generator=gen, dtype=torch.float64)
    ref = torch.rand(queries, 2, generator=gen, dtype=torch.float64)
    offsets = torch.randn(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64) * 3
    logits = torch.randn(batch, queries, heads, len(shapes) * points, generator=gen, dtype=torch.float64) * 2
    return [t.to(device=DEVICE, dtype=dtype) for t in (value, ref, offsets, logits)]


def fused_with_grads(value, shapes, ref, offsets, logits, grad, backend):
    inputs = [t.detach().clone().requires_grad_() for t in (value, offsets, logits)]
    out = deform_attn_from_projections(inputs[0], shapes, ref, inputs[1], inputs[2], backend)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernel_equals_the_reference_path(case):
    """Softmax and location math inside the Triton kernel = the same math as PyTorch ops around
    the reference, values and gradients for value, offsets and logits."""
    shapes, heads, head_dim, points, batch = CASES[case]
    value, ref, offsets, logits = make_projections(shapes, batch=batch, heads=heads, head_dim=head_dim, points=points)
    grad = torch.randn(batch, ref.shape[0], heads * head_dim, device=DEVICE)
    want = fused_with_grads(value, shapes, ref, offsets, logits, grad, "reference")
    got = fused_with_grads(value, shapes, ref, offsets, logits, grad, "triton")
    for name, g, w in zip(("out", "grad_value", "grad_offsets", "grad_logits"), got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item()), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_inference_path_equals_grid_sample_and_the_op_path(case, dtype):
    """Without a graph to record, the reference path samples straight from pixel offsets (no op
    dispatch, no [0, 1] locations). It must give what upstream's grid_sample computation gives, and
    what the custom op gives when autograd records; points reach off the maps on every side."""
    shapes, heads, head_dim, points, batch = CASES[case]
    value, ref, offsets, logits = make_projections(shapes, batch=batch, heads=heads, head_dim=head_dim,
                                                   points=points, dtype=dtype, seed=3)
    value, ref, offsets, logits = (t.cpu() for t in (value, ref, offsets, logits))
    with torch.no_grad():
        eager = deform_attn_from_projections(value, shapes, ref, offsets, logits, "reference")
    recorded = deform_attn_from_projections(value, shapes, ref, offsets.requires_grad_(), logits, "reference")
    weights = logits.double().softmax(-1).view(*offsets.shape[:-1])
    want = grid_sample_deform_attn(value.double(), shapes, ref.double(), offsets.detach().double(), weights)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert eager.dtype == recorded.dtype == dtype
    for got in (eager, recorded.detach()):
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_fused_gradcheck_float64_and_opcheck():
    sizes = dict(GRADCHECK_SIZES["triton"])
    shapes = sizes.pop("shapes")
    value, ref, offsets, logits = make_projections(shapes, batch=1, dtype=torch.float64, **sizes)
    inputs = tuple(t.requires_grad_() for t in (value, offsets, logits))

    def fused(backend):
        return lambda v, o, lg: deform_attn_from_projections(v, shapes, ref, o, lg, backend)

    assert_jacobians_equal(fused("triton"), fused("reference"), inputs)
    assert torch.autograd.gradcheck(fused("triton"), inputs, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(fused("reference"), inputs, atol=1e-6)
    spatial = torch.tensor(shapes, device=DEVICE)
    starts = torch.cumsum(spatial.prod(1), 0) - spatial.prod(1)
    torch.library.opcheck(_ms_deform_attn_fused_op, (value, spatial, starts, ref, offsets, logits))


def test_backend_errors_are_named(monkeypatch):
    shapes = [(2, 2)]
    (value, loc, attn), spatial, starts = make_inputs(shapes, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        vitadapter.ms_deform_attn(value, spatial, starts, loc, attn, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        vitadapter.ms_deform_attn(value, spatial, starts, loc, attn, backend="triton")


# ---- GPU: real ViT-Adapter shapes against a float64 reference (skipped without CUDA) ------------

REAL_SHAPES = {
    # B@512: injector (Q=1024 on 3 levels), extractor (Q=5376 on the 32x32 ViT grid)
    "injector-b512": ([(64, 64), (32, 32), (16, 16)], 1024, 12, 32),
    "extractor-b512": ([(32, 32)], 5376, 12, 32),
    "extractor-s512-dim64": ([(32, 32)], 5376, 6, 64),
}
# Bounds, relative to the largest |reference| value: fp32 accumulation order only (fp32), or
# bf16 rounding of inputs and output (~2^-8), summed over up to 48 samples.
GPU_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(REAL_SHAPES))
def test_gpu_real_shapes_against_float64(case, dtype):
    shapes, queries, heads, head_dim = REAL_SHAPES[case]
    (value, loc, attn), spatial, starts = make_inputs(shapes, batch=2, queries=queries, heads=heads,
                                                      head_dim=head_dim, points=4, dtype=torch.float64, spread=1.2)
    grad = torch.randn(2, queries, heads * head_dim, device="cuda", dtype=torch.float64)
    want = reference_with_autograd(value, shapes, loc, attn, grad)
    got = op_with_grads(value.to(dtype), spatial, starts, loc.float(), attn.to(dtype), grad.to(dtype), "triton")
    for name, g, w in zip(("out", "grad_value", "grad_locations", "grad_weights"), got, want):
        err = (g.double() - w).abs().max().item() / w.abs().max().item()
        assert err <= GPU_TOLERANCE[dtype], f"{name}: {err:.2e}"

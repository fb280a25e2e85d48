"""ViTAdapter behaviour: any input size, training, bad input, the registry and timm's feature API."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitadapter
from conftest import load_fixture, max_rel_err
from vitadapter._meta import meta_device

TINY = dict(embed_dim=48, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8)


def tiny(**kwargs):
    return vitadapter.create_model("vit_adapter_t", **{**TINY, **kwargs})


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (70, 50), (100, 161)])
def test_any_size_gives_ceil_maps(size):
    model = tiny().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    for out, stride in zip(outs, (4, 8, 16, 32)):
        assert out.shape == (1, 48, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(out).all()


def test_odd_size_is_the_zero_padded_multiple_of_32_cropped():
    model = tiny().eval()
    image = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        outs = model(image)
        padded = model(F.pad(image, (0, 14, 0, 26)))
    for out, ref in zip(outs, padded):
        assert torch.allclose(out, ref[..., : out.shape[-2], : out.shape[-1]], atol=1e-5)


def test_matches_upstream_on_a_different_size_than_the_fixture():
    """Resizing the position grid to a new size is what upstream does: a 2x larger input still runs,
    and its padded odd neighbour is consistent with it."""
    meta, ckpt, _ = load_fixture("det_vit")
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt).eval()
    image = torch.randn(1, 3, 224, 288)
    with torch.no_grad():
        outs = model(image)
    assert [tuple(o.shape[-2:]) for o in outs] == [(56, 72), (28, 36), (14, 18), (7, 9)]


def test_training_backward_reaches_every_parameter():
    model = tiny(drop_path_rate=0.2).train()
    outs = model(torch.randn(2, 3, 64, 96))
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    # injector gammas start at 0: their gradient must still flow
    assert model.interactions[0].injector.gamma.grad.abs().sum() > 0


def test_training_updates_batchnorm_statistics_and_drop_path_is_random():
    model = tiny(drop_path_rate=0.5).train()
    before = model.norm1.running_mean.clone()
    image = torch.randn(2, 3, 64, 64)
    a, b = model(image), model(image)
    assert not torch.equal(before, model.norm1.running_mean)
    assert not torch.allclose(a[2], b[2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(image)[2], model(image)[2])


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny(drop_path_rate=0.0).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    image = torch.randn(1, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        sum(o.sum() for o in model(image)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (torch.randn(1, 1, 64, 64), ValueError, "channels"),
        (torch.randn(3, 64, 64), ValueError, "4-D"),
        (torch.randn(1, 3, 31, 64), ValueError, "at least 32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.int64), TypeError, "floating"),
        ([[1.0]], TypeError, "Tensor"),
    ],
)
def test_bad_input_is_named(bad, error, words):
    with pytest.raises(error, match=words):
        tiny()(bad)


def test_unknown_model_name_or_tag_is_named():
    with pytest.raises(ValueError, match="vit_adapter_xxl"):
        vitadapter.create_model("vit_adapter_xxl")
    with pytest.raises(ValueError, match="vit_adapter_t.nonsense"):
        vitadapter.create_model("vit_adapter_t.nonsense")
    # a bare architecture name stands for its default tag (weights: tests/test_weights.py)
    assert vitadapter.create_model("vit_adapter_t", **TINY).pretrained_cfg["tag"] == "deit_in1k"


def test_checkpoint_that_does_not_fit_names_the_keys():
    meta, ckpt, _ = load_fixture("seg_vit")
    cfg = dict(meta["backbone"], embed_dim=48, num_heads=3)
    with pytest.raises(ValueError, match="shape mismatches: .*attention_weights.weight: checkpoint \\(24, 96\\) vs model \\(24, 48\\)"):
        vitadapter.load_upstream(cfg, "segmentation", ckpt)
    cfg = dict(meta["backbone"], use_extra_extractor=False)
    with pytest.raises(ValueError, match="unexpected keys: interactions.3.extra_extractors"):
        vitadapter.load_upstream(cfg, "segmentation", ckpt)


# parameter counts of the upstream classes (docs/upstream.md, "Released configurations"; their ViT
# part includes the unused cls slot of pos_embed)
UPSTREAM_PARAMS = {"t": 7_966_640, "s": 27_503_888, "b": 99_495_392, "l": 326_973_632}
UPSTREAM_ADAPTER = {"t": 2_438_192, "s": 5_830_160, "b": 13_680_608, "l": 23_236_800}


@pytest.mark.parametrize("size", ["t", "s", "b", "l"])
def test_parameter_counts_match_upstream(size):
    with meta_device():
        model = vitadapter.create_model(f"vit_adapter_{size}")
    total = sum(p.numel() for p in model.parameters())
    adapter = total - sum(p.numel() for p in model.vit.parameters())
    assert adapter == UPSTREAM_ADAPTER[size]
    assert abs(total - UPSTREAM_PARAMS[size]) / UPSTREAM_PARAMS[size] < 1e-3


@pytest.mark.parametrize("name", ["vit_adapter_l_det", "beitv2_adapter_l_896", "vit_adapter_dinov3_s", "mask2former_beit_adapter_b_512"])
def test_meta_device_builds_what_torch_device_meta_builds(name):
    """meta_device() (the tests' and the catalog's fast meta builds) skips only value writes: same
    parameters, buffers, dtypes and model_args as torch.device("meta"); tensors elsewhere are written."""
    with torch.device("meta"):
        plain = vitadapter.create_model(name)
    with meta_device():
        fast = vitadapter.create_model(name)
        cpu = torch.zeros(3, device="cpu").add_(1).mul_(2)
    layout = lambda m: [(k, v.shape, v.dtype, v.device.type) for k, v in m.state_dict().items()]  # noqa: E731
    assert layout(fast) == layout(plain) and len(layout(plain)) > 100
    assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in plain.parameters()]
    backbone = getattr(fast, "backbone", fast)
    assert backbone.model_args == getattr(plain, "backbone", plain).model_args
    assert cpu.tolist() == [2.0, 2.0, 2.0]


def test_timm_create_model_and_features_only():
    model = timm.create_model("vit_adapter_t", features_only=True, **TINY).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [48] * 4
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[-1] for o in outs] == [24, 12, 6, 3]
    picked = timm.create_model("vit_adapter_t", features_only=True, out_indices=(1, 3), **TINY)
    assert picked.feature_info.reduction() == [8, 32]


def test_forward_intermediates_selects_levels_and_format():
    model = tiny().eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(image)
        final, picked = model.forward_intermediates(image, indices=[0, 2], output_fmt="NHWC")
    assert torch.equal(final, full[3].permute(0, 2, 3, 1))
    assert torch.equal(picked[1], full[2].permute(0, 2, 3, 1))
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]


def test_layer_decay_groups_follow_upstream():
    """Embeddings in the first group, block i in group i+1, the adapter with the last blocks' lr."""
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = tiny()
    group_of = {n: g for g, names in group_parameters(model, model.group_matcher()).items() for n in names}
    assert group_of["vit.pos_embed"] == group_of["vit.patch_embed.proj.weight"] == 0
    assert [group_of[f"vit.blocks.{i}.norm1.weight"] for i in range(4)] == [1, 2, 3, 4]
    assert group_of["spm.fc1.weight"] == group_of["interactions.0.injector.gamma"] == 5
    groups = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, layer_decay=0.5).param_groups
    assert max(g["lr_scale"] for g in groups) == 1.0 and min(g["lr_scale"] for g in groups) == 0.5 ** 5
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(model.named_parameters())
    assert set(model.no_weight_decay()) <= set(params)
    assert all(id(params[n]) in no_decay for n in model.no_weight_decay())


def test_bfloat16_autocast_and_bfloat16_weights_stay_close_to_float32():
    """Locations are computed in float32 whatever the dtype, so low precision costs little."""
    model = tiny().eval()
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(image)
        low = model.to(torch.bfloat16)(image.bfloat16())
    for outs in (mixed, low):
        for out, r in zip(outs, ref):
            assert max_rel_err(out.float(), r) < 3e-2
    assert all(o.dtype == torch.bfloat16 for o in low)


def test_spatial_prior_folds_batchnorm_into_its_convs_outside_training_only():
    """Eval runs each conv + BatchNorm pair as one folded conv: the same maps up to float rounding;
    training runs the modules themselves (batch statistics, running averages updated)."""
    from vitadapter.layers import SpatialPriorModule

    torch.manual_seed(0)
    spm = SpatialPriorModule(dim=24, inplanes=8)
    for m in spm.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    image = torch.randn(2, 3, 64, 96)

    def unfolded(x):
        c1 = spm.stem(x)
        c2 = spm.conv2(c1)
        c3 = spm.conv3(c2)
        c4 = spm.conv4(c3)
        return [spm.fc1(c1), spm.fc2(c2), spm.fc3(c3), spm.fc4(c4)]

    spm.eval()
    with torch.no_grad():
        for got, want in zip(spm(image), unfolded(image)):
            assert max_rel_err(got, want) < 1e-5
    # with autograd on, the folded path still reaches the convs and the norms' affine parameters
    sum(o.square().mean() for o in spm(image)).backward()
    assert spm.stem[0].weight.grad.abs().sum() > 0 and spm.conv4[1].weight.grad.abs().sum() > 0
    spm.zero_grad()
    spm.train()
    before = spm.stem[1].running_mean.clone()
    got = spm(image)
    assert not torch.equal(before, spm.stem[1].running_mean)
    with torch.no_grad():
        for g, want in zip(got, unfolded(image)):
            assert torch.equal(g.detach(), want)


def test_extractor_sums_inside_its_matmuls_only_where_nothing_records():
    """Without autograd the extractor's residual sums go inside its output matmuls (addmm writing
    into the residual). That must equal the plain c + attn(c) and c + ffn(c), equal the recorded
    path, which autograd differentiates, and count the same FLOPs (the catalog and the benchmark
    divide by them)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny().eval()
    extractor = model.interactions[0].extractor
    torch.manual_seed(0)
    for p in extractor.parameters():  # upstream's init zeroes some projections: make every term count
        torch.nn.init.normal_(p, std=0.2)
    c = torch.randn(2, 16 + 4 + 1, 48)
    x = torch.randn(2, 4, 48)
    grids = [(4, 4), (2, 2), (1, 1)]
    points = torch.rand(c.shape[1], 2)
    with torch.no_grad():
        mid = c + extractor.attn(extractor.query_norm(c), points, extractor.feat_norm(x), [(2, 2)])
        want = mid + extractor.ffn(extractor.ffn_norm(mid), grids)
        with FlopCounterMode(display=False) as counted_eager:
            eager = extractor(c, x, points, (2, 2), grids)
    leaf = c.clone().requires_grad_()
    with FlopCounterMode(display=False) as counted_recorded:
        recorded = extractor(leaf, x, points, (2, 2), grids)
    assert max_rel_err(eager, want) < 1e-6 and max_rel_err(recorded.detach(), want) < 1e-6
    assert counted_eager.get_total_flops() == counted_recorded.get_total_flops() > 0
    recorded.square().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    # layers with hooks (or replaced by wrappers) are called as modules, and give the same sums
    calls = []
    for layer in (extractor.attn.output_proj, extractor.ffn.fc2, extractor.attn.sampling_offsets):
        layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        hooked = extractor(c, x, points, (2, 2), grids)
    assert len(calls) == 3 and max_rel_err(hooked, want) < 1e-6


def test_extractor_residual_stays_in_the_pyramid_dtype_under_autocast():
    """Under autocast the residual sums are not taken inside the (bfloat16) matmuls: the bfloat16
    branch output is added to the float32 pyramid, which keeps its dtype."""
    model = tiny().eval()
    block = model.interactions[0]
    c = torch.randn(1, 16 + 4 + 1, 48)
    x = torch.randn(1, 4, 48)
    grids = [(4, 4), (2, 2), (1, 1)]
    points = torch.rand(c.shape[1], 2)
    with torch.no_grad():
        plain = block.extract(c, x, points, (2, 2), grids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = block.extract(c, x, points, (2, 2), grids)
    assert plain.dtype == mixed.dtype == torch.float32
    assert max_rel_err(mixed, plain) < 3e-2

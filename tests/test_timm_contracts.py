"""The contracts timm's own model tests check, on the registered models."""
import pytest
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

import vitadapter
from vitadapter._meta import meta_device

TINY = dict(embed_dim=24, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8)


def test_create_model_takes_device_and_dtype():
    model = timm.create_model("vit_adapter_t", device="cpu", dtype=torch.float64, **TINY)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64, dtype=torch.float64))[0].dtype == torch.float64


def test_forward_intermediates_final_equals_forward_features_and_head_attributes():
    model = timm.create_model("vit_adapter_t", **TINY).eval()
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, levels = model.forward_intermediates(image)
        features = model.forward_features(image)
        pooled = model.forward_head(features)
    assert torch.equal(final, features) and torch.equal(features, levels[-1])
    assert pooled.shape == (2, 24) and torch.allclose(pooled, features.mean((2, 3)))
    assert model.num_classes == 0 and model.head_hidden_size == model.num_features == 24
    assert isinstance(model.get_classifier(), nn.Identity)
    model.reset_classifier(0)
    with pytest.raises(ValueError, match="feature backbone without a classifier"):
        model.reset_classifier(10)


def test_torchscript_is_refused_with_a_clear_message():
    with pytest.raises(TypeError, match="does not support TorchScript.*torch.compile"):
        torch.jit.script(vitadapter.create_model("vit_adapter_t", **TINY))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_rgb_weights_adapt_both_input_convolutions_as_timm_does(tmp_path, in_chans):
    from timm.models import adapt_input_conv

    rgb = vitadapter.create_model("vit_adapter_t", **TINY)
    vitadapter.save_pretrained(rgb, tmp_path / "rgb")
    model = vitadapter.create_model(
        "vit_adapter_t", in_chans=in_chans, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb" / "model.safetensors")), **TINY,
    )
    assert model.pretrained_cfg["first_conv"] == ("vit.patch_embed.proj", "spm.stem.0")
    for name in ("vit.patch_embed.proj.weight", "spm.stem.0.weight"):
        weight, source = model.state_dict()[name], rgb.state_dict()[name]
        assert weight.shape[1] == in_chans
        assert torch.equal(weight, adapt_input_conv(in_chans, source))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, in_chans, 64, 64))[0].shape == (1, 24, 16, 16)


@pytest.mark.parametrize("out_indices", [(0, 1), (3,), (1, 3), (0,)])
def test_a_subset_of_levels_uses_every_parameter(out_indices):
    model = timm.create_model("vit_adapter_t", features_only=True, out_indices=out_indices, **TINY).train()
    maps = model(torch.randn(2, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [64 // (4 * 2**i) for i in out_indices]
    sum(m.square().mean() for m in maps).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_pruned_levels_are_refused_by_forward_intermediates():
    model = vitadapter.create_model("vit_adapter_t", **TINY).eval()
    assert model.prune_intermediate_layers((1, 2)) == [1, 2]
    assert isinstance(model.norm1, nn.Identity) and isinstance(model.up, nn.Identity) and isinstance(model.norm4, nn.Identity)
    with torch.no_grad():
        assert [m.shape[-1] for m in model(torch.randn(1, 3, 64, 64))] == [8, 4]
        with pytest.raises(ValueError, match=r"levels \[3\] were pruned"):
            model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[3])


def test_ddp_without_find_unused_parameters_trains_a_level_subset(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = timm.create_model("vit_adapter_t", features_only=True, out_indices=(3,), **TINY)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for _ in range(2):  # an unused parameter fails DDP's second step
            loss = ddp(torch.randn(2, 3, 64, 64))[0].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


# One architecture of each registered backbone family and flavour: upstream's ViT (segmentation and
# detection forwards), BEiT (cls token; windows), DINOv2 (patch 14, registers), DINOv3 (extractor-only)
FAMILIES = ["vit_adapter_t", "vit_adapter_s_det", "beit_adapter_b_512", "beitv2_adapter_l_det",
            "vit_adapter_dinov2_reg4_s", "vit_adapter_dinov3_s_plus"]


def shrunk(name, **kwargs):
    """A registered architecture at 64 wide and 4 blocks, its other arguments as registered."""
    with meta_device():
        args = vitadapter.create_model(name).model_args
    small = dict(embed_dim=64, depth=4, num_heads=4)
    window = None if args["window_size"] is None else [7] * 3 + [14]
    common = dict(interaction_indexes=[0, 1, 2, 3], deform_num_heads=4, conv_inplane=16, window_size=window)
    if args["trunk"] is None:
        common.update(small)
    else:
        common["trunk_kwargs"] = dict(args["trunk_kwargs"], **small)
    return timm.create_model(name, **{**common, **kwargs})


@pytest.mark.parametrize("name", FAMILIES)
def test_prune_intermediate_layers_contract(name):
    """timm's contract: pruning at the last index with prune_head=False leaves model(x) as it was;
    with prune_head (timm's default, what features_only uses) forward_intermediates still gives the
    kept levels as before."""
    model = shrunk(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        assert model.prune_intermediate_layers([3], prune_head=False) == [3]
        after = model(x)
    assert len(after) == len(before) == 4
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    with torch.no_grad():
        assert model.prune_intermediate_layers([1, 3]) == [1, 3]
        kept = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        narrowed = model(x)
    assert all(torch.equal(a, b) for a, b in zip(kept, [before[1], before[3]]))
    assert all(torch.equal(a, b) for a, b in zip(narrowed, kept))


@pytest.mark.parametrize("name", [*FAMILIES, "upernet_vit_adapter_t", "mask2former_beit_adapter_b_512"])
def test_plain_safetensors_round_trip_of_every_family(tmp_path, name):
    """safetensors refuses non-contiguous tensors (channels-last weights among them): a plain
    save_file of the state dict works and loads back bit for bit."""
    model = shrunk(name, **({"num_classes": 5} if name.startswith(("upernet", "mask2former")) else {}))
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_standard_rates_are_taken_by_every_family(name):
    """drop_rate, attn_drop_rate and drop_path_rate reach the trunk alike in every family: dropout
    after the position embedding and in the blocks' projections, in attention, stochastic depth."""
    model = shrunk(name, drop_rate=0.25, attn_drop_rate=0.125, drop_path_rate=0.375)
    rates = {m.p for m in model.vit.modules() if isinstance(m, nn.Dropout)}
    assert {0.25, 0.125} <= rates
    assert isinstance(model.vit.pos_drop, nn.Dropout) and model.vit.pos_drop.p == 0.25
    # timm's stochastic depth rises linearly over the blocks, to the rate at the last
    assert max(getattr(m, "drop_prob", 0.0) for m in model.vit.modules()) == pytest.approx(0.375)


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_only_arguments_are_accepted_as_no_ops_or_refused_with_the_reason(name):
    assert shrunk(name, output_stride=32, global_pool="avg").model_args == shrunk(name).model_args
    with pytest.raises(ValueError, match="output_stride=16 is not supported: ViT-Adapter has no dilation"):
        shrunk(name, output_stride=16)
    with pytest.raises(ValueError, match="global_pool='token' is not supported"):
        shrunk(name, global_pool="token")


@pytest.mark.parametrize("name", ["upernet_vit_adapter_t", "mask2former_beit_adapter_b_512"])
def test_features_only_on_a_segmentor_points_at_its_backbone(name):
    with pytest.raises(ValueError, match=r"is a task model .* segmentor\.backbone"):
        timm.create_model(name, features_only=True)
    with pytest.raises(ValueError, match="output_stride=8 is not supported"):
        timm.create_model(name, output_stride=8)


def test_a_trunk_module_keeps_its_own_dropout():
    trunk = timm.create_model("vit_small_patch16_224", img_size=64, embed_dim=48, depth=4, num_heads=3, num_classes=0)
    with pytest.raises(ValueError, match="a module keeps its own dropout"):
        vitadapter.create_model("vit_adapter", trunk=trunk, drop_rate=0.1, conv_inplane=16, deform_num_heads=3)

"""The contracts timm's own model tests check, on the registered models."""
import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

import vitadapter

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

"""Any timm ViT as the trunk: BEiT, DINOv2 and DINOv3 against their authors' code, and the general cases."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import vitadapter
from conftest import backbone_archs, load_fixture, max_rel_err
from vitadapter._meta import meta_device

DINO = Path(__file__).parent / "fixtures" / "dino_adapters"


def _dino_fixture(name):
    meta = json.loads((DINO / f"{name}_adapter.json").read_text())
    if name == "dinov2":
        config = meta["constructor"]["kwargs"]
    else:
        config = {"vit": meta["vit"]["kwargs"], "adapter": meta["constructor"]["kwargs"]}
    return meta, config, DINO / f"{name}_adapter.pth", load_file(DINO / f"{name}_adapter_io.safetensors")


@pytest.mark.parametrize("name", ["seg_beit", "det_beit"])
def test_beit_matches_upstream_fixture(name):
    meta, ckpt, io = load_fixture(name)
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt).eval()
    assert isinstance(model.vit, timm.models.beit.Beit)
    with torch.no_grad():
        outs = model(io["input"])
    assert [list(o.shape) for o in outs] == meta["output_shapes"]
    for i, out in enumerate(outs):
        assert max_rel_err(out, io[f"out{i}"]) <= 1e-4, f"level {i}"


@pytest.mark.parametrize("name", ["dinov2", "dinov3"])
def test_dino_adapters_match_their_authors(name):
    meta, config, ckpt, io = _dino_fixture(name)
    model = vitadapter.load_upstream(config, name, ckpt).eval()
    with torch.no_grad():
        outs = model(io["input"])
    assert [list(o.shape) for o in outs] == meta["output_shapes"]
    for i, out in enumerate(outs):
        assert max_rel_err(out, io[f"out{i}"]) <= 1e-4, f"level {i}"


def test_dinov3_checkpoint_in_a_state_dict_wrapper_and_frozen():
    _, config, ckpt, io = _dino_fixture("dinov3")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = vitadapter.load_upstream(config, "dinov3", {"model": state}).eval()
    assert model.extractor_only and model.freeze_trunk
    assert all(i.injector is None for i in model.interactions)
    with torch.no_grad():
        assert max_rel_err(model(io["input"])[2], io["out2"]) <= 1e-4


def test_beit_bias_on_its_own_grid_equals_timm():
    """On the table's own grid the bias (cls rows included) is exactly timm's lookup."""
    beit = timm.create_model("beit_base_patch16_224", img_size=64, depth=1, embed_dim=48, num_heads=3, num_classes=0)
    torch.nn.init.normal_(beit.blocks[0].attn.relative_position_bias_table)
    driver = vitadapter.trunks.driver_for(beit)
    attn = beit.blocks[0].attn
    ours = driver._bias(attn.relative_position_bias_table, tuple(attn.window_size), (4, 4), True)
    assert torch.equal(ours, attn._get_rel_pos_bias())


def test_beit_any_grid_and_batch():
    """Odd sizes on a BEiT trunk: right shapes, finite, items independent of their batch."""
    model = vitadapter.create_model(
        "vit_adapter", trunk="beit_base_patch16_224", conv_inplane=16, deform_num_heads=3,
        trunk_kwargs=dict(img_size=64, embed_dim=48, depth=4, num_heads=3, init_values=0.1),
    ).eval()
    x = torch.randn(2, 3, 70, 101)
    with torch.no_grad():
        both, first = model(x), model(x[:1])
    assert [tuple(o.shape[-2:]) for o in both] == [(18, 26), (9, 13), (5, 7), (3, 4)]
    for a, b in zip(both, first):
        assert torch.isfinite(a).all() and max_rel_err(a[:1], b) <= 1e-4


@pytest.mark.parametrize(
    "trunk, kwargs",
    [
        ("vit_small_patch14_reg4_dinov2", dict(img_size=56, embed_dim=48, depth=4, num_heads=3)),
        ("vit_small_patch14_dinov2", dict(img_size=56, embed_dim=48, depth=5, num_heads=3)),
        ("deit3_small_patch16_224", dict(img_size=64, embed_dim=48, depth=4, num_heads=3)),
        ("vit_small_patch16_dinov3", dict(embed_dim=48, depth=4, num_heads=3)),
        ("eva02_tiny_patch14_224", dict(img_size=56, embed_dim=48, depth=4, num_heads=3)),
    ],
)
@pytest.mark.parametrize("extractor_only", [False, True])
def test_families_at_odd_sizes_train_every_parameter(trunk, kwargs, extractor_only):
    """Sizes that are multiples of neither 14, 16 nor 32, batch 2: shapes, and a backward pass that
    reaches every trainable parameter (the trunk's final norm only where it is used)."""
    model = vitadapter.create_model(
        "vit_adapter", trunk=trunk, trunk_kwargs=kwargs, conv_inplane=16, deform_num_heads=3,
        extractor_only=extractor_only,
    ).train()
    x = torch.randn(2, 3, 75, 93)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, 48, 19, 24), (2, 48, 10, 12), (2, 48, 5, 6), (2, 48, 3, 3)]
    sum(o.float().square().mean() for o in outs).backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unreached
    # layer scale and injector gammas start at 0: the injectors' own weights get gradients only
    # once the gammas move, but the gammas themselves must
    gammas = [p for n, p in model.named_parameters() if n.endswith("injector.gamma")]
    assert all(g.grad.abs().sum() > 0 for g in gammas)


@pytest.mark.parametrize("extractor_only", [False, True])
def test_frozen_trunk(extractor_only):
    model = vitadapter.create_model(
        "vit_adapter", trunk="vit_small_patch14_dinov2", conv_inplane=16, deform_num_heads=3,
        trunk_kwargs=dict(img_size=56, embed_dim=48, depth=4, num_heads=3, drop_path_rate=0.5),
        freeze_trunk=True, extractor_only=extractor_only,
    ).train()
    assert not model.vit.training and model.spm.training
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is None for p in model.vit.parameters())
    adapter = [p for n, p in model.named_parameters() if not n.startswith("vit.")]
    # without injectors nothing but the extractors and pyramid sees the trunk; with them all adapter parts train
    assert all(p.grad is not None for p in adapter)


def test_wraps_a_user_module_without_copying():
    vit = timm.create_model("vit_small_patch14_dinov2", img_size=56, embed_dim=48, depth=4, num_heads=3, num_classes=0)
    weight = vit.blocks[0].attn.qkv.weight
    model = vitadapter.ViTAdapter(trunk=vit, conv_inplane=16, deform_num_heads=3)
    assert model.vit is vit and model.vit.blocks[0].attn.qkv.weight is weight
    assert model.model_args["trunk"] == "vit_small_patch14_dinov2"


def test_unsupported_trunks_and_configs_are_named():
    with pytest.raises(ValueError, match="ResNet.*VisionTransformer"):
        vitadapter.ViTAdapter(trunk=timm.create_model("resnet18", num_classes=0))
    with pytest.raises(ValueError, match="unknown timm model"):
        vitadapter.ViTAdapter(trunk="not_a_model")
    with pytest.raises(ValueError, match="trunk_kwargs"):
        vitadapter.ViTAdapter(trunk="vit_small_patch14_dinov2", embed_dim=96)
    with pytest.raises(ValueError, match="windowed attention"):
        vitadapter.ViTAdapter(trunk="vit_small_patch14_dinov2", window_size=[7] * 12,
                              trunk_kwargs=dict(img_size=56))
    with pytest.raises(ValueError, match="entry 12"):
        vitadapter.ViTAdapter(interaction_indexes=[2, 5, 8, 12])


def test_interaction_indexes_of_any_count():
    """Upstream's detection forward (and its segmentation forward without ViT features) runs any
    number of interactions; block numbers and ranges mean the same."""
    small = dict(embed_dim=48, depth=6, num_heads=3, deform_num_heads=3, conv_inplane=16)
    x = torch.randn(1, 3, 64, 96)
    for count_kwargs in (dict(vit_feature_source="final"), dict(add_vit_feature=False)):
        model = vitadapter.ViTAdapter(interaction_indexes=[[0, 1], [2, 5]], **small, **count_kwargs).eval()
        assert len(model.interactions) == 2 and model.interactions[1].extra_extractors is not None
        with torch.no_grad():
            assert all(torch.isfinite(o).all() for o in model(x))
    torch.manual_seed(0)
    ranges = vitadapter.ViTAdapter(interaction_indexes=[[0, 0], [1, 2], [3, 4], [5, 5]], **small).eval()
    torch.manual_seed(0)
    numbers = vitadapter.ViTAdapter(interaction_indexes=[0, 2, 4, 5], **small).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ranges(x), numbers(x)))
    with pytest.raises(ValueError, match="exactly 4"):
        vitadapter.ViTAdapter(interaction_indexes=[1, 5], **small)


def test_every_registered_architecture_by_name_features_only():
    """Every registered architecture builds through timm by name as a feature extractor (their
    real sizes are checked on the meta device; a shrunken trunk runs a forward)."""
    for name in backbone_archs():
        if name == "vit_adapter":
            continue
        with meta_device():
            full = timm.create_model(name, features_only=True)
        assert full.feature_info.reduction() == [4, 8, 16, 32], name


@pytest.mark.parametrize("name", ["beit_adapter_l_det", "vit_adapter_dinov2_reg4_s", "vit_adapter_dinov3_s", "beitv2_adapter_l_896"])
def test_registered_foundation_archs_run_shrunk(name):
    small = dict(embed_dim=64, depth=4, num_heads=4)
    defaults = timm.models.get_arch_pretrained_cfgs(name)  # the arch is known to timm
    assert defaults
    with meta_device():
        args = vitadapter.create_model(name).model_args
    trunk_kwargs = dict(args["trunk_kwargs"], **small)
    window = None if args["window_size"] is None else [7] * 3 + [14]
    model = timm.create_model(
        name, features_only=True, trunk_kwargs=trunk_kwargs, interaction_indexes=[0, 1, 2, 3], deform_num_heads=4,
        window_size=window,
    ).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 80, 112))
    assert [o.shape[1] for o in outs] == [64] * 4 and [tuple(o.shape[-2:]) for o in outs][0] == (20, 28)


def test_pretrained_trunk_by_name_and_config_round_trip(tmp_path):
    """pretrained=True with a timm trunk name loads the trunk's timm weights (a local file stands in
    for timm's Hub here) and a fresh adapter; save_pretrained's folder rebuilds the same model."""
    shape = dict(img_size=56, embed_dim=48, depth=4, num_heads=3)
    source = timm.create_model("vit_small_patch14_dinov2", num_classes=0, **shape)
    torch.save(source.state_dict(), tmp_path / "trunk.pth")
    overlay = dict(file=str(tmp_path / "trunk.pth"), num_classes=0)
    model = vitadapter.create_model(
        "vit_adapter", pretrained=True, trunk="vit_small_patch14_dinov2", conv_inplane=16, deform_num_heads=3,
        trunk_kwargs=dict(shape, pretrained_cfg_overlay=overlay),
    ).eval()
    assert torch.equal(model.vit.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    vitadapter.save_pretrained(model, tmp_path / "saved")
    again = vitadapter.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True).eval()
    x = torch.randn(1, 3, 60, 90)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), again(x)))


def test_timm_beit_checkpoint_into_detection_layout():
    """A timm BEiT ImageNet checkpoint (cls rows, 224-px tables) loads into the windowed detection
    trunk: the cls token goes, each table is resized to its window."""
    shape = dict(img_size=64, embed_dim=48, depth=4, num_heads=3, init_values=0.1)
    source = timm.create_model("beit_base_patch16_224", num_classes=0, **shape)
    model = vitadapter.create_model(
        "vit_adapter", trunk="beit_base_patch16_224", trunk_kwargs=shape, conv_inplane=16, deform_num_heads=3,
        window_size=[2, 2, 2, 8], vit_feature_source="final",
    ).eval()
    conversion = vitadapter.upstream.load_checkpoint(model, source.state_dict())
    assert model.vit.cls_token is None and "vit.cls_token" not in model.state_dict()
    assert [tuple(b.attn.relative_position_bias_table.shape) for b in model.vit.blocks] == [(9, 3)] * 3 + [(225, 3)]
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert "cls_token" in conversion.dropped
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model(torch.randn(1, 3, 96, 64)))


def test_dinov2_swiglu_checkpoint_keys():
    """DINOv2's ViT-g layout (unpacked SwiGLU w1, w2, w3; gamma1/2; cls row in pos_embed): after
    loading, a block's MLP is w3(silu(w1 x) * w2 x), computed here from the raw tensors."""
    config = dict(_dino_fixture("dinov2")[1], ffn_type="swiglu")
    model = vitadapter.load_upstream(config, "dinov2")
    theirs = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("vit.").replace(".ls1.gamma", ".gamma1").replace(".ls2.gamma", ".gamma2")
        if ".mlp.fc1." in key:
            half = value.shape[0] // 2
            theirs[key.replace("fc1", "w1")], theirs[key.replace("fc1", "w2")] = value[:half], value[half:]
        else:
            theirs[key.replace("mlp.fc2", "mlp.w3")] = value
    theirs = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in theirs.items()}
    loaded = vitadapter.load_upstream(config, "dinov2", {"state_dict": theirs})
    x = torch.randn(2, 5, 128)
    w1, w2, w3 = (theirs[f"blocks.1.mlp.{n}.weight"] for n in ("w1", "w2", "w3"))
    b1, b2, b3 = (theirs[f"blocks.1.mlp.{n}.bias"] for n in ("w1", "w2", "w3"))
    expected = torch.nn.functional.silu(x @ w1.T + b1) * (x @ w2.T + b2) @ w3.T + b3
    assert max_rel_err(loaded.vit.blocks[1].mlp(x), expected) <= 1e-5
    assert torch.equal(loaded.vit.blocks[1].ls1.gamma, theirs["blocks.1.gamma1"])


def test_dinov3_checkpoint_rope_periods_are_used():
    """Released DINOv3 files store their own (bf16-rounded) RoPE periods; those replace timm's."""
    _, config, ckpt, io = _dino_fixture("dinov3")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state["backbone.rope_embed.periods"] = state["backbone.rope_embed.periods"].bfloat16().float() * 1.5
    model = vitadapter.load_upstream(config, "dinov3", state).eval()
    assert torch.equal(model.vit.rope.periods, state["backbone.rope_embed.periods"])
    with torch.no_grad():
        assert max_rel_err(model(io["input"])[2], io["out2"]) > 1e-3  # other periods, other numbers

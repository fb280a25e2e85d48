"""load_upstream on configurations beyond the fixtures, against tests/upstream_reference.py.

The reference is itself checked against the upstream fixtures first, then both run in float64 on
random weights (every parameter and BatchNorm statistic random) for other options of both codebases.
"""
import pytest
import torch

import vitadapter
from conftest import load_fixture, max_rel_err
from vitadapter._meta import meta_device
from upstream_reference import upstream_forward


def to_upstream_layout(model) -> dict:
    """This project's state dict in upstream's key layout (the inverse of load_upstream's conversion)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "vit.pos_embed":
            value = torch.cat([torch.randn_like(value[:, :1]), value], 1)
        key = key.removeprefix("vit.").replace(".ls1.gamma", ".gamma1").replace(".ls2.gamma", ".gamma2")
        out[key] = value
    return out


def randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", ["seg_vit", "det_vit"])
def test_reference_reproduces_the_fixtures(name):
    meta, ckpt, io = load_fixture(name)
    sd = {k.removeprefix("backbone."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    with torch.no_grad():
        outs = upstream_forward(sd, meta["backbone"], meta["codebase"], io["input"])
    for i, out in enumerate(outs):
        assert max_rel_err(out, io[f"out{i}"]) <= 1e-4


BASE = dict(type="ViTAdapter", pretrain_size=224, embed_dim=48, depth=4, num_heads=3, conv_inplane=8,
            deform_num_heads=3, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]])
CONFIGS = {
    "no-cffn-no-extra": dict(with_cffn=False, use_extra_extractor=False),
    "no-vit-feature": dict(add_vit_feature=False, init_values=0.5),
    "ratio-points": dict(deform_ratio=0.5, n_points=2, deform_num_heads=6, cffn_ratio=0.5),
    "uneven-ranges-depth6": dict(depth=6, interaction_indexes=[[0, 0], [1, 2], [3, 4], [5, 5]]),
    "no-layer-scale-pos384": dict(layer_scale=False, pretrain_size=384, img_size=384),
    "windows": dict(window_attn=[True, False, True, True], window_size=[3, None, 5, 2]),
}


@pytest.mark.parametrize("codebase", ["segmentation", "detection"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_other_upstream_configs_match_the_reference(name, codebase):
    cfg = dict(BASE, **CONFIGS[name])
    model = randomise(vitadapter.load_upstream(cfg, codebase)).double().eval()
    image = torch.randn(2, 3, 96, 160, dtype=torch.float64)
    with torch.no_grad():
        ours = model(image)
        ref = upstream_forward(to_upstream_layout(model), cfg, codebase, image)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
        assert max_rel_err(a, r) <= 1e-9


PASTED = {
    # upstream's AugReg-L UperNet ADE20K backbone, as written in its config file
    "segmentation": ("vit_adapter_l", dict(
        _delete_=True, type="ViTAdapter", img_size=384, pretrain_size=384, patch_size=16, embed_dim=1024,
        depth=24, num_heads=16, mlp_ratio=4, drop_path_rate=0.4, conv_inplane=64, n_points=4,
        deform_num_heads=16, cffn_ratio=0.25, deform_ratio=0.5, with_cp=True,
        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]], window_attn=[False] * 24, window_size=[None] * 24,
    )),
    # upstream's DeiT-T Mask R-CNN COCO backbone
    "detection": ("vit_adapter_t_det", dict(
        _delete_=True, type="ViTAdapter", patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
        drop_path_rate=0.1, conv_inplane=64, n_points=4, deform_num_heads=6, cffn_ratio=0.25, deform_ratio=1.0,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        window_attn=[True, True, False] * 4, window_size=[14, 14, None] * 4,
        pretrained="pretrained/deit_tiny_patch16_224-a1311bcf.pth",
    )),
}


@pytest.mark.parametrize("codebase", sorted(PASTED))
def test_a_config_pasted_from_an_upstream_file_builds_the_registered_flavour(codebase):
    arch, cfg = PASTED[codebase]
    with meta_device():
        model = vitadapter.load_upstream(cfg, codebase)
        registered = vitadapter.create_model(arch)
    assert model.grad_checkpointing == bool(cfg.get("with_cp"))
    assert model.trunk.window_sizes == registered.trunk.window_sizes
    assert model.vit_feature_source == registered.vit_feature_source
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in registered.state_dict().items()
    }


def test_round_trip_through_upstream_layout():
    cfg = dict(BASE, **CONFIGS["windows"])
    model = randomise(vitadapter.load_upstream(cfg, "detection")).eval()
    again = vitadapter.load_upstream(cfg, "detection", to_upstream_layout(model)).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(image), again(image)))


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(type="SwinAdapter"), "SwinAdapter"),
        (dict(window_attn=[True, False]), "window_attn lists 2"),
        (dict(frobnicate=True), "frobnicate"),
        (dict(img_size=256), "img_size 256"),
        (dict(interaction_indexes=[[0, 1], [3, 3]]), "interaction_indexes"),
    ],
)
def test_bad_upstream_configs_are_named(change, words):
    with pytest.raises(ValueError, match=words):
        vitadapter.load_upstream(dict(BASE, **change), "segmentation")


def test_unknown_codebase():
    with pytest.raises(ValueError, match="codebase"):
        vitadapter.load_upstream(BASE, "classification")

"""Every DINOv3 hub ViT's own options through load_upstream(..., "dinov3"), and junk config values.

The seven option sets are transcribed from the authors' ``dinov3/hub/backbones.py`` (facebookresearch/
dinov3 at 6876159). The SwiGLU width and the trunk's function are checked against small references
written here from the authors' code, not against the converter.
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitadapter
from conftest import max_rel_err
from vitadapter._meta import meta_device
from vitadapter.models.vit_adapter import _trunk_outputs

DINO = Path(__file__).parent / "fixtures" / "dino_adapters"
FIXTURES = Path(__file__).parent / "fixtures" / "upstream"

_HUB_COMMON = dict(
    img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", qkv_bias=True, drop_path_rate=0.0,
    layerscale_init=1.0e-05, norm_layer="layernormbf16", ffn_bias=True, proj_bias=True, n_storage_tokens=4,
    mask_k_bias=True,
)
HUB = {  # hub function: (its DinoVisionTransformer options, the registered architecture of that ViT)
    "dinov3_vits16": (dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4, ffn_layer="mlp"), "vit_adapter_dinov3_s"),
    "dinov3_vits16plus": (dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"), "vit_adapter_dinov3_s_plus"),
    "dinov3_vitb16": (dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4, ffn_layer="mlp"), "vit_adapter_dinov3_b"),
    # untie_global_and_local_cls_norm is True for the SAT-493M weights
    "dinov3_vitl16": (dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4, ffn_layer="mlp",
                           untie_global_and_local_cls_norm=True), "vit_adapter_dinov3_l"),
    "dinov3_vitl16plus": (dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"), None),
    "dinov3_vith16plus": (dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"), "vit_adapter_dinov3_h_plus"),
    "dinov3_vit7b16": (dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3, qkv_bias=False, ffn_layer="swiglu64",
                            untie_global_and_local_cls_norm=True), "vit_adapter_dinov3_7b"),
}
SHRUNK = dict(embed_dim=128, depth=4, num_heads=4)


def hub_config(name, **shrink):
    return {"vit": {**_HUB_COMMON, **HUB[name][0], **shrink}, "adapter": {"interaction_indexes": [0, 1, 2, 3]}}


def authors_swiglu_width(dim, ffn_ratio, align_to):
    """dinov3/layers: the block passes int(dim * ffn_ratio); SwiGLUFFN takes int(2/3 of it), rounded up."""
    hidden = int(int(dim * ffn_ratio) * 2 / 3)
    return math.ceil(hidden / align_to) * align_to


def tree(model):
    """Each module's name and class, each parameter's and buffer's name and shape."""
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    tensors = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return modules, tensors


@pytest.mark.parametrize("name", sorted(HUB))
def test_each_hub_vit_loads_and_runs(name):
    model = vitadapter.load_upstream(hub_config(name, **SHRUNK), "dinov3").eval()
    with torch.no_grad():
        levels = model(torch.randn(1, 3, 64, 96))
    assert [tuple(level.shape) for level in levels] == [(1, 128, 16, 24), (1, 128, 8, 12), (1, 128, 4, 6), (1, 128, 2, 3)]
    assert all(torch.isfinite(level).all() for level in levels)


@pytest.mark.parametrize("name", sorted(HUB))
def test_each_full_size_hub_vit_builds_with_the_authors_ffn_width(name):
    options = HUB[name][0]
    with meta_device():
        model = vitadapter.load_upstream(hub_config(name), "dinov3")
    mlp = model.vit.blocks[0].mlp
    if options["ffn_layer"] == "mlp":
        assert mlp.fc1.out_features == int(options["embed_dim"] * options["ffn_ratio"])
    else:
        align = {"swiglu": 8, "swiglu64": 64}[options["ffn_layer"]]
        width = authors_swiglu_width(options["embed_dim"], options["ffn_ratio"], align)
        assert mlp.fc1_g.out_features == mlp.fc1_x.out_features == mlp.fc2.in_features == width
    assert len(model.vit.blocks) == options["depth"] and model.embed_dim == options["embed_dim"]


@pytest.mark.parametrize("name", sorted(n for n in HUB if HUB[n][1]))
def test_hub_vits_build_the_registered_architectures(name):
    """Same modules, parameters and buffers (shrunk alike, on the meta device), but one difference:
    the hub's ViTs other than the 7B are built with q/v biases (qkv_bias=True; timm adds a zero key
    bias buffer); the registered models use timm's bias-free variants of the same ViTs, whose timm
    weights stand for the released checkpoints' zero biases."""
    options, arch = HUB[name]
    with meta_device():
        ours = vitadapter.load_upstream(hub_config(name, **SHRUNK), "dinov3")
        registered = vitadapter.create_model(arch, trunk_kwargs=SHRUNK)
    (ours_modules, ours_tensors), (reg_modules, reg_tensors) = tree(ours), tree(registered)
    assert ours_modules == reg_modules
    biases = {f"vit.blocks.{i}.attn.{b}_bias" for i in range(SHRUNK["depth"]) for b in "qkv"}
    assert set(ours_tensors) - set(reg_tensors) == (biases if options.get("qkv_bias", True) else set())
    assert not set(reg_tensors) - set(ours_tensors)
    assert {k: v for k, v in ours_tensors.items() if k in reg_tensors} == reg_tensors


def _authors_vit_outputs(state, x, heads, prefix):
    """The authors' get_intermediate_layers(x, n=range(depth), norm=True) for their layernormbf16,
    SwiGLU ViT without qkv bias, written from dinov3/models and dinov3/layers: patch tokens only."""
    def p(key):
        return state["backbone." + key]

    t = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=16)
    batch, dim, h, w = t.shape
    t = torch.cat([p("cls_token").expand(batch, -1, -1), p("storage_tokens").expand(batch, -1, -1),
                   t.flatten(2).transpose(1, 2)], dim=1)
    coords_h, coords_w = torch.arange(0.5, h) / h, torch.arange(0.5, w) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), -1).flatten(0, 1) * 2 - 1
    angles = (2 * math.pi * coords[:, :, None] / p("rope_embed.periods")).flatten(1).tile(2)
    sin, cos = angles.sin(), angles.cos()

    def rope(v):
        first, second = v[..., prefix:, :].chunk(2, dim=-1)
        rotated = v[..., prefix:, :] * cos + torch.cat([-second, first], -1) * sin
        return torch.cat([v[..., :prefix, :], rotated], dim=-2)

    def norm(v, key):
        return F.layer_norm(v, (dim,), p(key + ".weight"), p(key + ".bias"), eps=1e-5)

    outputs, i = [], 0
    while f"backbone.blocks.{i}.norm1.weight" in state:
        b = f"blocks.{i}."
        q, k, v = (norm(t, b + "norm1") @ p(b + "attn.qkv.weight").T).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).flatten(2)
        t = t + p(b + "ls1.gamma") * F.linear(attn, p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        u = norm(t, b + "norm2")
        gate, value = (F.linear(u, p(b + f"mlp.{n}.weight"), p(b + f"mlp.{n}.bias")) for n in ("w1", "w2"))
        t = t + p(b + "ls2.gamma") * F.linear(F.silu(gate) * value, p(b + "mlp.w3.weight"), p(b + "mlp.w3.bias"))
        outputs.append(norm(t, "norm")[:, prefix:])
        i += 1
    return outputs


def test_a_swiglu64_trunk_in_the_authors_layout_equals_their_computation():
    """The 7B's options (swiglu64, no qkv bias, a local cls norm) on a 128-wide, 4-block ViT whose
    ffn_ratio makes the 64-alignment matter: random weights in the authors' key layout load, the
    SwiGLU has the authors' width, and the trunk computes what the authors' ViT computes."""
    meta = json.loads((DINO / "dinov3_adapter.json").read_text())
    vit = dict(meta["vit"]["kwargs"], ffn_layer="swiglu64", qkv_bias=False, untie_global_and_local_cls_norm=True)
    dim, heads, ratio = vit["embed_dim"], vit["num_heads"], vit["ffn_ratio"]
    hidden = authors_swiglu_width(dim, ratio, 64)
    assert (dim, vit["depth"], hidden) == (128, 4, 384)  # 341 rounded up to 64, not to 8 (344)
    fixture = torch.load(DINO / "dinov3_adapter.pth", weights_only=True)["state_dict"]
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    state = {k: v for k, v in fixture.items() if not k.startswith("backbone.blocks.") or not k.split(".", 4)[3] in ("mlp", "attn")}
    for i in range(vit["depth"]):
        b = f"backbone.blocks.{i}."
        state.update({
            b + "attn.qkv.weight": rand(3 * dim, dim, scale=dim ** -0.5),
            b + "attn.proj.weight": rand(dim, dim, scale=dim ** -0.5), b + "attn.proj.bias": rand(dim, scale=0.2),
            b + "mlp.w1.weight": rand(hidden, dim, scale=dim ** -0.5), b + "mlp.w1.bias": rand(hidden, scale=0.2),
            b + "mlp.w2.weight": rand(hidden, dim, scale=dim ** -0.5), b + "mlp.w2.bias": rand(hidden, scale=0.2),
            b + "mlp.w3.weight": rand(dim, hidden, scale=hidden ** -0.5), b + "mlp.w3.bias": rand(dim, scale=0.2),
        })
    state.update({"backbone.local_cls_norm.weight": rand(dim), "backbone.local_cls_norm.bias": rand(dim)})
    config = {"vit": vit, "adapter": meta["constructor"]["kwargs"]}
    model = vitadapter.load_upstream(config, "dinov3", state).eval()
    assert model.vit.blocks[0].mlp.fc1_g.weight.shape == (hidden, dim)

    x = torch.randn(1, 3, 96, 128, generator=generator)
    with torch.no_grad():
        ours, grid = _trunk_outputs(model.trunk, x, model.interaction_indexes, frozen=True)
        theirs = _authors_vit_outputs(state, x, heads, prefix=1 + vit["n_storage_tokens"])
        levels = model(x)
    assert grid == (6, 8) and len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert max_rel_err(a, b) <= 1e-4
    assert all(torch.isfinite(level).all() for level in levels)


def test_the_key_bias_is_applied_through_its_mask_or_refused():
    """mask_k_bias: the authors multiply qkv.bias by bias_mask; without the mask a nonzero key bias
    would be silently dropped by timm's key map, so it is refused by name."""
    meta = json.loads((DINO / "dinov3_adapter.json").read_text())
    config = {"vit": meta["vit"]["kwargs"], "adapter": meta["constructor"]["kwargs"]}
    state = torch.load(DINO / "dinov3_adapter.pth", weights_only=True)["state_dict"]
    assert state["backbone.blocks.0.attn.qkv.bias"].chunk(3)[1].any()  # the fixture's dead key third
    vitadapter.load_upstream(config, "dinov3", state)
    unmasked = {k: v for k, v in state.items() if not k.endswith("bias_mask")}
    with pytest.raises(ValueError, match=r"backbone\.blocks\.0\.attn\.qkv\.bias: the key third"):
        vitadapter.load_upstream(config, "dinov3", unmasked)


@pytest.mark.parametrize("option, value, why", [
    ("norm_layer", "layernorm", "eps 1e-5"),
    ("norm_layer", "rmsnorm", "eps 1e-5"),
    ("pos_embed_rope_dtype", "bf16", "float32"),
    ("in_chans", 4, "RGB"),
    ("ffn_layer", "swiglu48", "supported: 'mlp', 'swiglu', 'swiglu32', 'swiglu64', 'swiglu128'"),
])
def test_options_that_change_the_output_are_refused_with_the_reason(option, value, why):
    config = hub_config("dinov3_vits16", **SHRUNK)
    config["vit"][option] = value
    with pytest.raises(ValueError, match=f"{option}.*{why}"):
        vitadapter.load_upstream(config, "dinov3")


_DINOV3_VIT = dict(embed_dim="128", depth=None, num_heads=[4], ffn_ratio="4", layerscale_init="1e-5",
                   n_storage_tokens=4.5, pos_embed_rope_base="100", patch_size=True, qkv_bias="false")
_DINOV2 = dict(patch_size="14", embed_dim=None, depth="4", num_heads=4.5, mlp_ratio="4", pretrain_size=[168],
               qkv_bias="yes", use_cls=1, layer_scale="true", freeze_vit="no")


@pytest.mark.parametrize("field", sorted(_DINOV3_VIT))
def test_junk_dinov3_values_are_named(field):
    config = hub_config("dinov3_vits16", **SHRUNK)
    config["vit"][field] = _DINOV3_VIT[field]
    with pytest.raises(ValueError, match=f"vit.{field} must be"):
        vitadapter.load_upstream(config, "dinov3")


@pytest.mark.parametrize("field", sorted(_DINOV2))
def test_junk_dinov2_values_are_named(field):
    config = dict(json.loads((DINO / "dinov2_adapter.json").read_text())["constructor"]["kwargs"])
    config[field] = _DINOV2[field]
    with pytest.raises(ValueError, match=f"DINOv2 adapter {field} must be"):
        vitadapter.load_upstream(config, "dinov2")


def test_junk_segmentation_head_and_test_values_are_named():
    from vitadapter.converters.mmseg import inference_kwargs
    from vitadapter.models.from_upstream import build_head
    from vitadapter.converters.mmseg_mask2former import mask2former_head_kwargs

    with pytest.raises(ValueError, match="test_cfg.crop_size must be an integer, got 'big'"):
        inference_kwargs({"mode": "slide", "crop_size": ["big", 512], "stride": [341, 341]})
    head = json.loads((FIXTURES / "seg_m2f.json").read_text())["decode_head"]
    for change, field in [({"num_things_classes": "80"}, "num_things_classes"), ({"num_stuff_classes": -1}, "num_stuff_classes")]:
        with pytest.raises(ValueError, match=field):
            mask2former_head_kwargs(dict(copy.deepcopy(head), **change))
    bad = copy.deepcopy(head)
    bad["loss_cls"]["class_weight"][-1] = "0.1"
    with pytest.raises(ValueError, match=r"loss_cls\.class_weight must be a number"):
        mask2former_head_kwargs(bad)
    upernet = json.loads((FIXTURES / "seg_upernet.json").read_text())["decode_head"]
    upernet["loss_decode"] = dict(upernet.get("loss_decode", {"type": "CrossEntropyLoss"}), loss_weight="1.0")
    with pytest.raises(ValueError, match="decode_head: loss_decode.loss_weight must be a finite number"):
        build_head(upernet, "decode_head")


@pytest.mark.parametrize("field, junk", [
    ("use_rel_pos_bias", "yes"), ("init_values", "1e-6"), ("img_size", "640"), ("drop_path_rate", [0.3]),
    ("embed_dim", 1024.5), ("deform_ratio", "0.5"),
])
def test_junk_upstream_beit_values_are_named(field, junk):
    meta = json.loads((FIXTURES / "seg_beit.json").read_text())
    with pytest.raises(ValueError, match=field):
        vitadapter.upstream.model_kwargs(dict(meta["backbone"], **{field: junk}), meta["codebase"])

"""ViT-Adapter on Uni-Perceiver: the encoder against a plain transcription of upstream's, the release
layouts, and the registered architectures against upstream's configs and parameter table."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitadapter
from conftest import load_fixture, max_rel_err
from vitadapter._meta import meta_device
from vitadapter.models import ViTAdapter
from vitadapter.upstream import convert_checkpoint, model_kwargs


def reference_encoder(sd: dict, img_size: int, heads: int, windows: list, image: torch.Tensor) -> torch.Tensor:
    """Upstream's UnifiedBertEncoder forward, written out: patch conv, the img_size position table
    resized bicubic plus temporal row 0, LayerNorm, then pre-norm BERT layers with layer scale whose
    windowed attention zero-pads the tokens before the q/k/v projection; explicit softmax."""
    p = "visual_embed."
    x = F.conv2d(image, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=16)
    b, dim, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    g = img_size // 16
    table = sd[p + "patch_embed.spatial_pos_embed.weight"].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False).reshape(1, dim, h * w).permute(0, 2, 1)
    x = x + pos + sd[p + "patch_embed.temporal_pos_embed.weight"][0]
    x = F.layer_norm(x, (dim,), sd[p + "embeddings_norm.weight"], sd[p + "embeddings_norm.bias"])

    def attend(t, i):
        n = t.shape[1]
        qkv = F.linear(t, sd[f"layers.{i}.self_attn.in_proj.weight"], sd[f"layers.{i}.self_attn.in_proj.bias"])
        q, k, v = qkv.reshape(t.shape[0], n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(t.shape[0], n, dim)

    for i, window in enumerate(windows):
        y = F.layer_norm(x, (dim,), sd[f"layers.{i}.norm1.weight"], sd[f"layers.{i}.norm1.bias"])
        if window is None:
            y = attend(y, i)
        else:
            hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
            y = F.pad(y.view(b, h, w, dim), (0, 0, 0, wp - w, 0, hp - h))
            y = y.view(b, hp // window, window, wp // window, window, dim).permute(0, 1, 3, 2, 4, 5)
            y = attend(y.reshape(-1, window * window, dim), i)
            y = y.view(b, hp // window, wp // window, window, window, dim).permute(0, 1, 3, 2, 4, 5)
            y = y.reshape(b, hp, wp, dim)[:, :h, :w].reshape(b, h * w, dim)
        y = F.linear(y, sd[f"layers.{i}.self_attn.out_proj.weight"], sd[f"layers.{i}.self_attn.out_proj.bias"])
        x = x + sd[f"layers.{i}.gamma_1"] * y
        y = F.layer_norm(x, (dim,), sd[f"layers.{i}.norm2.weight"], sd[f"layers.{i}.norm2.bias"])
        y = F.linear(F.gelu(F.linear(y, sd[f"layers.{i}.linear1.weight"], sd[f"layers.{i}.linear1.bias"])),
                     sd[f"layers.{i}.linear2.weight"], sd[f"layers.{i}.linear2.bias"])
        x = x + sd[f"layers.{i}.gamma_2"] * y
    return x


def random_encoder_state(dim: int, depth: int, img_size: int, mlp_ratio: float = 4.0) -> dict:
    """An upstream-layout Uni-Perceiver encoder with random weights (gammas and norms included)."""
    hidden, cells = int(dim * mlp_ratio), (img_size // 16) ** 2
    sd = {
        "visual_embed.patch_embed.proj.weight": torch.randn(dim, 3, 16, 16) * 0.02,
        "visual_embed.patch_embed.proj.bias": torch.randn(dim),
        "visual_embed.patch_embed.spatial_pos_embed.weight": torch.randn(cells, dim),
        "visual_embed.patch_embed.temporal_pos_embed.weight": torch.randn(8, dim),
        "visual_embed.embeddings_norm.weight": 1 + torch.randn(dim) * 0.1,
        "visual_embed.embeddings_norm.bias": torch.randn(dim) * 0.1,
    }
    for i in range(depth):
        shapes = {
            "gamma_1": (dim,), "gamma_2": (dim,), "self_attn.in_proj.weight": (3 * dim, dim), "self_attn.in_proj.bias": (3 * dim,),
            "self_attn.out_proj.weight": (dim, dim), "self_attn.out_proj.bias": (dim,), "linear1.weight": (hidden, dim),
            "linear1.bias": (hidden,), "linear2.weight": (dim, hidden), "linear2.bias": (dim,),
            "norm1.weight": (dim,), "norm1.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
        }
        sd.update({f"layers.{i}.{k}": torch.randn(s) * (0.1 if len(s) == 2 else 0.5) for k, s in shapes.items()})
    return sd


@pytest.mark.parametrize(
    "img_size, image_size, windows, mlp_ratio",
    [
        (96, (112, 80), [None, None, None], 4.0),  # a 6x6 table resized to 7x5, no windows
        (224, (96, 160), [3, None, 4], 4.0),  # 14x14 -> 6x10; windows dividing one side, neither side
        (160, (128, 128), [8, 5, None], 2.5),  # a window of the whole grid; another mlp_ratio
    ],
)
def test_encoder_matches_a_transcription_of_upstream(img_size, image_size, windows, mlp_ratio):
    """Any position grid, window sizes and global blocks: the trunk (after the key conversion) runs
    upstream's encoder."""
    dim, heads, depth = 48, 3, len(windows)
    sd = random_encoder_state(dim, depth, img_size, mlp_ratio)
    cfg = dict(type="UniPerceiverAdapter", img_size=img_size, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
               deform_num_heads=3, conv_inplane=8, interaction_indexes=[[0, 0], [1, 1], [2, 2]], add_vit_feature=False,
               window_attn=[w is not None for w in windows], window_size=[w or 14 for w in windows])
    model = vitadapter.load_upstream(cfg, "detection", sd).eval()
    image = torch.randn(2, 3, *image_size)
    with torch.no_grad():
        tokens, prefix, grid = model.trunk.embed(image)
        tokens, _ = model.trunk.run(tokens, prefix, 0, depth - 1, grid)
        expected = reference_encoder(sd, img_size, heads, windows, image)
    assert prefix is None and grid == (image_size[0] // 16, image_size[1] // 16)
    assert max_rel_err(tokens, expected) <= 1e-5


def _release_trunk(meta_backbone_state: dict) -> dict:
    """What upstream's converted Uni-Perceiver release files hold: the encoder's keys without the
    adapter, plus parts of Uni-Perceiver's text and prompt side."""
    state = {k: v for k, v in meta_backbone_state.items() if k.startswith(("layers.", "visual_embed."))}
    dim = state["visual_embed.embeddings_norm.weight"].shape[0]
    state["visual_embed.embeddings_type.weight"] = torch.randn(1, dim)
    state["token_embed.embeddings.weight"] = torch.randn(10, dim)
    return state


def test_release_encoder_loads_with_unused_parts_dropped_and_unknown_keys_refused():
    meta, ckpt, _ = load_fixture("seg_uniperceiver")
    full = {k.removeprefix("backbone."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    whole = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt)
    model = ViTAdapter(**model_kwargs(meta["backbone"], meta["codebase"]))
    conversion = convert_checkpoint(_release_trunk(full), model)
    assert sorted(conversion.dropped) == sorted([
        "visual_embed.embeddings_type.weight", "token_embed.embeddings.weight",
        "visual_embed.patch_embed.temporal_pos_embed.weight[1:]",
    ])
    # the encoder as in the whole backbone; the adapter starts fresh
    expected = whole.state_dict()
    assert all(torch.equal(conversion.state[k], expected[k]) for k in expected if k.startswith("vit."))
    assert conversion.initialised and all(not k.startswith("vit.") for k in conversion.initialised)
    model.load_state_dict(conversion.state)

    for stray in ("layers.0.self_attn.q_norm.weight", "visual_embed.mystery"):
        with pytest.raises(ValueError, match=f"unknown key\\(s\\) in this Uni-Perceiver checkpoint: {stray}"):
            convert_checkpoint(dict(_release_trunk(full), **{stray: torch.zeros(3)}), model)
    with pytest.raises(ValueError, match="lacks visual_embed.patch_embed.temporal_pos_embed.weight"):
        partial = {k: v for k, v in full.items() if "temporal" not in k}
        vitadapter.load_upstream(meta["backbone"], meta["codebase"], partial)


def test_uniperceiver_checkpoint_into_another_trunk_is_refused():
    meta, ckpt, _ = load_fixture("seg_uniperceiver")
    with meta_device():
        other = vitadapter.create_model("vit_adapter_t")
    with pytest.raises(ValueError, match="Uni-Perceiver checkpoint .* use a uniperceiver_adapter_"):
        convert_checkpoint(torch.load(ckpt, weights_only=True), other)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(patch_size=14), "patch_size 14"),
        (dict(img_size=[224, 160]), "img_size must be an integer"),
        (dict(interaction_indexes=None), "interaction_indexes is required"),
        (dict(qkv_bias=False), "unsupported upstream UniPerceiverAdapter option\\(s\\): \\['qkv_bias'\\]"),
        (dict(window_attn=[True] * 3), "window_attn lists 3 entries for a depth-4 ViT"),
    ],
)
def test_config_errors_name_the_option(option, message):
    meta, _, _ = load_fixture("seg_uniperceiver")
    with pytest.raises(ValueError, match=message):
        model_kwargs(dict(meta["backbone"], **option), "segmentation")


# upstream's configs (segmentation/configs/ade20k/upernet_uniperceiver_adapter_large_512_160k_ade20k.py,
# detection/configs/mask_rcnn/mask_rcnn_uniperceiver_adapter_base_fpn_3x_coco.py and
# detection/configs/htc++/htc++_uniperceiver_adapter_large_fpn_3x_coco.py), model.backbone
_L = dict(type="UniPerceiverAdapter", patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, drop_path_rate=0.4,
          conv_inplane=64, n_points=4, deform_num_heads=16, cffn_ratio=0.25, deform_ratio=0.5,
          interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]])
_B = dict(_L, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.2, deform_num_heads=12,
          interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]])
UPSTREAM_CONFIGS = {
    "uniperceiver_adapter_l": ("segmentation", dict(_L, with_cp=True, window_attn=[False] * 24, window_size=[None] * 24)),
    "uniperceiver_adapter_b_det": ("detection", dict(_B, window_attn=[True, True, False] * 4, window_size=[14, 14, None] * 4)),
}
# HTC++ on Uni-Perceiver-L: no release, the -L architecture in the detection flavour
HTC_L = dict(_L, with_cp=False, window_attn=([True] * 5 + [False]) * 4, window_size=([14] * 5 + [None]) * 4)


@pytest.mark.parametrize("arch", sorted(UPSTREAM_CONFIGS))
def test_registered_architectures_are_upstreams_configs(arch):
    codebase, cfg = UPSTREAM_CONFIGS[arch]
    with meta_device():
        registered = vitadapter.create_model(arch).model_args
        converted = ViTAdapter(**model_kwargs(cfg, codebase)).model_args
    assert converted == registered


def test_htc_config_is_the_large_architecture_in_the_detection_flavour():
    with meta_device():
        registered = vitadapter.create_model(
            "uniperceiver_adapter_l", vit_feature_source="final", window_size=([14] * 5 + [None]) * 4
        ).model_args
        converted = ViTAdapter(**model_kwargs(HTC_L, "detection")).model_args
    assert converted == registered


def test_upernet_parameters_are_upstreams():
    """The UperNet model has upstream's parameters, less the 8 temporal position rows of which the
    converter folds the one a still image uses into the spatial table; upstream's README gives 364M."""
    with meta_device():
        segmentor = vitadapter.create_model("upernet_uniperceiver_adapter_l")
    ours = sum(p.numel() for p in segmentor.parameters())
    dim, depth, hidden = 1024, 24, 4096
    # upstream's UnifiedBertEncoder: per layer two norms, in/out projections, two linears, two gammas;
    # then the patch conv, the 14x14 spatial and 8-row temporal tables and the embedding norm
    layer = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim * hidden + hidden + dim + 2 * dim
    encoder = depth * layer + (3 * 16 * 16 * dim + dim) + 196 * dim + 8 * dim + 2 * dim
    adapter = 23_236_800  # upstream's ViT-Adapter-L adapter (tests/test_model.py)
    heads = sum(p.numel() for n, p in segmentor.named_parameters() if not n.startswith("backbone."))
    upstream = encoder + adapter + heads
    assert ours == upstream - 8 * dim
    assert abs(upstream - 364e6) < 1e6, upstream  # the table's resolution


def test_encoder_tag_loads_a_release_file(tmp_path):
    """The ``uniperceiver_pt`` tags: a release-layout encoder file (unused parts included) through
    create_model, shrunk; the trunk gets its weights, the adapter its fresh init."""
    sd = random_encoder_state(48, 4, 224)
    path = tmp_path / "uni-perceiver.pth"
    torch.save(dict(sd, **{"visual_embed.embeddings_type.weight": torch.randn(1, 48)}), path)
    shrink = dict(trunk_kwargs=dict(img_size=224, embed_dim=48, depth=4, num_heads=3), deform_num_heads=3, conv_inplane=8,
                  interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], window_size=[7, None, 7, None])
    model = vitadapter.create_model(
        "uniperceiver_adapter_b_det.uniperceiver_pt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **shrink
    ).eval()
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        tokens, prefix, grid = model.trunk.embed(image)
        tokens, _ = model.trunk.run(tokens, prefix, 0, 3, grid)
        assert max_rel_err(tokens, reference_encoder(sd, 224, 3, [7, None, 7, None], image)) <= 1e-5
        assert len(model(image)) == 4


def test_save_pretrained_rebuilds_the_uniperceiver_trunk_by_name(tmp_path):
    meta, ckpt, io = load_fixture("det_uniperceiver")
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt).eval()
    vitadapter.save_pretrained(model, tmp_path)
    again = vitadapter.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert again.model_args["trunk"] == "vit_base_patch16_uniperceiver" and again.model_args["adapter_norm_eps"] == 1e-5
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(io["input"]), again(io["input"])))

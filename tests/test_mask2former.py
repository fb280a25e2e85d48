"""Mask2FormerHead: upstream's golden fixture, other configurations against a functional transcription
of upstream (tests/m2f_reference.py), batching, backends, autocast, gradients, the loss, the converter."""
import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_rel_err
from m2f_reference import reference_forward
from vitadapter.converters.mmseg_mask2former import mask2former_head_kwargs
from vitadapter.heads.mask2former import Mask2FormerHead, Mask2FormerOutput
from vitadapter.layers.msda import MSDeformAttn

META = json.loads((FIXTURES / "seg_m2f.json").read_text())


@pytest.fixture(scope="module")
def fixture():
    """(head with the fixture's weights, eval mode; the upstream-layout head state dict; io tensors)."""
    io = load_file(FIXTURES / "seg_m2f_io.safetensors")
    ckpt = torch.load(FIXTURES / "seg_m2f_head.pth", weights_only=True)["state_dict"]
    sd = {k.removeprefix("decode_head."): v for k, v in ckpt.items()}
    head = Mask2FormerHead(**mask2former_head_kwargs(META["decode_head"], META["train_cfg"])).eval()
    head.load_state_dict(sd, strict=True)
    return head, sd, io


def pyramid(io):
    return [io[f"out{i}"] for i in range(4)]


def test_fixture_every_tensor_within_1e_4(fixture):
    head, _, io = fixture
    feats = pyramid(io)
    with torch.no_grad():
        mask_features, multi_scale = head.pixel_decoder(feats)
        out = head(feats)
        seg = head.semantic_logits(feats)
    errors = {"pixel_decoder_mask_features": max_rel_err(mask_features, io["pixel_decoder_mask_features"])}
    for i, level in enumerate(multi_scale):
        errors[f"pixel_decoder_ms{i}"] = max_rel_err(level, io[f"pixel_decoder_ms{i}"])
    assert isinstance(out, Mask2FormerOutput) and len(out.class_logits) == len(out.mask_logits) == 4
    for i, (cls, mask) in enumerate(zip(out.class_logits, out.mask_logits)):
        errors[f"cls_logits_l{i}"] = max_rel_err(cls, io[f"cls_logits_l{i}"])
        errors[f"mask_logits_l{i}"] = max_rel_err(mask, io[f"mask_logits_l{i}"])
    errors["seg_logits_s4"] = max_rel_err(seg, io["seg_logits_s4"])
    assert torch.equal(io["cls_logits"], io["cls_logits_l3"])
    bad = {k: v for k, v in errors.items() if not v <= 1e-4}
    assert not bad, bad
    assert seg.shape == (1, 150, 32, 40) and head.stride == 4 and 128 // head.stride == seg.shape[2]


def test_reference_reproduces_the_fixture(fixture):
    head, sd, io = fixture
    cfg = mask2former_head_kwargs(META["decode_head"])
    with torch.no_grad():
        mask_features, ms, cls, masks = reference_forward(sd, cfg, pyramid(io))
    assert max_rel_err(mask_features, io["pixel_decoder_mask_features"]) <= 1e-4
    for i in range(3):
        assert max_rel_err(ms[i], io[f"pixel_decoder_ms{i}"]) <= 1e-4
    for i in range(4):
        assert max_rel_err(cls[i], io[f"cls_logits_l{i}"]) <= 1e-4
        assert max_rel_err(masks[i], io[f"mask_logits_l{i}"]) <= 1e-4


# a configuration the fixture does not have: other widths, level count, queries, classes, layer counts
OTHER = dict(in_channels=[24, 40, 48, 56], feat_channels=32, out_channels=24, num_queries=7, num_classes=5,
             num_groups=8, encoder_layers=1, encoder_heads=2, encoder_points=3, encoder_ffn_channels=48,
             decoder_layers=4, decoder_heads=4, decoder_ffn_channels=40)
# the adapter's pyramid of a 75x93 image: ceil(75 / s) x ceil(93 / s)
ODD_SIZES = [(19, 24), (10, 12), (5, 6), (3, 3)]


def randomise(head):
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5))
            if name.endswith("gn.weight") or name.endswith("norms.0.weight"):
                p.add_(1.0)
    return head


def features_for(head, batch, sizes, dtype=torch.float32):
    return [torch.randn(batch, c, h, w, dtype=dtype) for c, (h, w) in zip(head.in_channels, sizes)]


@pytest.mark.parametrize("variant", ["other", "two-levels-five-inputs"])
def test_other_configurations_match_the_reference_in_float64(variant):
    kwargs = dict(OTHER)
    sizes = ODD_SIZES
    if variant == "two-levels-five-inputs":
        kwargs.update(in_channels=[16, 16, 24, 32, 40], num_levels=2, decoder_layers=3, num_queries=5)
        sizes = [(26, 30), (13, 15), (7, 8), (4, 4), (2, 2)]
    head = randomise(Mask2FormerHead(**kwargs)).double().eval()
    feats = features_for(head, 2, sizes, torch.float64)
    sd = head.state_dict()
    with torch.no_grad():
        out = head(feats)
        ref_mf, _, ref_cls, ref_masks = reference_forward(sd, kwargs, feats)
    assert len(out.class_logits) == kwargs["decoder_layers"] + 1
    for cls, mask, rc, rm in zip(out.class_logits, out.mask_logits, ref_cls, ref_masks):
        assert cls.shape == (2, kwargs["num_queries"], kwargs["num_classes"] + 1)
        assert mask.shape == (2, kwargs["num_queries"], *sizes[0])
        assert max_rel_err(cls, rc) <= 1e-8 and max_rel_err(mask, rm) <= 1e-8


def test_batch_of_two_at_odd_sizes_equals_single_images():
    head = randomise(Mask2FormerHead(**OTHER)).eval()
    feats = features_for(head, 2, ODD_SIZES)
    with torch.no_grad():
        both = head(feats)
        seg = head.semantic_logits(feats)
        singles = [head([f[i:i + 1] for f in feats]) for i in range(2)]
    assert seg.shape == (2, 5, 19, 24) and torch.isfinite(seg).all()
    for k, (cls, mask) in enumerate(zip(both.class_logits, both.mask_logits)):
        assert torch.isfinite(cls).all() and torch.isfinite(mask).all()
        for i in range(2):
            assert max_rel_err(cls[i:i + 1], singles[i].class_logits[k]) <= 1e-5
            assert max_rel_err(mask[i:i + 1], singles[i].mask_logits[k]) <= 1e-5


def test_in_index_picks_the_inputs():
    picked = randomise(Mask2FormerHead(**dict(OTHER, in_index=[1, 2, 3, 4]))).eval()
    plain = Mask2FormerHead(**OTHER).eval()
    plain.load_state_dict(picked.state_dict())
    feats = features_for(plain, 1, ODD_SIZES)
    with torch.no_grad():
        torch.testing.assert_close(picked([torch.zeros(1)] + feats).mask_logits[-1], plain(feats).mask_logits[-1])
    with pytest.raises(ValueError, match="feature levels"):
        plain(feats[:3])


def test_backward_reaches_every_parameter():
    head = randomise(Mask2FormerHead(**dict(OTHER, num_points=64))).train()
    feats = features_for(head, 2, ODD_SIZES)
    for f in feats:
        f.requires_grad_(True)
    labels = torch.randint(0, 5, (2, 75, 93))
    labels[:, :10] = 255
    losses = head.loss(feats, labels)
    assert set(losses) == {f"{p}loss_{k}" for p in ["", "d0.", "d1.", "d2.", "d3."] for k in ("cls", "mask", "dice")}
    sum(losses.values()).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_reference_and_triton_backends_agree():
    pytest.importorskip("triton")
    from vitadapter.layers.msda_op import resolve_backend

    head = randomise(Mask2FormerHead(**dict(OTHER, decoder_layers=1))).eval()
    feats = features_for(head, 1, [(8, 10), (4, 5), (2, 3), (1, 2)])
    try:
        resolve_backend("triton", feats[0].device)
    except (ValueError, RuntimeError) as e:
        pytest.skip(str(e))
    attns = [m for m in head.modules() if isinstance(m, MSDeformAttn)]
    outs = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            for m in attns:
                m.backend = backend
            outs[backend] = head.pixel_decoder(feats)
    assert max_rel_err(outs["triton"][0], outs["reference"][0]) <= 1e-5
    for a, b in zip(outs["triton"][1], outs["reference"][1]):
        assert max_rel_err(a, b) <= 1e-5


def test_bfloat16_autocast_on_cpu(fixture):
    head, _, io = fixture
    feats = pyramid(io)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats)
        seg = head.semantic_logits(feats)
    assert torch.isfinite(seg.float()).all() and seg.shape == io["seg_logits_s4"].shape
    # the pixel decoder and the first prediction (no masked attention yet) track float32 closely
    assert max_rel_err(out.mask_logits[0].float(), io["mask_logits_l0"]) <= 3e-2
    assert max_rel_err(out.class_logits[0].float(), io["cls_logits_l0"]) <= 3e-2
    # later, bfloat16 flips a few attention-mask bits; the semantic map still agrees almost everywhere
    agree = (seg.float().argmax(1) == io["seg_logits_s4"].argmax(1)).float().mean()
    assert agree >= 0.9, agree


def synthetic_task(batch=2):
    """A fixed pyramid and labels that follow from it: the class is the argmax of 3 channels of the
    stride-4 level, upsampled to the 32x40 image, with an ignored border."""
    torch.manual_seed(1)
    feats = [torch.randn(batch, c, h, w) for c, (h, w) in zip([16, 16, 16, 16], [(8, 10), (4, 5), (2, 3), (1, 2)])]
    coarse = torch.nn.functional.interpolate(feats[0][:, :3], size=(32, 40), mode="bilinear", align_corners=False)
    labels = coarse.argmax(1)
    labels[:, :2] = 255
    return feats, labels


def test_loss_goes_down_on_a_tiny_task():
    feats, labels = synthetic_task()
    torch.manual_seed(0)
    head = Mask2FormerHead([16] * 4, 16, 16, num_queries=6, num_classes=3, num_groups=4, encoder_layers=1,
                           encoder_heads=2, encoder_ffn_channels=32, decoder_layers=2, decoder_heads=2,
                           decoder_ffn_channels=32, num_points=128).train()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    totals = []
    for _ in range(40):
        loss = sum(head.loss(feats, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.6 * first, totals
    with torch.no_grad():
        pred = torch.nn.functional.interpolate(head.eval().semantic_logits(feats), size=(32, 40), mode="bilinear",
                                               align_corners=False).argmax(1)
    valid = labels != 255
    assert (pred[valid] == labels[valid]).float().mean() > 0.75


def test_loss_edge_cases(monkeypatch):
    head = randomise(Mask2FormerHead(**dict(OTHER, num_points=32)))
    feats = features_for(head, 2, ODD_SIZES)
    labels = torch.full((2, 75, 93), 255)
    labels[1, :5, :5] = 3
    losses = head.loss(feats, labels)  # image 0 has no labelled pixel: all its queries are "no object"
    assert all(torch.isfinite(v) for v in losses.values())
    labels[1, 0, 0] = 5
    with pytest.raises(ValueError, match="outside"):
        head.loss(feats, labels)
    with pytest.raises(ValueError, match="integer"):
        head.loss(feats, labels.float())
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    labels[1, 0, 0] = 1
    with pytest.raises(ImportError, match="pip install scipy"):
        head.loss(feats, labels)


BAD = {
    "type": (lambda c: c.update(type="MaskFormerHead"), "decode_head.type"),
    "enforce": (lambda c: c.update(enforce_decoder_input_project=True), "enforce_decoder_input_project"),
    "unknown": (lambda c: c.update(frobnicate=1), "frobnicate"),
    "pe": (lambda c: c["positional_encoding"].update(num_feats=16), "num_feats"),
    "pe-normalize": (lambda c: c["pixel_decoder"]["positional_encoding"].update(normalize=False), "normalize"),
    "norm": (lambda c: c["pixel_decoder"].update(norm_cfg={"type": "BN"}), "norm_cfg.type"),
    "levels": (lambda c: c["pixel_decoder"]["encoder"]["transformerlayers"]["attn_cfgs"].update(num_levels=4),
               "num_levels"),
    "order": (lambda c: c["transformer_decoder"]["transformerlayers"].update(
        operation_order=["self_attn", "norm", "cross_attn", "norm", "ffn", "norm"]), "operation_order"),
    "dropout": (lambda c: c["transformer_decoder"]["transformerlayers"]["attn_cfgs"].update(attn_drop=0.1),
                "attn_drop"),
    "class-weight": (lambda c: c["loss_cls"]["class_weight"].__setitem__(3, 2.0), "class_weight"),
    "dice": (lambda c: c["loss_dice"].update(naive_dice=False), "naive_dice"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_converter_refuses_what_the_port_does_not_compute(name):
    cfg = copy.deepcopy(META["decode_head"])
    change, setting = BAD[name]
    change(cfg)
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        mask2former_head_kwargs(cfg)


def test_converter_maps_the_training_settings():
    kwargs = mask2former_head_kwargs(dict(META["decode_head"], train_cfg=META["train_cfg"]))
    assert kwargs == mask2former_head_kwargs(META["decode_head"], META["train_cfg"])
    assert (kwargs["no_object_weight"], kwargs["loss_class_weight"], kwargs["loss_mask_weight"]) == (0.1, 2.0, 5.0)
    assert (kwargs["num_points"], kwargs["match_dice_eps"], kwargs["decoder_layers"]) == (12544, 1.0, 3)
    bad = copy.deepcopy(META["train_cfg"])
    bad["assigner"]["mask_cost"]["type"] = "FocalLossCost"
    with pytest.raises(ValueError, match="mask_cost.type"):
        mask2former_head_kwargs(META["decode_head"], bad)


def test_converter_follows_mmcv_layer_level_ffn_overrides():
    """mmcv's transformer layers let layer-level feedforward_channels / ffn_dropout / ffn_num_fcs
    override ffn_cfgs (the older config style, as in upstream's _base_ pixel decoder)."""
    cfg = copy.deepcopy(META["decode_head"])
    enc_layer = cfg["pixel_decoder"]["encoder"]["transformerlayers"]
    del enc_layer["ffn_cfgs"]
    enc_layer.update(feedforward_channels=128, ffn_dropout=0.0)
    dec_layer = cfg["transformer_decoder"]["transformerlayers"]
    dec_layer["ffn_cfgs"]["feedforward_channels"] = 999
    kwargs = mask2former_head_kwargs(cfg)
    assert (kwargs["encoder_ffn_channels"], kwargs["decoder_ffn_channels"]) == (128, 256)
    dec_layer["ffn_dropout"] = 0.1
    with pytest.raises(ValueError, match="dropout"):
        mask2former_head_kwargs(cfg)


def test_compiles_whole_graph():
    head = randomise(Mask2FormerHead(**OTHER)).eval()
    feats = features_for(head, 1, ODD_SIZES)
    with torch.no_grad():
        expected = head.semantic_logits(feats)
        got = torch.compile(head.semantic_logits, fullgraph=True, backend="aot_eager")(feats)
    assert max_rel_err(got, expected) <= 1e-5

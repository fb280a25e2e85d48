"""Segmentation: UPerHead/FCNHead against upstream's fixture and an independent functional version,
the segmentor's whole and sliding-window inference, losses, upstream configs and the ADE20K zoo."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import load_fixture, max_rel_err
from torch import nn

import vitadapter
from vitadapter._meta import meta_device
from vitadapter.models.checkpoints import load_segmentor_checkpoint
from vitadapter.models.from_upstream import load_upstream_segmentor
from vitadapter.data import ade20k, cityscapes, coco_stuff
from vitadapter.heads import FCNHead, Mask2FormerHead, UPerHead
from vitadapter.models import SEGMENTOR_MODULES, Segmentor


def fixture_model_cfg():
    meta, ckpt, io = load_fixture("seg_upernet")
    return {k: meta[k] for k in ("backbone", "decode_head", "auxiliary_head")}, ckpt, io


def test_upernet_fixture_both_heads_and_the_image_size_logits():
    cfg, ckpt, io = fixture_model_cfg()
    segmentor = load_upstream_segmentor(cfg, ckpt).eval()
    with torch.no_grad():
        pyramid = segmentor.backbone(io["input"])
        decode, aux = segmentor.decode_head(pyramid), segmentor.auxiliary_head(pyramid)
        logits = segmentor(io["input"])
    assert max_rel_err(decode, io["decode_logits"]) < 1e-4
    assert max_rel_err(aux, io["aux_logits"]) < 1e-4
    expected = F.interpolate(io["decode_logits"], size=io["input"].shape[-2:], mode="bilinear", align_corners=False)
    assert logits.shape == (1, 150, 128, 160) and max_rel_err(logits, expected) < 1e-4


# ---- an independent functional UperNet ------------------------------------------------------------


def conv_bn_relu(x, state, prefix, padding=0):
    x = F.conv2d(x, state[f"{prefix}.conv.weight"], padding=padding)
    x = F.batch_norm(
        x, state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"],
        state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"], training=False, eps=1e-5,
    )
    return x.clamp_min(0)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def reference_uper(pyramid, state, pool_scales):
    """UPerNet written out from its definition: PPM on the coarsest level, top-down sums, 3x3 fpn
    convs, everything upsampled to the finest level, fused, classified."""
    top = pyramid[-1]
    pooled = [up(conv_bn_relu(F.adaptive_avg_pool2d(top, s), state, f"psp_modules.{i}.1"), top.shape[2:])
              for i, s in enumerate(pool_scales)]
    merged = [conv_bn_relu(x, state, f"lateral_convs.{i}") for i, x in enumerate(pyramid[:-1])]
    merged.append(conv_bn_relu(torch.cat([top, *pooled], 1), state, "bottleneck", padding=1))
    for i in reversed(range(1, len(merged))):
        merged[i - 1] = merged[i - 1] + up(merged[i], merged[i - 1].shape[2:])
    outs = [conv_bn_relu(x, state, f"fpn_convs.{i}", padding=1) for i, x in enumerate(merged[:-1])] + [merged[-1]]
    fused = conv_bn_relu(torch.cat([outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]], 1), state, "fpn_bottleneck", padding=1)
    return F.conv2d(fused, state["conv_seg.weight"], state["conv_seg.bias"])


def reference_fcn(x, state, num_convs, concat):
    out = x
    for i in range(num_convs):
        out = conv_bn_relu(out, state, f"convs.{i}", padding=1)
    if concat:
        out = conv_bn_relu(torch.cat([x, out], 1), state, "conv_cat", padding=1)
    return F.conv2d(out, state["conv_seg.weight"], state["conv_seg.bias"])


def randomise(module: nn.Module) -> nn.Module:
    """Random values for every parameter and BatchNorm statistic (fresh ones hide mistakes)."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor) * 0.2)
    return module.eval()


@pytest.mark.parametrize("widths,channels,classes,scales", [([24, 40, 56, 72], 16, 7, (1, 2, 3, 6)), ([32, 32, 32], 24, 3, (1, 3))])
def test_uper_head_matches_the_functional_definition(widths, channels, classes, scales):
    head = randomise(UPerHead(widths, channels=channels, num_classes=classes, pool_scales=scales, in_index=range(len(widths))))
    sizes = [(19, 24), (10, 12), (5, 6), (3, 3)][: len(widths)]
    pyramid = [torch.randn(2, c, *s) for c, s in zip(widths, sizes)]
    with torch.no_grad():
        out = head(pyramid)
        expected = reference_uper(pyramid, head.state_dict(), scales)
        single = head([p[1:] for p in pyramid])
    assert out.shape == (2, classes, *sizes[0]) and max_rel_err(out, expected) < 1e-5
    assert max_rel_err(single, out[1:]) < 1e-5  # batch items do not mix


@pytest.mark.parametrize("num_convs,concat", [(1, False), (2, True), (0, False)])
def test_fcn_head_matches_the_functional_definition(num_convs, concat):
    width = 20
    head = randomise(FCNHead(width, channels=width if num_convs == 0 else 12, num_classes=5, num_convs=num_convs, concat_input=concat, in_index=1))
    pyramid = [torch.randn(2, width, 9, 11) for _ in range(4)]
    with torch.no_grad():
        assert max_rel_err(head(pyramid), reference_fcn(pyramid[1], head.state_dict(), num_convs, concat)) < 1e-5


def test_another_upstream_config_with_every_kind_of_setting():
    """A config that is not the fixture's: other widths, classes, pool scales, FCN with concat;
    through load_upstream_segmentor and a checkpoint of upstream's layout built from our modules."""
    cfg, _, _ = fixture_model_cfg()
    cfg["decode_head"] = dict(cfg["decode_head"], channels=40, num_classes=11, pool_scales=[1, 2, 4])
    cfg["auxiliary_head"] = dict(cfg["auxiliary_head"], channels=24, num_classes=11, num_convs=2, concat_input=True, in_index=1)
    cfg["test_cfg"] = dict(mode="slide", crop_size=[64, 64], stride=[48, 48])
    built = randomise(load_upstream_segmentor(cfg))
    _, ckpt, _ = fixture_model_cfg()
    upstream = torch.load(ckpt, weights_only=False)["state_dict"]
    state = {k: v for k, v in upstream.items() if k.startswith("backbone.")}
    state.update({k: v for k, v in built.state_dict().items() if not k.startswith("backbone.")})
    segmentor = load_upstream_segmentor(cfg, {"state_dict": state}).eval()
    x = torch.randn(2, 3, 75, 93)
    with torch.no_grad():
        pyramid = segmentor.backbone(x)
        heads = segmentor.decode_head.state_dict(), segmentor.auxiliary_head.state_dict()
        assert max_rel_err(segmentor.decode_head(pyramid), reference_uper(pyramid, heads[0], (1, 2, 4))) < 1e-5
        assert max_rel_err(segmentor.auxiliary_head(pyramid), reference_fcn(pyramid[1], heads[1], 2, True)) < 1e-5
        logits = segmentor(x)
    assert logits.shape == (2, 11, 75, 93) and torch.isfinite(logits).all()
    assert segmentor.mode == "slide" and segmentor.crop_size == (64, 64)


def test_config_errors_name_the_setting():
    cfg, _, _ = fixture_model_cfg()
    with pytest.raises(ValueError, match="'ASPPHead' is not supported"):
        load_upstream_segmentor(dict(cfg, decode_head=dict(cfg["decode_head"], type="ASPPHead")))
    with pytest.raises(ValueError, match="unsupported settings: dilations"):
        load_upstream_segmentor(dict(cfg, decode_head=dict(cfg["decode_head"], dilations=[1, 6])))
    with pytest.raises(ValueError, match="only softmax CrossEntropyLoss"):
        load_upstream_segmentor(dict(cfg, decode_head=dict(cfg["decode_head"], loss_decode=dict(type="FocalLoss"))))
    with pytest.raises(ValueError, match="norm_cfg"):
        load_upstream_segmentor(dict(cfg, auxiliary_head=dict(cfg["auxiliary_head"], norm_cfg=dict(type="GN"))))
    with pytest.raises(ValueError, match="crop_size and stride"):
        load_upstream_segmentor(dict(cfg, test_cfg=dict(mode="slide")))
    with pytest.raises(ValueError, match="unsupported test_cfg settings: flip"):
        load_upstream_segmentor(dict(cfg, test_cfg=dict(mode="whole", flip=True)))
    with pytest.raises(ValueError, match="needs a 'decode_head'"):
        load_upstream_segmentor({"backbone": cfg["backbone"]})


# ---- the segmentor --------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """Four levels at strides 4-32 from strided convs: enough to exercise the segmentor quickly."""

    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.downs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(3))

    def forward(self, x):
        levels = [self.stem(x)]
        for down in self.downs:
            levels.append(down(levels[-1]))
        return levels


def tiny_segmentor(classes=4, **kwargs):
    head = UPerHead([8] * 4, channels=8, num_classes=classes, pool_scales=(1, 2))
    aux = FCNHead(8, channels=8, num_classes=classes, in_index=2)
    return Segmentor(TinyBackbone(), head, aux, **kwargs)


def windows(length, crop, stride):
    """Window starts written independently of the segmentor: every stride, plus one flush with the end."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    return starts + [length - crop] if starts[-1] != length - crop else starts


@pytest.mark.parametrize("size,crop,stride", [((75, 93), (40, 32), (27, 21)), ((64, 64), (32, 32), (32, 32)), ((30, 50), (40, 40), (27, 27))])
def test_slide_inference_averages_the_windows(size, crop, stride):
    segmentor = randomise(tiny_segmentor(mode="slide", crop_size=crop, stride=stride))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = segmentor(x)
        total, count = torch.zeros_like(out), torch.zeros(size)
        for top in windows(size[0], crop[0], stride[0]):
            for left in windows(size[1], crop[1], stride[1]):
                window = (slice(top, top + crop[0]), slice(left, left + crop[1]))
                total[(..., *window)] += segmentor.encode_decode(x[(..., *window)])
                count[window] += 1
    assert count.min() >= 1 and max_rel_err(out, total / count) < 1e-6
    if size[0] <= crop[0] and size[1] <= crop[1]:  # one window: the whole image
        assert max_rel_err(out, segmentor.encode_decode(x)) < 1e-6


def test_whole_inference_resizes_the_head_logits():
    segmentor = randomise(tiny_segmentor())
    x = torch.randn(1, 3, 61, 47)
    with torch.no_grad():
        expected = F.interpolate(segmentor.decode_head(segmentor.backbone(x)), size=(61, 47), mode="bilinear", align_corners=False)
        assert max_rel_err(segmentor(x), expected) < 1e-6


def test_losses_are_mmsegs_and_train_every_part():
    segmentor = tiny_segmentor(classes=3).train()
    for m in segmentor.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0
    x = torch.randn(2, 3, 64, 48)
    labels = torch.randint(0, 3, (2, 64, 48))
    labels[:, :5] = 255
    losses = segmentor.loss(x, labels)
    assert set(losses) == {"loss_ce", "aux.loss_ce"}
    features = segmentor.backbone(x)
    for head, key, weight in ((segmentor.decode_head, "loss_ce", 1.0), (segmentor.auxiliary_head, "aux.loss_ce", 0.4)):
        logits = F.interpolate(head(features), size=(64, 48), mode="bilinear", align_corners=False)
        picked = -logits.log_softmax(1).gather(1, labels.clamp_max(2).unsqueeze(1)).squeeze(1)
        expected = weight * torch.where(labels == 255, 0.0, picked).sum() / labels.numel()  # mean over all pixels
        assert math.isclose(losses[key].item(), expected.item(), rel_tol=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in segmentor.parameters())


def test_segmentor_refuses_bad_settings():
    with pytest.raises(ValueError, match="larger than the crop"):
        tiny_segmentor(mode="slide", crop_size=16, stride=20)
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        tiny_segmentor(mode="tiles")
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        tiny_segmentor(class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\)"):
        tiny_segmentor().loss(torch.randn(1, 3, 32, 32), torch.zeros(1, 1, 32, 32, dtype=torch.long))


# ---- the ADE20K zoo ------------------------------------------------------------------------------


def test_zoo_names_release_files_and_builds_upstreams_recipe():
    archs = [a for m in SEGMENTOR_MODULES for a in timm.list_models(module=m)]
    assert len(archs) == 13 and set(archs) <= set(vitadapter.list_models())
    datasets = {150: ade20k.CLASSES, 171: coco_stuff.CLASSES, 19: cityscapes.CLASSES}
    for tag in vitadapter.list_pretrained("upernet_*") + vitadapter.list_pretrained("mask2former_*"):
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.url.startswith("https://github.com/czczup/ViT-Adapter/releases/download/")
        assert cfg.url.endswith((".pth", ".pth.tar", ".zip")) and cfg.tag.split("_")[-1] in cfg.url
        assert tuple(cfg.label_names) == datasets[cfg.num_classes]
        short, long = cfg.test_input_size[1:]
        assert short <= long and short >= cfg.input_size[1]
        with meta_device():
            model = vitadapter.create_model(tag)
        assert isinstance(model, Segmentor) and model.class_names == datasets[cfg.num_classes]
        assert model.mode == "slide" and model.crop_size == tuple(cfg.input_size[1:])
        if tag.startswith("upernet"):
            assert isinstance(model.decode_head, UPerHead) and model.auxiliary_head.loss_weight == 0.4
        else:
            assert isinstance(model.decode_head, Mask2FormerHead) and model.auxiliary_head is None
            assert model.decode_head.num_queries == (200 if "_896." in tag and not tag.endswith("cityscapes") else 100)
    for module in (ade20k, coco_stuff, cityscapes):
        assert len(module.CLASSES) == len(module.PALETTE) and len(set(module.CLASSES)) == len(module.CLASSES)
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in module.PALETTE)


def test_zoo_loads_a_whole_checkpoint_and_fine_tunes_to_other_classes(tmp_path):
    """pretrained with a local file (the download path is the backbones'): backbone and both heads
    load; with other num_classes the classifiers stay fresh and everything else loads."""
    small = dict(embed_dim=96, depth=4, num_heads=3, deform_num_heads=6, interaction_indexes=[0, 1, 2, 3])
    source = randomise(vitadapter.create_model("upernet_vit_adapter_t", **small))
    path = tmp_path / "release.pth"
    torch.save({"meta": {}, "state_dict": source.state_dict()}, path)
    file = dict(file=str(path))
    loaded = vitadapter.create_model("upernet_vit_adapter_t.augreg_ade20k", pretrained=True, pretrained_cfg_overlay=file, **small)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    other = vitadapter.create_model("upernet_vit_adapter_t", pretrained=True, pretrained_cfg_overlay=file, num_classes=5, **small)
    assert other.class_names is None and other.decode_head.conv_seg.weight.shape[0] == 5
    kept = {k: v for k, v in other.state_dict().items() if "conv_seg" not in k}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(ValueError, match="no backbone"):
        load_segmentor_checkpoint(other, {"state_dict": {"decode_head.conv_seg.weight": torch.zeros(1)}})


# ---- Mask2Former through the same segmentor ---------------------------------------------------------


def test_mask2former_segmentor_from_upstreams_config_and_checkpoint():
    """The seg_m2f fixture end to end: upstream's model dict (with its train_cfg and panoptic test
    settings) and a whole checkpoint (the head file plus the seg_vit backbone it was made on)."""
    meta, _, io = load_fixture("seg_m2f")
    from conftest import FIXTURES

    state = {k: v for k, v in torch.load(FIXTURES / "seg_vit.pth", weights_only=False)["state_dict"].items()}
    state.update(torch.load(FIXTURES / "seg_m2f_head.pth", weights_only=False)["state_dict"])
    cfg = {k: meta[k] for k in ("backbone", "decode_head", "train_cfg", "test_cfg")}
    segmentor = load_upstream_segmentor(cfg, {"state_dict": state}).eval()
    assert segmentor.mode == "slide" and segmentor.crop_size == (640, 640) and segmentor.auxiliary_head is None
    with torch.no_grad():
        logits = segmentor(io["input"])
    expected = F.interpolate(io["seg_logits_s4"], size=io["input"].shape[-2:], mode="bilinear", align_corners=False)
    assert logits.shape == (1, 150, 128, 160) and max_rel_err(logits, expected) < 1e-4
    labels = torch.randint(0, 150, (1, 128, 160))
    losses = segmentor.train().loss(io["input"], labels)
    assert {"loss_cls", "loss_mask", "loss_dice"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="not an auxiliary one"):
        load_upstream_segmentor(dict(cfg, auxiliary_head=dict(meta["decode_head"])))


def test_predict_runs_a_mask2former_segmentor_at_its_releases_test_scale():
    from PIL import Image

    from vitadapter.predict import default_scale, predict

    head = Mask2FormerHead([8] * 4, feat_channels=16, out_channels=16, num_queries=5, num_classes=4, num_groups=4,
                           encoder_layers=1, encoder_heads=2, encoder_ffn_channels=32, decoder_layers=2,
                           decoder_heads=2, decoder_ffn_channels=32)
    segmentor = Segmentor(TinyBackbone(), head, mode="slide", crop_size=64, stride=48).eval()
    image = Image.fromarray(torch.randint(0, 256, (75, 93, 3), dtype=torch.uint8).numpy())
    labels = predict(segmentor, image, scale=64)
    assert labels.shape == (75, 93) and labels.min() >= 0 and labels.max() < 4
    with meta_device():
        cityscapes_model = vitadapter.create_model("mask2former_beit_adapter_l_896.cityscapes")
        ade_model = vitadapter.create_model("upernet_beit_adapter_l")
    assert default_scale(cityscapes_model) == (1024, 2048) and default_scale(ade_model) == (640, 2048)


def test_a_mask2former_release_fine_tunes_to_other_classes(tmp_path):
    """Mask2Former's classifier is cls_embed (classes + "no object"): with other num_classes it stays
    fresh, everything else loads; the checkpoint's class count is read from it."""
    from vitadapter.converters.mmseg import checkpoint_num_classes

    def build(classes):
        head = Mask2FormerHead([32] * 4, feat_channels=16, out_channels=16, num_queries=5, num_classes=classes,
                               num_groups=4, encoder_layers=1, encoder_heads=2, encoder_ffn_channels=32,
                               decoder_layers=1, decoder_heads=2, decoder_ffn_channels=32)
        return Segmentor(vitadapter.ViTAdapter(embed_dim=32, depth=4, num_heads=2, deform_num_heads=2, conv_inplane=8,
                                               interaction_indexes=[0, 1, 2, 3]), head)

    source = randomise(build(7))
    checkpoint = {"state_dict": source.state_dict()}
    assert checkpoint_num_classes(checkpoint) == 7
    target = build(3)
    dropped = load_segmentor_checkpoint(target, checkpoint, keep_classifier=False)
    assert dropped == ["decode_head.cls_embed.bias", "decode_head.cls_embed.weight"]
    same = {k: v for k, v in target.state_dict().items() if "cls_embed" not in k}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.items())
    with pytest.raises(ValueError, match="cls_embed"):
        load_segmentor_checkpoint(build(3), checkpoint)

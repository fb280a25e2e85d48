"""Whole detectors: upstream's Mask R-CNN and Cascade Mask R-CNN fixtures loaded through
load_upstream_detector and run from the fixture's image; the test pipeline of detector(images); the
registered COCO detectors (parameters against upstream's tables, release files, weights loading)."""
import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitadapter
from conftest import FIXTURES
from local_server import LocalServer
from vitadapter._meta import meta_device
from vitadapter.models.checkpoints import load_detector_checkpoint
from vitadapter.data import coco
from vitadapter.models import DETECTOR_MODULES, Detector
from vitadapter.predict import detection_batch, predict_detections

NAMES = ["mask_rcnn", "cascade_mask_rcnn"]
RELEASES = "https://github.com/czczup/ViT-Adapter/releases/download/"


def fixture_config(name):
    """Upstream's model dict of a detection fixture with the det_vit backbone it ran on."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    backbone = json.loads((FIXTURES / "det_vit.json").read_text())["backbone"]
    return dict(meta["model"], backbone=backbone), meta


def whole_checkpoint(name):
    """The fixture's whole upstream checkpoint: the heads file plus det_vit's backbone.* tensors."""
    state = dict(torch.load(FIXTURES / "det_vit.pth", weights_only=False)["state_dict"])
    state.update(torch.load(FIXTURES / f"{name}_heads.pth", weights_only=True)["state_dict"])
    return {"meta": {}, "state_dict": state}


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    cfg, meta = fixture_config(name)
    detector = vitadapter.load_upstream_detector(cfg, whole_checkpoint(name)).eval()
    img = meta["img_metas"][0]
    return name, cfg, detector, load_file(FIXTURES / f"{name}_io.safetensors"), tuple(img["img_shape"][:2]), tuple(img["ori_shape"][:2])


def check_against_fixture(result, io, ori_shape):
    """The issue's bounds: boxes 1e-4 of the image size, scores 1e-4, labels equal, masks 0.1 %."""
    order = torch.argsort(io["det_rank_b0"])  # upstream lists class by class
    want, want_labels, want_masks = io["det_bboxes_b0"][order], io["det_labels_b0"][order], io["masks_b0"][order].bool()
    assert torch.equal(result["labels"], want_labels)
    assert (result["boxes"] - want[:, :4]).abs().max() <= 1e-4 * max(ori_shape)
    assert (result["scores"] - want[:, 4]).abs().max() <= 1e-4
    assert result["masks"].shape == want_masks.shape and (result["masks"] != want_masks).float().mean() <= 1e-3


def test_whole_upstream_detector_reproduces_the_fixture_from_its_image(case):
    """Backbone, FPN, RPN, RoI heads and masks, from the fixture's normalised and padded image."""
    _, _, detector, io, img_shape, ori_shape = case
    assert isinstance(detector, Detector) and detector.class_names == coco.CLASSES
    with torch.no_grad():
        (result,) = detector.detect(io["input"], [img_shape], [ori_shape])
    check_against_fixture(result, io, ori_shape)


def test_a_checkpoint_file_loads_as_the_dict_does(case, tmp_path):
    name, cfg, detector, _, _, _ = case
    path = tmp_path / f"{name}.pth"
    torch.save(whole_checkpoint(name), path)
    from_file = vitadapter.load_upstream_detector(cfg, path)
    assert all(torch.equal(a, b) for a, b in zip(detector.state_dict().values(), from_file.state_dict().values()))


def test_bad_checkpoints_are_named(case):
    name, cfg, _, _, _, _ = case
    other = "cascade_mask_rcnn" if name == "mask_rcnn" else "mask_rcnn"
    with pytest.raises(ValueError, match="segmentation checkpoint"):
        vitadapter.load_upstream_detector(cfg, FIXTURES / "seg_upernet.pth")
    with pytest.raises(ValueError, match="backbone-only"):
        vitadapter.load_upstream_detector(cfg, FIXTURES / "det_vit.pth")
    with pytest.raises(ValueError, match="heads-only"):
        vitadapter.load_upstream_detector(cfg, FIXTURES / f"{name}_heads.pth")
    with pytest.raises(ValueError, match="Cascade R-CNN"):  # the other detector type's weights, either way round
        vitadapter.load_upstream_detector(cfg, whole_checkpoint(other))


def test_other_configs_are_refused_by_name():
    cfg, _ = fixture_config("mask_rcnn")
    for kind in ("HybridTaskCascade", "RetinaNet"):
        with pytest.raises(ValueError, match=kind):
            vitadapter.load_upstream_detector(dict(cfg, type=kind))
    seg = json.loads((FIXTURES / "seg_upernet.json").read_text())
    with pytest.raises(ValueError, match="segmentation model config"):
        vitadapter.load_upstream_detector({k: seg[k] for k in ("backbone", "decode_head", "auxiliary_head")})
    with pytest.raises(ValueError, match="backbone"):
        vitadapter.load_upstream_detector({k: v for k, v in cfg.items() if k != "backbone"})
    with pytest.raises(ValueError, match="to_rgb"):
        vitadapter.load_upstream_detector(cfg, img_norm_cfg=dict(mean=[0] * 3, std=[1] * 3, to_rgb=False))


# ---- detector(images): upstream's test pipeline --------------------------------------------------------


def mmcv_rescaled(h, w, scale=(1333, 800)):
    """mmcv's rescale_size (keep ratio) written out: the factor that fits both limits, sizes rounded."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.mark.parametrize("size", [(107, 126), (32, 32), (600, 450), (40, 900), (2000, 1500)])
def test_detection_batch_follows_mmdets_resize_normalise_and_pad(size):
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    batch, sizes, originals = detection_batch([image], mean, std)
    h, w = mmcv_rescaled(*size)
    assert sizes == [(h, w)] and originals == [size]
    assert batch.shape == (1, 3, math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)
    resized = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    expected = (resized[0] - torch.tensor(mean).view(3, 1, 1) * 255) / (torch.tensor(std).view(3, 1, 1) * 255)
    torch.testing.assert_close(batch[0, :, :h, :w], expected)
    assert not batch[0, :, h:].any() and not batch[0, :, :, w:].any()  # zero padding after normalising


def test_detector_runs_images_of_different_sizes_in_their_own_pixels(case):
    """A list of images of different sizes, each detected in its own pixels; batched equals alone
    (up to convolution rounding), a batch tensor equals its list, an empty batch gives []."""
    _, _, detector, _, _, _ = case
    detector = copy.deepcopy(detector)
    detector.test_scale = (192, 160)  # small passes: the fixture's backbone is tiny but this is the CPU
    torch.manual_seed(1)
    images = [torch.rand(3, 107, 126) * 255, torch.rand(3, 32, 32) * 255, torch.rand(3, 40, 300) * 255]
    with torch.no_grad():
        results = detector(images)
        alone = [detector([image])[0] for image in images]
        stacked = detector(torch.stack([images[0], images[0].flip(-1)]))
    assert len(results) == 3
    for image, result, single in zip(images, results, alone):
        h, w = image.shape[-2:]
        assert set(result) == {"boxes", "scores", "labels", "masks"}
        assert result["masks"].shape == (len(result["labels"]), h, w) and result["masks"].dtype == torch.bool
        if len(result["labels"]):
            assert result["boxes"][:, 0::2].max() <= w + 1e-3 and result["boxes"][:, 1::2].max() <= h + 1e-3
            assert result["boxes"].min() >= 0 and bool((result["scores"][:-1] >= result["scores"][1:]).all())
            assert result["labels"].max() < len(detector.class_names)
        assert torch.equal(result["labels"], single["labels"])
        torch.testing.assert_close(result["boxes"], single["boxes"], rtol=0, atol=1e-3 * max(h, w))
    assert len(results[0]["labels"]) > 0
    assert torch.equal(stacked[0]["labels"], results[0]["labels"])
    assert detector([]) == [] and detector(torch.zeros(0, 3, 64, 64)) == []


def test_predict_detections_takes_a_pil_image(case):
    from PIL import Image

    _, _, detector, _, _, _ = case
    detector = copy.deepcopy(detector)
    detector.test_scale = (192, 160)
    pixels = torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8)
    with torch.no_grad():
        result = predict_detections(detector, Image.fromarray(pixels.numpy()))
        (direct,) = detector([pixels.permute(2, 0, 1)])
    assert result["masks"].shape[1:] == (70, 90)
    assert all(torch.equal(result[k], direct[k]) for k in result)
    with pytest.raises(TypeError, match="PIL"):
        predict_detections(detector, pixels)


def test_bad_images_are_named(case):
    _, _, detector, _, _, _ = case
    with pytest.raises(ValueError, match="images"):
        detector(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"images\[1\]"):
        detector([torch.zeros(3, 64, 64), torch.zeros(4, 64, 64)])
    with pytest.raises(TypeError, match="images"):
        detector("photo.jpg")
    with pytest.raises(ValueError, match="images"):
        detector.detect(torch.zeros(3, 64, 64), [(64, 64)], [(64, 64)])
    with pytest.raises(ValueError, match="original_sizes"):
        detector.detect(torch.zeros(1, 3, 64, 64), [(64, 64)], [])


# ---- the zoo -------------------------------------------------------------------------------------------

# upstream's detection READMEs: release file, box AP, mask AP, "#Param" (millions)
UPSTREAM = {
    "mask_rcnn_vit_adapter_t.coco": ("v0.1.2/mask_rcnn_deit_adapter_tiny_fpn_3x_coco.pth.tar", 46.0, 41.0, 28),
    "mask_rcnn_vit_adapter_t.coco_1x": ("mask_rcnn_deit_adapter_tiny_fpn_1x_coco.pth", 41.1, 37.5, 28),
    "mask_rcnn_vit_adapter_s.coco": ("v0.1.2/mask_rcnn_deit_adapter_small_fpn_3x_coco.pth.tar", 48.2, 42.8, 48),
    "mask_rcnn_vit_adapter_b.coco": ("v0.1.6/mask_rcnn_deit_adapter_base_fpn_3x_coco.pth.tar", 49.6, 43.6, 120),
    "mask_rcnn_vit_adapter_l.coco": ("v0.3.1/mask_rcnn_augreg_adapter_large_fpn_3x_coco.pth", 52.1, 46.0, 348),
    "mask_rcnn_uniperceiver_adapter_b.coco": ("v0.3.1/mask_rcnn_uniperceiver_adapter_base_fpn_3x_coco.pth", 51.2, 45.3, 120),
    "mask_rcnn_dinov2_adapter_s.coco": ("mask_rcnn_dinov2_adapter_small_fpn_3x_coco.pth", 51.5, 45.6, 48),
    "mask_rcnn_dinov2_adapter_b.coco": ("mask_rcnn_dinov2_adapter_base_fpn_3x_coco.pth", 54.1, 47.8, 120),
    "mask_rcnn_dinov2_adapter_l.coco": ("mask_rcnn_dinov2_adapter_large_fpn_3x_coco.pth", 55.3, 49.0, 348),
    "mask_rcnn_vit_adapter_s_nofpn.coco": ("v0.1.6/mask_rcnn_deit_adapter_small_3x_coco.pth.tar", 48.2, 42.7, 45),
    "cascade_mask_rcnn_vit_adapter_s.coco": ("v0.1.3/cascade_mask_rcnn_deit_adapter_small_fpn_3x_coco.pth.tar", 51.5, 44.3, 86),
    "cascade_mask_rcnn_vit_adapter_b.coco": ("v0.3.1/cascade_mask_rcnn_deit_adapter_base_fpn_3x_coco.pth", 52.1, 44.8, 158),
    "htc_augreg_adapter_l.coco": ("v0.3.1/htc++_augreg_adapter_large_fpn_3x_coco.pth", 56.6, 49.0, 401),
    "htc_beit_adapter_l.coco": ("0.3.0/htc++_beit_adapter_large_fpn_3x_coco.pth.tar", 58.4, 50.8, 401),
    "htc_beitv2_adapter_l.coco": ("v0.3.1/htc++_beitv2_adapter_large_fpn_3x_coco.pth", 58.8, 51.1, 401),
    "htc_beitv2_adapter_l_gn.o365_coco": ("v0.3.1/htc++_beitv2_adapter_large_fpn_o365_coco.pth", 61.8, 53.0, 401),
}


def test_zoo_names_upstreams_release_files_and_builds_with_its_parameter_counts():
    archs = sorted(a for m in DETECTOR_MODULES for a in timm.list_models(module=m))
    assert archs == sorted({name.split(".")[0] for name in UPSTREAM}) and set(archs) <= set(vitadapter.list_models())
    assert sorted(n for n in vitadapter.list_pretrained() if n.split(".")[0] in archs) == sorted(UPSTREAM)
    for name, (file, box, mask, millions) in UPSTREAM.items():
        cfg = timm.models.get_pretrained_cfg(name)
        if "/" in file:
            assert cfg.url == RELEASES + file
        else:  # linked from upstream's READMEs on its Hugging Face repo
            assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("czczup/ViT-Adapter", file)
        assert f"box AP {box} / mask AP {mask}" in cfg.notes[1]
        with meta_device():
            model = vitadapter.create_model(name)
        assert isinstance(model, Detector) and model.class_names == coco.CLASSES and model.num_classes == 80
        stages = 1 if name.startswith("mask_rcnn") else 3
        assert len(model.roi_head.bbox_heads) == stages and len(model.roi_head.mask_heads) == len(model.roi_head.bbox_heads)
        necks = ["ExtraAttention", "FPN"] if name.startswith("htc") else ["ChannelMapperWithPooling" if "nofpn" in name else "FPN"]
        assert [type(m).__name__ for m in (model.neck if name.startswith("htc") else [model.neck])] == necks
        count = sum(p.numel() for p in model.parameters())
        if name in ("mask_rcnn_dinov2_adapter_b.coco", "mask_rcnn_dinov2_adapter_l.coco"):
            # upstream's DINOv2 table repeats the DeiT-B / AugReg-L rows' counts; these backbones
            # differ from those only by their 37x37 position grid (592 px)
            base = "mask_rcnn_vit_adapter_b" if name.endswith("b.coco") else "mask_rcnn_vit_adapter_l"
            with meta_device():
                other = vitadapter.create_model(base)
            grid = 14 if base.endswith("_b") else 24
            width = model.backbone.embed_dim
            assert count - sum(p.numel() for p in other.parameters()) == (37 * 37 - grid * grid) * width
            assert round(count / 1e6) == millions + 1
        elif name == "htc_augreg_adapter_l.coco":
            # upstream's htc++ table gives every row 401M; AugReg-L's detector has BEiT-L's heads, and its
            # backbone lacks BEiT's relative position tables (14- and 56-token windows) and has one more
            # qkv bias per block and a 24x24 position embedding instead: 400.3M
            with meta_device():
                beit = vitadapter.create_model("htc_beit_adapter_l")
            tables = 16 * (20 * (2 * 14 - 1) ** 2 + 4 * (2 * 56 - 1) ** 2)
            width = model.backbone.embed_dim
            assert sum(p.numel() for p in beit.parameters()) - count == tables - 24 * width - 24 * 24 * width
            assert round(count / 1e6) == millions - 1
        else:
            assert round(count / 1e6) == millions, name
    half = timm.models.get_pretrained_cfg("mask_rcnn_vit_adapter_l.coco")
    assert half.mean == (0.5, 0.5, 0.5)  # AugReg-L's own test pipeline normalises to [-1, 1]


def tiny_detector_kwargs():
    """A T detector on the det_vit fixture's tiny backbone (the heads keep upstream's widths)."""
    from vitadapter.upstream import upstream_kwargs

    return upstream_kwargs(json.loads((FIXTURES / "det_vit.json").read_text())["backbone"], "detection")


def randomise(model):
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor).abs() if tensor.dim() == 1 else torch.randn_like(tensor) * 0.05)
    return model


def test_pretrained_release_downloads_and_loads_whole_then_fine_tunes_to_other_classes(tmp_path):
    """pretrained=True fetches the tag's release (served on 127.0.0.1) and loads backbone, neck and
    heads; with num_classes=5 everything but the class-specific layers loads."""
    kwargs = tiny_detector_kwargs()
    source = randomise(vitadapter.create_model("mask_rcnn_vit_adapter_t", **kwargs))
    # upstream's layout: backbone keys as upstream's checkpoint writes them, heads as they are
    upstream_state = whole_checkpoint("mask_rcnn")["state_dict"]
    heads = {k: v for k, v in source.state_dict().items() if not k.startswith("backbone.")}
    state = {**{k: v for k, v in upstream_state.items() if k.startswith("backbone.")}, **heads}
    path = "/czczup/ViT-Adapter/releases/download/v0.1.2/mask_rcnn_deit_adapter_tiny_fpn_3x_coco.pth.tar"
    release = tmp_path / "release.pth"
    torch.save({"meta": {}, "state_dict": state}, release)
    with LocalServer({path: release.read_bytes()}) as server:
        overlay = dict(url=server.url + path)
        loaded = vitadapter.create_model("mask_rcnn_vit_adapter_t.coco", pretrained=True, cache_dir=tmp_path / "cache",
                                         pretrained_cfg_overlay=overlay, **kwargs)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in heads.items())
    reference = vitadapter.load_upstream(json.loads((FIXTURES / "det_vit.json").read_text())["backbone"], "detection",
                                         FIXTURES / "det_vit.pth")
    assert all(torch.equal(v, loaded.backbone.state_dict()[k]) for k, v in reference.state_dict().items())
    file = dict(file=str(release))
    other = vitadapter.create_model("mask_rcnn_vit_adapter_t.coco", pretrained=True, pretrained_cfg_overlay=file, num_classes=5, **kwargs)
    assert other.class_names is None and other.roi_head.bbox_head.fc_cls.out_features == 6
    assert other.roi_head.bbox_head.fc_reg.out_features == 20 and other.roi_head.mask_head.conv_logits.out_channels == 5
    fresh = [k for k in other.state_dict() if k.startswith(("roi_head.bbox_head.fc_", "roi_head.mask_head.conv_logits"))]
    assert len(fresh) == 6
    kept = {k: v for k, v in other.state_dict().items() if k not in fresh}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(ValueError, match="checkpoint does not fit"):  # strict when the class count is the release's
        load_detector_checkpoint(loaded, {"state_dict": {**state, "roi_head.bbox_head.fc_cls.bias": torch.zeros(3)}})
    with pytest.raises(ValueError, match="features_only"):
        vitadapter.create_model("mask_rcnn_vit_adapter_t", features_only=True)


def test_cascade_release_loads_and_dinov2_refuses_a_backbone_it_cannot_have(tmp_path):
    kwargs = tiny_detector_kwargs()
    source = randomise(vitadapter.create_model("cascade_mask_rcnn_vit_adapter_s", **kwargs))
    path = tmp_path / "cascade.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # vitadapter's own backbone keys load too
    loaded = vitadapter.create_model("cascade_mask_rcnn_vit_adapter_s.coco", pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="3-stage Cascade R-CNN"):
        vitadapter.create_model("mask_rcnn_vit_adapter_s.coco", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    with pytest.raises(ValueError, match="pretrained_backbone"):
        vitadapter.create_model("mask_rcnn_dinov2_adapter_s", pretrained_backbone=True)

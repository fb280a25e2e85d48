"""Whole detectors (backbone, neck, RPN and RoI heads) in the weights machinery: save_pretrained
folders, local-dir: and hf-hub: names, push_to_hub, config checks, the memory check, and `vitadapter
convert --arch` of whole upstream detection checkpoints."""
import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitadapter
from conftest import FIXTURES, load_fixture
from local_server import HubUploads, LocalServer, hub_endpoint
from test_detector import check_against_fixture, fixture_config, whole_checkpoint
from vitadapter import hub, memory_check
from vitadapter.cli import main
from vitadapter.converters.mmdet import CLASS_SPECIFIC
from vitadapter.data import coco
from vitadapter.models import Detector
from vitadapter.upstream import upstream_kwargs

# the det_vit fixture's tiny backbone as detector arguments
BACKBONE = upstream_kwargs(json.loads((FIXTURES / "det_vit.json").read_text())["backbone"], "detection")
TINY_MASK_RCNN = dict(BACKBONE, neck_channels=32, box_fc_channels=48, mask_channels=16)
TINY_CASCADE = dict(TINY_MASK_RCNN, box_conv_channels=8)
# the shared fixtures' heads (their JSON "widths") as arguments of the registered architectures
FIXTURE_HEADS = {
    "mask_rcnn": ("mask_rcnn_vit_adapter_t", dict(BACKBONE, neck_channels=64, box_fc_channels=128, mask_channels=64)),
    "cascade_mask_rcnn": ("cascade_mask_rcnn_vit_adapter_s",
                          dict(BACKBONE, neck_channels=64, box_fc_channels=64, mask_channels=32, box_conv_channels=32)),
}
SMALL_SCALE = (192, 160)  # detector(images) at a small test scale: the CPU


def randomised(model):
    """``model`` with every float entry of its state dict drawn at random (norm weights and variances
    positive, weights small enough that detections survive), so that a value lost or left at its
    initialisation shows."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            drawn = torch.randn(v.shape, generator=generator)
            v = drawn.abs() + 0.5 if v.dim() == 1 else drawn * 0.05
        state[k] = v
    model.load_state_dict(state)
    return model.eval()


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []


def detections(detector, images):
    detector.test_scale = SMALL_SCALE
    with torch.no_grad():
        return detector(images)


def assert_same_detections(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert len(a["labels"]) > 0  # something to compare
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


IMAGES = [torch.rand(3, 107, 126, generator=torch.Generator().manual_seed(2)) * 255]


def test_a_registered_mask_rcnn_comes_back_bit_for_bit_with_its_classes(tmp_path):
    model = randomised(vitadapter.create_model("mask_rcnn_vit_adapter_t", **TINY_MASK_RCNN))
    model.mean, model.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # set after building: the folder keeps them
    folder = vitadapter.save_pretrained(model, tmp_path / "det")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mask_rcnn_vit_adapter_t" and config["num_classes"] == 80
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_classes"]) == (96, 4, 80)
    assert (args["neck_channels"], args["box_fc_channels"], args["mask_channels"]) == (32, 48, 16)
    cfg = config["pretrained_cfg"]
    assert cfg["label_names"] == list(coco.CLASSES) and (cfg["mean"], cfg["std"]) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    assert "url" not in cfg  # the release's file is not this folder's

    expected = detections(model, IMAGES)
    for again in (vitadapter.create_model(f"local-dir:{folder}", pretrained=True),
                  timm.create_model(f"local-dir:{folder}", pretrained=True)):
        assert type(again) is Detector and again.class_names == coco.CLASSES
        assert (again.mean, again.std) == (model.mean, model.std)
        assert again.neck.fpn_convs[0].conv.out_channels == 32 and again.roi_head.mask_head.convs[0].conv.out_channels == 16
        assert_same_state(model, again)
        assert_same_detections(detections(again.eval(), IMAGES), expected)
    # without pretrained=True: the same architecture and arguments, fresh weights
    fresh = vitadapter.create_model(f"local-dir:{folder}")
    assert fresh.model_args == model.model_args
    assert not torch.equal(fresh.roi_head.bbox_head.fc_cls.weight, model.roi_head.bbox_head.fc_cls.weight)


def test_a_cascade_of_other_classes_loads_back_and_fine_tunes_to_yet_others(tmp_path):
    model = randomised(vitadapter.create_model("cascade_mask_rcnn_vit_adapter_s", num_classes=3, **TINY_CASCADE))
    assert model.class_names is None
    folder = vitadapter.save_pretrained(model, tmp_path / "three")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == config["pretrained_cfg"]["num_classes"] == 3
    assert config["pretrained_cfg"]["label_names"] is None and config["model_args"]["box_conv_channels"] == 8
    again = vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    assert again.num_classes == 3 and again.class_names is None and len(again.roi_head.bbox_heads) == 3
    assert_same_state(model, again)
    assert_same_detections(detections(again.eval(), IMAGES), detections(model, IMAGES))

    # another class count asked for: everything but the class-specific layers loads, as from a release
    five = vitadapter.create_model(f"local-dir:{folder}", pretrained=True, num_classes=5)
    assert five.num_classes == 5 and five.roi_head.bbox_heads[2].fc_cls.out_features == 6
    state, five_state = model.state_dict(), five.state_dict()
    fresh = sorted(k for k in state if state[k].shape != five_state[k].shape)
    assert fresh == sorted(k for k in state if CLASS_SPECIFIC.match(k)) and len(fresh) == 3 * 4 + 3 * 2
    assert all(torch.equal(state[k], five_state[k]) for k in state if k not in fresh)


def test_folder_loads_are_strict_and_name_the_keys(tmp_path):
    model = vitadapter.create_model("mask_rcnn_vit_adapter_t", num_classes=4, **TINY_MASK_RCNN)
    folder = vitadapter.save_pretrained(model, tmp_path / "det")
    state = load_file(folder / "model.safetensors")

    def load_with(tensors):
        save_file(tensors, folder / "model.safetensors")
        return vitadapter.create_model(f"local-dir:{folder}", pretrained=True)

    for key in ("backbone.spm.stem.0.weight", "neck.fpn_convs.0.conv.weight", "roi_head.mask_head.conv_logits.bias"):
        with pytest.raises(ValueError, match=f"missing keys: {re.escape(key)}"):
            load_with({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=r"unexpected keys: rpn_head\.extra"):
        load_with(dict(state, **{"rpn_head.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"holds keys this mask_rcnn_vit_adapter_t does not have: decode_head\.conv_seg\.weight"):
        load_with(dict(state, **{"decode_head.conv_seg.weight": torch.zeros(2)}))
    # a classifier for other classes than config.json says: refused, not silently re-initialised
    with pytest.raises(ValueError, match=r"roi_head\.bbox_head\.fc_cls\.bias: checkpoint \(8,\) vs model \(5,\)"):
        load_with(dict(state, **{"roi_head.bbox_head.fc_cls.weight": torch.zeros(8, 48), "roi_head.bbox_head.fc_cls.bias": torch.zeros(8)}))
    assert_same_state(model, load_with(state))


def test_detectors_that_would_not_come_back_are_refused(tmp_path):
    cfg, _ = fixture_config("mask_rcnn")
    assembled = vitadapter.load_upstream_detector(cfg, whole_checkpoint("mask_rcnn"))
    with pytest.raises(ValueError, match="load_upstream_detector.*load_detector_checkpoint.*convert CHECKPOINT DST --arch NAME"):
        vitadapter.save_pretrained(assembled, tmp_path / "a")
    model = vitadapter.create_model("mask_rcnn_vit_adapter_t", **TINY_MASK_RCNN)
    model.roi_head.mask_head = None  # changed after it was built: its arguments say it has one
    with pytest.raises(ValueError, match=r"this detector no longer matches mask_rcnn_vit_adapter_t.*roi_head\.mask_head\."):
        vitadapter.save_pretrained(model, tmp_path / "b")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model_args"].pop("num_classes"), "model_args.num_classes is missing: a detector's"),
    (lambda c: c["model_args"].update(num_classes=0), "model_args.num_classes must be an integer from 1"),
    (lambda c: c["model_args"].update(neck_channels="32"), "model_args.neck_channels must be an integer"),
    (lambda c: c["model_args"].update(box_fc_channels=10**6), "model_args.box_fc_channels must be an integer from 1 to 4096"),
    (lambda c: c["model_args"].update(mask_channels=True), "model_args.mask_channels must be an integer"),
    (lambda c: c["model_args"].update(head_channels=8), "unknown model argument.*model_args.head_channels"),
    (lambda c: c["pretrained_cfg"].update(label_names=["a", "b"]), "lists 2 names for 4 classes"),
    (lambda c: c["pretrained_cfg"].update(std=[0.2, 0.0, 0.2]), "pretrained_cfg.std must be 3 positive numbers"),
])
def test_detector_config_json_is_checked_before_building(tmp_path, edit, message):
    folder = vitadapter.save_pretrained(vitadapter.create_model("mask_rcnn_vit_adapter_t", num_classes=4, **TINY_MASK_RCNN), tmp_path / "det")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(ValueError, match=message):  # and before an upload
        hub.check_upload(folder)


def test_push_to_hub_uploads_a_detector_that_loads_back_from_the_hub(tmp_path, monkeypatch):
    model = randomised(vitadapter.create_model("mask_rcnn_vit_adapter_t", **TINY_MASK_RCNN))
    folder = vitadapter.save_pretrained(model, tmp_path / "det")
    sizes = dict(hub.check_upload(folder))
    assert sizes == {name: (folder / name).stat().st_size for name in ("config.json", "model.safetensors")}
    with HubUploads() as server:
        hub_endpoint(monkeypatch, server.url)
        url = vitadapter.push_to_hub(folder, "vitadapter-test/tiny-det")
    assert url.startswith(server.url + "/vitadapter-test/tiny-det/commit/")
    uploaded = server.committed
    assert sorted(uploaded) == ["config.json", "model.safetensors"]

    files = {f"/vitadapter-test/tiny-det/resolve/main/{name}": data for name, data in uploaded.items()}
    with LocalServer(files) as server:
        hub_endpoint(monkeypatch, server.url)
        again = vitadapter.create_model("hf-hub:vitadapter-test/tiny-det", pretrained=True, cache_dir=tmp_path / "cache")
    assert again.class_names == coco.CLASSES
    assert_same_state(model, again)
    assert_same_detections(detections(again.eval(), IMAGES), detections(model, IMAGES))

    # weights of another detector than config.json describes: not uploaded
    other = vitadapter.save_pretrained(vitadapter.create_model("cascade_mask_rcnn_vit_adapter_s", **TINY_CASCADE), tmp_path / "other")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"does not load into the mask_rcnn_vit_adapter_t.*roi_head\.bbox_head\.0\."):
        hub.check_upload(folder)


def test_the_memory_check_sizes_a_detector_at_its_test_scale(tmp_path, monkeypatch):
    """A detector resizes every image to fit 1333 x 800: its config's input_size does not make it
    larger. Heads wide enough to weigh over 2 GiB are run on fake tensors (the dense part: the
    proposals' count needs values) and refused with the numbers."""
    folder = vitadapter.save_pretrained(vitadapter.create_model("mask_rcnn_vit_adapter_t", **TINY_MASK_RCNN), tmp_path / "det")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 16384, 16384]
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(memory_check, "available_memory", lambda: 1 << 30)
    vitadapter.create_model(f"local-dir:{folder}", pretrained=True)

    wide = tmp_path / "wide"
    wide.mkdir()
    args = dict(config["model_args"], neck_channels=4096, box_fc_channels=4096)
    (wide / "config.json").write_text(json.dumps(dict(architecture="mask_rcnn_vit_adapter_t", model_args=args)))
    monkeypatch.setattr(memory_check, "available_memory", lambda: 4 << 30)
    # the largest map: 4096 channels at stride 4 of a 1344 x 800 image, float32 (the neck's and the RPN's)
    words = r"needs about \d+\.\d GiB \([\d,]+ M parameters.*largest activation for one 1344x800 image: 1\.0 GiB"
    with pytest.raises(ValueError, match=f"local-dir:{wide} config.json.*{words}.*VITADAPTER_ALLOW_LARGE_MODELS=1"):
        vitadapter.create_model(f"local-dir:{wide}")


# ---- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FIXTURE_HEADS))
def test_convert_a_whole_upstream_detector_checkpoint_then_detect_with_the_folder(name, tmp_path, capsys):
    """The shared fixture's whole checkpoint (its backbone and heads files together) converts into a
    folder of the registered architecture that gives upstream's detections."""
    arch, kwargs = FIXTURE_HEADS[name]
    source = tmp_path / f"{name}.pth"
    torch.save(whole_checkpoint(name), source)
    dst = tmp_path / "converted"
    assert main(["convert", str(source), str(dst), "--arch", arch, "--model-kwargs", json.dumps(kwargs)]) == 0
    captured = capsys.readouterr()
    assert [line.split("]")[0] for line in captured.err.splitlines()] == [f"convert [{n}/3" for n in (1, 2, 3)]
    assert "dropped 0 keys: nothing" in captured.out and f"wrote {dst}" in captured.out

    detector = vitadapter.create_model(f"local-dir:{dst}", pretrained=True).eval()
    assert detector.class_names == coco.CLASSES and detector.model_args["num_classes"] == 80
    meta, _, io = load_fixture(name)
    img = meta["img_metas"][0]
    img_shape, ori_shape = tuple(img["img_shape"][:2]), tuple(img["ori_shape"][:2])
    with torch.no_grad():
        (result,) = detector.detect(io["input"], [img_shape], [ori_shape])
    check_against_fixture(result, io, ori_shape)
    cfg, _ = fixture_config(name)
    upstream = vitadapter.load_upstream_detector(cfg, source).eval()
    assert_same_state(upstream, detector)
    assert_same_detections(detections(detector, IMAGES), detections(upstream, IMAGES))


def test_convert_refuses_a_checkpoint_of_the_other_task_in_one_line(tmp_path, capsys):
    mask_rcnn_arch, kwargs = FIXTURE_HEADS["mask_rcnn"]
    detection = tmp_path / "mask_rcnn.pth"
    torch.save(whole_checkpoint("mask_rcnn"), detection)
    argv = ["convert", str(FIXTURES / "seg_upernet.pth"), str(tmp_path / "a"), "--arch", mask_rcnn_arch,
            "--model-kwargs", json.dumps(kwargs)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 3 and err.strip().splitlines()[-1].startswith("vitadapter: error: ")
    assert "it is a segmentation checkpoint (decode_head.*): load it with a segmentor" in err
    segmentor_kwargs = dict(embed_dim=96, depth=4, num_heads=3, deform_num_heads=6, interaction_indexes=[0, 1, 2, 3], head_channels=64)
    argv = ["convert", str(detection), str(tmp_path / "b"), "--arch", "upernet_vit_adapter_s",
            "--model-kwargs", json.dumps(segmentor_kwargs)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("vitadapter: error: not a segmentation checkpoint: it is a whole detector's")
    assert "load it with a detector" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask_rcnn.pth"]  # no folder left behind

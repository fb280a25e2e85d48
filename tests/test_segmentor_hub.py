"""Whole segmentors (backbone and heads) in the weights machinery: save_pretrained folders, local-dir:
and hf-hub: names, push_to_hub, and `vitadapter convert` of whole upstream segmentation checkpoints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitadapter
from conftest import FIXTURES, load_fixture, max_rel_err
from local_server import HubUploads, LocalServer, hub_endpoint
from vitadapter import hub
from vitadapter.cli import main
from vitadapter.data import ade20k, cityscapes

TINY_UPERNET = dict(embed_dim=96, depth=4, num_heads=3, deform_num_heads=6, interaction_indexes=[0, 1, 2, 3],
                    head_channels=32, aux_channels=16)
# the seg_upernet fixture's backbone and decode head as upernet_vit_adapter_s arguments (its FCN head is
# not the registered recipe: left out)
FIXTURE_UPERNET = dict(embed_dim=96, depth=4, num_heads=3, deform_num_heads=6, conv_inplane=16,
                       interaction_indexes=[0, 1, 2, 3], head_channels=64, auxiliary_head=False)
TINY_M2F = dict(trunk_kwargs=dict(embed_dim=64, depth=4, num_heads=2, img_size=64), interaction_indexes=[0, 1, 2, 3],
                deform_num_heads=2, conv_inplane=8)


def randomised(model):
    """``model`` with every float entry of its state dict drawn at random (variances positive), so that
    a value lost or left at its initialisation shows."""
    generator = torch.Generator().manual_seed(1)
    state = {
        k: (torch.rand(v.shape, generator=generator) + 0.5 if k.endswith("running_var") else torch.randn(v.shape, generator=generator))
        if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(state)
    return model


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert different == []


def test_a_registered_upernet_comes_back_bit_for_bit_with_its_classes(tmp_path):
    model = randomised(vitadapter.create_model("upernet_vit_adapter_t", **TINY_UPERNET)).eval()
    assert model.class_names == ade20k.CLASSES
    folder = vitadapter.save_pretrained(model, tmp_path / "seg")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "upernet_vit_adapter_t" and config["num_classes"] == 150
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_classes"]) == (96, 4, 150)
    assert (args["head_channels"], args["aux_channels"], args["auxiliary_head"]) == (32, 16, True)
    assert config["pretrained_cfg"]["label_names"] == list(ade20k.CLASSES)
    assert "url" not in config["pretrained_cfg"]  # the release's file is not this folder's

    for again in (vitadapter.create_model(f"local-dir:{folder}", pretrained=True),
                  timm.create_model(f"local-dir:{folder}", pretrained=True)):
        assert type(again) is vitadapter.Segmentor and again.class_names == ade20k.CLASSES
        assert again.auxiliary_head is not None and again.decode_head.channels == 32
        assert_same_state(model, again)
    image = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(model(image), again.eval()(image))
    # without pretrained=True: the same architecture and arguments, fresh weights
    fresh = vitadapter.create_model(f"local-dir:{folder}")
    assert fresh.model_args == model.model_args
    assert not torch.equal(fresh.decode_head.conv_seg.weight, model.decode_head.conv_seg.weight)


def test_a_fine_tuned_class_count_without_names_and_no_auxiliary_head(tmp_path):
    model = randomised(vitadapter.create_model("upernet_vit_adapter_t", num_classes=5, **dict(TINY_UPERNET, auxiliary_head=False)))
    assert model.class_names is None and model.auxiliary_head is None
    folder = vitadapter.save_pretrained(model, tmp_path / "five")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == config["pretrained_cfg"]["num_classes"] == 5
    assert config["pretrained_cfg"]["label_names"] is None  # not ADE20K's 150 names
    again = vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    assert again.num_classes == 5 and again.class_names is None and again.auxiliary_head is None
    assert_same_state(model, again)
    # another class count asked for: everything but the classifier loads, as from a release
    three = vitadapter.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3)
    assert three.decode_head.conv_seg.weight.shape[0] == 3
    assert torch.equal(three.decode_head.bottleneck.conv.weight, model.decode_head.bottleneck.conv.weight)


def test_a_mask2former_keeps_its_query_count(tmp_path):
    model = randomised(vitadapter.create_model("mask2former_beit_adapter_b_512", num_classes=4, num_queries=7, **TINY_M2F))
    folder = vitadapter.save_pretrained(model, tmp_path / "m2f")
    args = json.loads((folder / "config.json").read_text())["model_args"]
    assert args["num_queries"] == 7 and args["trunk"] == "beit_base_patch16_224" and args["trunk_kwargs"]["depth"] == 4
    again = vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    assert again.decode_head.num_queries == 7 and again.num_classes == 4
    assert_same_state(model, again)


def test_a_tags_own_query_count_and_classes_are_written_out():
    """Cityscapes' Mask2Former has 100 queries where its architecture has 200: the tag decides, so the
    folder must say it (the tag's name is not what rebuilds it). Built without memory."""
    with torch.device("meta"):
        model = vitadapter.create_model("mask2former_beit_adapter_l_896.cityscapes")
    config = hub.segmentor_config(model)
    assert config["model_args"]["num_queries"] == 100 and config["num_classes"] == 19
    assert config["pretrained_cfg"]["label_names"] == list(cityscapes.CLASSES)
    assert config["pretrained_cfg"]["test_input_size"] == (3, 1024, 2048)


def test_folder_loads_are_strict_and_name_the_keys(tmp_path):
    model = vitadapter.create_model("upernet_vit_adapter_t", num_classes=5, **TINY_UPERNET)
    folder = vitadapter.save_pretrained(model, tmp_path / "seg")
    state = load_file(folder / "model.safetensors")

    def load_with(tensors):
        save_file(tensors, folder / "model.safetensors")
        return vitadapter.create_model(f"local-dir:{folder}", pretrained=True)

    missing = {k: v for k, v in state.items() if k != "decode_head.bottleneck.conv.weight"}
    with pytest.raises(ValueError, match=r"decode_head\.bottleneck\.conv\.weight"):
        load_with(missing)
    with pytest.raises(ValueError, match=r"decode_head\.extra\.weight"):
        load_with(dict(state, **{"decode_head.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"neck\.weight"):
        load_with(dict(state, **{"neck.weight": torch.zeros(2)}))
    # a classifier for other classes than config.json says: refused, not silently re-initialised
    with pytest.raises(ValueError, match=r"decode_head\.conv_seg\.weight"):
        load_with(dict(state, **{"decode_head.conv_seg.weight": torch.zeros(7, 32, 1, 1), "decode_head.conv_seg.bias": torch.zeros(7)}))
    assert_same_state(model, load_with(state))


def test_segmentors_that_would_not_come_back_are_refused(tmp_path):
    meta, ckpt, _ = load_fixture("seg_upernet")
    assembled = vitadapter.load_upstream_segmentor({k: meta[k] for k in ("backbone", "decode_head", "auxiliary_head")}, ckpt)
    with pytest.raises(ValueError, match="load_upstream_segmentor.*convert CHECKPOINT DST --arch NAME"):
        vitadapter.save_pretrained(assembled, tmp_path / "a")
    model = vitadapter.create_model("upernet_vit_adapter_t", num_classes=5, **TINY_UPERNET)
    model.auxiliary_head = None  # changed after it was built: its arguments say it has one
    with pytest.raises(ValueError, match=r"no longer matches upernet_vit_adapter_t.*auxiliary_head\."):
        vitadapter.save_pretrained(model, tmp_path / "b")
    with pytest.raises(TypeError, match="ViTAdapter, Segmentor or Detector, got Linear"):
        vitadapter.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "c")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model_args"].pop("num_classes"), "model_args.num_classes is missing"),
    (lambda c: c["model_args"].update(num_classes="5"), "model_args.num_classes must be an integer"),
    (lambda c: c["model_args"].update(head_channels=0), "model_args.head_channels must be an integer from 1"),
    (lambda c: c["model_args"].update(auxiliary_head="yes"), "model_args.auxiliary_head must be true or false"),
    (lambda c: c["model_args"].update(neck_channels=8), "unknown model argument.*model_args.neck_channels"),
    (lambda c: c["model_args"].update(depth=10_000), "model_args.depth must be an integer"),
    (lambda c: c["pretrained_cfg"].update(label_names=["a", "b"]), "lists 2 names for 5 classes"),
])
def test_segmentor_config_json_is_checked_before_building(tmp_path, edit, message):
    folder = vitadapter.save_pretrained(vitadapter.create_model("upernet_vit_adapter_t", num_classes=5, **TINY_UPERNET), tmp_path / "seg")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        vitadapter.create_model(f"local-dir:{folder}", pretrained=True)


HUB_CLIENT = """
import sys
from pathlib import Path
from safetensors.torch import save_file
import vitadapter
model = vitadapter.create_model("hf-hub:vitadapter-test/tiny-upernet", pretrained=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(sys.argv[1]) / "loaded.safetensors")
print(",".join(model.class_names))
"""


def test_push_to_hub_uploads_a_segmentor_that_loads_back_from_the_hub(tmp_path, monkeypatch):
    model = randomised(vitadapter.create_model("upernet_vit_adapter_t", **TINY_UPERNET))
    with HubUploads() as server:
        hub_endpoint(monkeypatch, server.url)
        url = vitadapter.push_to_hub(model, "vitadapter-test/tiny-upernet")
    assert url.startswith(server.url + "/vitadapter-test/tiny-upernet/commit/")
    uploaded = server.committed
    assert sorted(uploaded) == ["config.json", "model.safetensors"]

    # what was uploaded, served by a stand-in Hub to a fresh interpreter (the Hub client reads
    # HF_ENDPOINT when it is imported)
    files = {f"/vitadapter-test/tiny-upernet/resolve/main/{name}": data for name, data in uploaded.items()}
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="0")
    with LocalServer(files) as server:
        done = subprocess.run([sys.executable, "-c", HUB_CLIENT, str(tmp_path)], env=dict(env, HF_ENDPOINT=server.url),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(ade20k.CLASSES)
    loaded, expected = load_file(tmp_path / "loaded.safetensors"), model.state_dict()
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


# ---- the command line ------------------------------------------------------------------------------


def convert_fixture(dst: Path, **kwargs) -> int:
    return main(["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--arch", "upernet_vit_adapter_s.deit_ade20k",
                 "--model-kwargs", json.dumps(dict(FIXTURE_UPERNET, **kwargs))])


def test_convert_a_whole_upstream_checkpoint_then_segment_with_the_folder(tmp_path, capsys):
    dst = tmp_path / "upernet"
    assert convert_fixture(dst) == 0
    captured = capsys.readouterr()
    assert [line.split("]")[0] for line in captured.err.splitlines()] == [f"convert [{n}/3" for n in (1, 2, 3)]
    assert "dropped 8 keys: auxiliary_head (8)" in captured.out and f"wrote {dst}" in captured.out
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]

    _, _, io = load_fixture("seg_upernet")
    segmentor = vitadapter.create_model(f"local-dir:{dst}", pretrained=True).eval()
    assert segmentor.class_names == ade20k.CLASSES and segmentor.auxiliary_head is None
    with torch.no_grad():
        decode = segmentor.decode_head(segmentor.backbone(io["input"]))
    assert max_rel_err(decode, io["decode_logits"]) < 1e-4

    image = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["segment", str(image), "--weights", str(dst), "--out", str(out), "--size", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"weights: {dst}" in captured.out
    with Image.open(out / "one.label.png") as label:
        assert label.size == (70, 50) and np.asarray(label).max() < 150


def test_convert_and_segment_refuse_what_does_not_fit(tmp_path, capsys):
    # another head width than the checkpoint's: strict, the keys named, no folder left behind
    assert convert_fixture(tmp_path / "narrow", head_channels=32) == 2
    err = capsys.readouterr().err
    assert "vitadapter: error:" in err and "decode_head." in err
    assert not (tmp_path / "narrow").exists() and list(tmp_path.iterdir()) == []
    config = tmp_path / "cfg.json"
    config.write_text("{}")
    argv = ["convert", str(FIXTURES / "seg_upernet.pth"), str(tmp_path / "x"), "--upstream-config", str(config)]
    assert main([*argv, "--model-kwargs", "{}"]) == 2
    assert "--model-kwargs goes with --arch" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert main(["segment", "--weights", str(tmp_path / "empty")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    folder = vitadapter.save_pretrained(vitadapter.create_model("upernet_vit_adapter_t", num_classes=5, **TINY_UPERNET), tmp_path / "seg")
    assert main(["eval-seg", str(tmp_path), "--weights", str(folder), "--model", "upernet_vit_adapter_s"]) == 2
    assert "leave out --model upernet_vit_adapter_s" in capsys.readouterr().err


def test_a_train_seg_model_file_converts_to_a_folder_that_needs_no_arguments(tmp_path, capsys):
    from vitadapter.train import TrainOptions, save_model

    model = randomised(vitadapter.create_model("upernet_vit_adapter_t", num_classes=3, **TINY_UPERNET))
    options = TrainOptions(data_dir=str(tmp_path), model="upernet_vit_adapter_t", out=str(tmp_path), num_classes=3,
                           model_kwargs=TINY_UPERNET, iters=1)
    save_model(tmp_path / "model.pth", model, options)
    dst = tmp_path / "hub"
    argv = ["convert", str(tmp_path / "model.pth"), str(dst), "--arch", "upernet_vit_adapter_t", "--model-kwargs", json.dumps(TINY_UPERNET)]
    assert main(argv) == 0
    assert "dropped 0 keys: nothing" in capsys.readouterr().out
    again = vitadapter.create_model(f"local-dir:{dst}", pretrained=True)
    assert again.num_classes == 3 and again.class_names is None
    assert_same_state(model, again)

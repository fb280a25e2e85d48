"""Pretrained weights: registered tags, local files, Hub folders, upstream releases, conversion, bad
input and unpickling safety. Every download is served by tests/local_server.py on 127.0.0.1."""
import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

import vitadapter
from conftest import FIXTURES, backbone_archs, backbone_tags, load_fixture, max_rel_err
import local_server
from local_server import HubUploads, LocalServer, hub_endpoint
from vitadapter import hub
from vitadapter._meta import meta_device
from vitadapter.cli import main
from vitadapter.models.vit_adapter import closest_architecture
from vitadapter.upstream import InertGlobal, read_checkpoint, upstream_kwargs

RELEASES = "/czczup/ViT-Adapter/releases/download"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Any attempt to reach beyond 127.0.0.1 fails the test instead of touching the network."""
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a test tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def fixture_kwargs(name: str) -> dict:
    """ViTAdapter kwargs of a golden fixture's upstream config (tiny: 96 wide, 4 blocks)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return upstream_kwargs(meta["backbone"], meta["codebase"])


def assert_matches_fixture(model, name: str) -> None:
    _, _, io = load_fixture(name)
    with torch.no_grad():
        outs = model.eval()(io["input"])
    for i, out in enumerate(outs):
        assert max_rel_err(out, io[f"out{i}"]) <= 1e-4, f"level {i}"


def tiny_timm_deit(path: Path) -> dict:
    """A DeiT-Tiny-shaped timm ViT (4 blocks to stay fast) saved as timm's Hub repos hold it."""
    state = timm.create_model("deit_tiny_patch16_224", depth=4).state_dict()
    save_file(state, path)
    return state


# ---- the registry ---------------------------------------------------------------------------------


@functools.cache
def model_args_of(name: str) -> dict:
    """``create_model(name).model_args`` of a registered name, built once on the meta device."""
    with meta_device():
        return vitadapter.create_model(name).model_args


def test_every_architecture_has_tags_and_defaults_to_its_imagenet_trunk():
    for arch in backbone_archs():
        if arch == "vit_adapter":  # any trunk: its weights are the trunk's own timm tag
            continue
        tags = vitadapter.list_pretrained(f"{arch}.*")
        if not arch.startswith("vit_adapter_dino"):  # the DINO adapters' released heads are not ViT-Adapter's
            assert any(t.endswith(("_ade20k", "_coco", "_cocostuff10k")) for t in tags), arch
        default = timm.models.get_pretrained_cfg(arch)
        if arch.startswith("uniperceiver_"):  # not in timm's Hub: upstream's converted encoder release
            assert default.url.startswith("https://github.com" + RELEASES + "/v0.3.1/uni-perceiver-"), arch
            assert default.url.endswith("_converted.pth") and not default.hf_hub_id, arch
        else:
            assert default.hf_hub_id.startswith("timm/") and not default.url, arch


def test_foundation_trunk_tags_are_the_trunks_own_timm_tags():
    """For archs on a timm trunk by name, each Hub tag is that very trunk's timm repo and tag."""
    for name in backbone_tags():
        cfg = timm.models.get_pretrained_cfg(name)
        if not cfg.hf_hub_id:
            continue
        assert cfg.hf_hub_id.removeprefix("timm/") in timm.list_pretrained(), name
        trunk = model_args_of(name)["trunk"]
        if trunk is not None:
            assert cfg.hf_hub_id == f"timm/{trunk}.{cfg.tag}", name


def test_trunk_tags_name_repos_in_timms_registry():
    """Each ImageNet tag points at the Hub repo timm itself registers for that ViT."""
    timm_names = {
        "deit_in1k": "deit_{}_patch16_224.fb_in1k",
        "augreg_in21k_ft_in1k": "vit_{}_patch16_{}.augreg_in21k_ft_in1k",
    }
    sizes = {"t": "tiny", "s": "small", "b": "base", "l": "large"}
    for name in backbone_tags():
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.tag not in timm_names:
            continue
        pretrain_size = model_args_of(name)["pretrain_size"]
        size = sizes[cfg.architecture.split("_")[2]]
        timm_name = timm_names[cfg.tag].format(size, pretrain_size)
        assert timm_name in timm.list_pretrained()
        assert cfg.hf_hub_id == timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        assert cfg.mean == timm.models.get_pretrained_cfg(timm_name).mean


def test_upstream_tags_are_release_files_with_the_right_flavour():
    for name in backbone_tags():
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.hf_hub_id or cfg.tag == "uniperceiver_pt":  # ImageNet / pre-training trunk tags
            continue
        assert cfg.url.startswith("https://github.com" + RELEASES + "/")
        assert cfg.url.endswith((".pth", ".pth.tar", ".zip"))
        detection = cfg.notes[0].startswith("upstream config detection/")
        args = model_args_of(name)
        assert (args["vit_feature_source"] == "final") == detection == cfg.architecture.endswith("_det")
        assert (args["window_size"] is not None) == detection


def test_detection_flavour_matches_upstream_configs():
    small, large = model_args_of("vit_adapter_s_det"), model_args_of("vit_adapter_l_det")
    assert small["window_size"] == [14, 14, None] * 4
    assert large["window_size"] == ([14] * 5 + [None]) * 4
    assert large["pretrain_size"] == 384 and large["interaction_indexes"] == [[0, 5], [6, 11], [12, 17], [18, 23]]


# ---- loading from local files -----------------------------------------------------------------------


def test_imagenet_trunk_loads_into_the_vit_with_a_fresh_adapter(tmp_path):
    timm_state = tiny_timm_deit(tmp_path / "model.safetensors")
    model = vitadapter.create_model(
        "vit_adapter_t.deit_in1k", pretrained=True, depth=4, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"))
    )
    vit = model.vit.state_dict()
    assert torch.equal(vit["pos_embed"], timm_state["pos_embed"][:, 1:])  # cls slot dropped, 14x14 grid kept
    assert torch.equal(vit["blocks.3.attn.qkv.weight"], timm_state["blocks.3.attn.qkv.weight"])
    assert torch.equal(vit["patch_embed.proj.weight"], timm_state["patch_embed.proj.weight"])
    assert torch.equal(vit["blocks.0.ls1.gamma"], torch.ones(192))  # layer scale stays at its 1.0 init
    # the adapter is upstream's fresh initialisation (docs/upstream.md, "Initialisation")
    assert not model.interactions[0].injector.gamma.any()
    assert not model.interactions[2].extractor.attn.attention_weights.weight.any()


def test_upstream_checkpoint_as_local_pth_tar_and_zip(tmp_path):
    renamed = tmp_path / "mask_rcnn.pth.tar"
    renamed.write_bytes((FIXTURES / "det_vit.pth").read_bytes())
    model = vitadapter.create_model(
        "vit_adapter_t_det.deit_mask_rcnn_coco", pretrained=True, pretrained_cfg_overlay=dict(file=str(renamed)), **fixture_kwargs("det_vit")
    )
    assert_matches_fixture(model, "det_vit")
    # timm's own factory, features_only: the weights are loaded before timm wraps the model
    features = timm.create_model(
        "vit_adapter_t_det.deit_mask_rcnn_coco", pretrained=True, features_only=True,
        pretrained_cfg_overlay=dict(state_dict=torch.load(renamed, weights_only=True)), **fixture_kwargs("det_vit"),
    ).eval()
    _, _, io = load_fixture("det_vit")
    with torch.no_grad():
        assert max_rel_err(features(io["input"])[3], io["out3"]) <= 1e-4

    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURES / "seg_upernet.pth", "release/upernet.pth")
        zf.writestr("release/README.txt", "the checkpoint is the .pth next to this")
    model = vitadapter.create_model(
        "vit_adapter_s.deit_upernet_ade20k", pretrained=True, pretrained_cfg_overlay=dict(file=str(archive)), **fixture_kwargs("seg_vit")
    )
    assert_matches_fixture(model, "seg_vit")


def test_save_pretrained_rebuilds_a_load_upstream_configuration(tmp_path):
    meta, ckpt, _ = load_fixture("det_vit")
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt)
    hub.save_pretrained(model, tmp_path / "det")
    config = json.loads((tmp_path / "det" / "config.json").read_text())
    assert config["architecture"] == "vit_adapter"  # a 96-wide, 4-block config is none of the registered ones
    assert config["model_args"]["window_size"] == [7, 7, None, 7]
    assert "url" not in config["pretrained_cfg"] and "hf_hub_id" not in config["pretrained_cfg"]
    again = vitadapter.create_model(f"local-dir:{tmp_path / 'det'}", pretrained=True)
    assert again.model_args == model.model_args
    assert_matches_fixture(again, "det_vit")
    # timm's own factory reads the folder too, and the weights file loads on its own
    assert_matches_fixture(timm.create_model(f"local-dir:{tmp_path / 'det'}", pretrained=True), "det_vit")
    alone = vitadapter.create_model(
        "vit_adapter_t_det", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "det" / "model.safetensors")),
        **fixture_kwargs("det_vit"),
    )
    assert_matches_fixture(alone, "det_vit")


def test_config_json_names_the_registered_architecture_only_on_an_exact_match():
    with meta_device():
        det = vitadapter.create_model("vit_adapter_t_det", drop_path_rate=0.3).model_args
        wider = vitadapter.create_model("vit_adapter_s", cffn_ratio=0.5).model_args
    assert closest_architecture(det) == "vit_adapter_t_det"  # a training-only rate does not change the function
    assert closest_architecture(wider) == "vit_adapter"
    assert closest_architecture(dict(det, window_size=None)) == "vit_adapter"


def test_save_pretrained_keeps_tag_provenance_and_takes_overrides(tmp_path):
    model = vitadapter.create_model("vit_adapter_b_384.augreg_upernet_ade20k", embed_dim=48, depth=4, num_heads=3, deform_num_heads=3)
    hub.save_pretrained(model, tmp_path, pretrained_cfg=dict(input_size=(3, 640, 640)))
    cfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert cfg["tag"] == "augreg_upernet_ade20k" and cfg["mean"] == [0.5, 0.5, 0.5]
    assert cfg["input_size"] == [3, 640, 640]
    assert "upernet_augreg_adapter_base_512_160k_ade20k.py" in cfg["notes"][0]
    with pytest.raises(ValueError, match="PretrainedCfg"):
        hub.save_pretrained(model, tmp_path, pretrained_cfg=dict(colour="blue"))
    with pytest.raises(TypeError, match="ViTAdapter"):
        hub.save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_local_dir_and_hub_names_must_hold_vitadapter_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vitadapter.create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(ValueError, match="resnet50"):
        vitadapter.create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        vitadapter.create_model(f"local-dir:{tmp_path}")


# ---- downloads ----------------------------------------------------------------------------------------


def test_release_url_downloads_once_then_loads_from_the_cache(tmp_path):
    path = f"{RELEASES}/v0.3.1/upernet_deit_adapter_small_512_160k_ade20k.pth"
    storage = "/release-assets/upernet_deit_adapter_small_512_160k_ade20k.pth"
    files = {storage: (FIXTURES / "seg_upernet.pth").read_bytes()}
    args = dict(pretrained=True, cache_dir=tmp_path, **fixture_kwargs("seg_vit"))
    with LocalServer(files, redirects={path: storage}) as server:
        overlay = dict(url=server.url + path)
        model = vitadapter.create_model("vit_adapter_s.deit_upernet_ade20k", pretrained_cfg_overlay=overlay, **args)
        assert server.requests == [("GET", path), ("GET", storage)]
    assert_matches_fixture(model, "seg_vit")
    assert [p.name for p in tmp_path.iterdir()] == ["upernet_deit_adapter_small_512_160k_ade20k.pth"]
    # the server is gone: the cached file serves the second load
    again = vitadapter.create_model("vit_adapter_s.deit_upernet_ade20k", pretrained_cfg_overlay=overlay, **args)
    assert_matches_fixture(again, "seg_vit")


def test_failed_or_short_downloads_leave_nothing_in_the_cache(tmp_path):
    path = f"{RELEASES}/v0.1.2/mask_rcnn_deit_adapter_tiny_fpn_3x_coco.pth.tar"
    with LocalServer({path: (FIXTURES / "det_vit.pth").read_bytes()}, truncate=[path]) as server:
        url = server.url + path
        with pytest.raises(FileNotFoundError, match="incomplete.*pretrained_cfg_overlay=dict\\(file=PATH\\)"):
            vitadapter.create_model("vit_adapter_t_det.deit_mask_rcnn_coco", pretrained=True, cache_dir=tmp_path, pretrained_cfg_overlay=dict(url=url))
        with pytest.raises(FileNotFoundError, match="404"):
            vitadapter.create_model("vit_adapter_t_det.deit_mask_rcnn_coco", pretrained=True, cache_dir=tmp_path, pretrained_cfg_overlay=dict(url=url + ".gone"))
    # no server listens there any more: no network
    with pytest.raises(FileNotFoundError, match="pretrained_cfg_overlay"):
        vitadapter.create_model("vit_adapter_t_det.deit_mask_rcnn_coco", pretrained=True, cache_dir=tmp_path, pretrained_cfg_overlay=dict(url=url))
    assert list(tmp_path.iterdir()) == []


def test_offline_mode_with_an_empty_cache_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline.*pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        vitadapter.create_model("vit_adapter_s.deit_upernet_ade20k", pretrained=True, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained_cfg_overlay"):
        vitadapter.create_model("vit_adapter_s", pretrained=True, cache_dir=tmp_path)


def test_hub_repo_and_timm_trunk_download_then_load_offline(tmp_path):
    """Two fresh interpreters: the first downloads through HF_ENDPOINT into HF_HUB_CACHE, the second
    runs with HF_HUB_OFFLINE=1 after the server is gone."""
    meta, ckpt, _ = load_fixture("det_vit")
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt)
    hub.save_pretrained(model, tmp_path / "repo")
    timm_state = tiny_timm_deit(tmp_path / "deit.safetensors")
    files = {
        "/vitadapter-test/tiny-det/resolve/main/config.json": (tmp_path / "repo" / "config.json").read_bytes(),
        "/vitadapter-test/tiny-det/resolve/main/model.safetensors": (tmp_path / "repo" / "model.safetensors").read_bytes(),
        "/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors": (tmp_path / "deit.safetensors").read_bytes(),
    }
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    client = [sys.executable, str(Path(__file__).parent / "hub_client.py")]
    outputs = []
    with LocalServer(files) as server:
        outputs.append(tmp_path / "online")
        outputs[-1].mkdir()
        online = dict(env, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0")
        done = subprocess.run([*client, str(outputs[-1])], env=online, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert ("GET", "/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors") in server.requests
    outputs.append(tmp_path / "offline")
    outputs[-1].mkdir()
    offline = dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    done = subprocess.run([*client, str(outputs[-1]), str(tmp_path / "empty")], env=offline, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    expected = model.state_dict()
    for out in outputs:
        repo = load_file(out / "repo.safetensors")
        assert set(repo) == set(expected) and all(torch.equal(repo[k], expected[k]) for k in expected)
        trunk = load_file(out / "trunk.safetensors")
        assert torch.equal(trunk["vit.blocks.2.mlp.fc1.weight"], timm_state["blocks.2.mlp.fc1.weight"])
        assert torch.equal(trunk["vit.pos_embed"], timm_state["pos_embed"][:, 1:])
    message = (outputs[1] / "empty_cache_error.txt").read_text()
    assert message.startswith("FileNotFoundError") and "pretrained_cfg_overlay=dict(file=PATH)" in message


TINY_HUB = "/org/tiny/resolve/main/"


def tiny_hub_files(folder: Path) -> dict:
    return {TINY_HUB + name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


def assert_same_weights(model, folder: Path) -> None:
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert sorted(state) == sorted(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


def test_broken_hub_downloads_never_enter_the_cache_and_broken_cached_files_are_fetched_again(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "tiny")
    files = tiny_hub_files(folder)
    weights = files[TINY_HUB + "model.safetensors"]
    cache = tmp_path / "cache"
    load = functools.partial(vitadapter.create_model, "hf-hub:org/tiny", pretrained=True, cache_dir=cache)
    # a cut file, then a captive portal's page, each sent under the real file's headers; then the file
    lies = [weights[: len(weights) // 2], b"<html><body>Sign in to this network</body></html>"]
    with LocalServer(files, lies={TINY_HUB + "model.safetensors": lies}) as server:
        hub_endpoint(monkeypatch, server.url)
        for _ in lies:
            with pytest.raises(FileNotFoundError, match="weights of hf-hub:org/tiny@.*Hub repo org/tiny.*not cached"):
                load()
        assert_same_weights(load(), folder)
    blobs = sorted((cache / "models--org--tiny" / "blobs").iterdir())
    assert [b.name for b in blobs] == sorted(hashlib.sha256(b.read_bytes()).hexdigest() for b in blobs)

    # a broken copy left in the cache (a cut file; a file of the right length that is not safetensors):
    # fetched again, once, instead of failing on every load
    blob = cache / "models--org--tiny" / "blobs" / hashlib.sha256(weights).hexdigest()
    for broken in (weights[:1000], bytes(len(weights))):
        blob.write_bytes(broken)
        with LocalServer(files) as server:
            hub_endpoint(monkeypatch, server.url)
            assert_same_weights(load(), folder)
            fetched = [path for _, path in server.requests if path.endswith("model.safetensors")]
        assert len(fetched) == 1 and blob.read_bytes() == weights


def test_a_hub_config_is_read_once_and_the_model_built_from_what_was_checked(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "tiny")
    files = tiny_hub_files(folder)
    checked = json.loads(files[TINY_HUB + "config.json"])
    other = dict(checked, model_args=dict(checked["model_args"], depth=8, mlp_ratio=2.0))
    changes = {TINY_HUB + "config.json": [files[TINY_HUB + "config.json"], json.dumps(other).encode()]}
    with LocalServer(files, changes=changes) as server:
        hub_endpoint(monkeypatch, server.url)
        model = vitadapter.create_model("hf-hub:org/tiny", pretrained=True, cache_dir=tmp_path / "cache")
    assert model.model_args == checked["model_args"]
    assert_same_weights(model, folder)
    paths = [path for _, path in server.requests]
    assert paths.count(TINY_HUB + "config.json") == 1
    # the weights of the commit the config came from
    assert paths[-1] == f"/org/tiny/resolve/{local_server.COMMIT}/model.safetensors"


def test_a_local_config_replaced_after_the_check_is_not_what_is_built(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "tiny")
    checked = json.loads((folder / "config.json").read_text())
    check = hub.check_config

    def check_then_replace(config, label):
        architecture = check(config, label)
        (folder / "config.json").write_text(json.dumps(dict(checked, model_args=dict(checked["model_args"], depth=64))))
        return architecture

    monkeypatch.setattr(hub, "check_config", check_then_replace)
    model = vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    assert model.model_args == checked["model_args"]
    assert_same_weights(model, folder)


def test_failed_hub_downloads_name_the_repository(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "tiny")
    files = tiny_hub_files(folder)
    del files[TINY_HUB + "model.safetensors"]
    with LocalServer(files) as server:
        hub_endpoint(monkeypatch, server.url)
        with pytest.raises(FileNotFoundError) as weights_error:
            vitadapter.create_model("hf-hub:org/tiny", pretrained=True, cache_dir=tmp_path / "cache")
        with pytest.raises(FileNotFoundError) as config_error:
            vitadapter.create_model("hf-hub:org/gone", pretrained=True, cache_dir=tmp_path / "cache")
    tag = json.loads((folder / "config.json").read_text())["pretrained_cfg"].get("tag")
    assert str(weights_error.value).startswith("cannot fetch the weights of hf-hub:org/tiny@")
    assert "Hub repo org/tiny" in str(weights_error.value) and (not tag or tag not in str(weights_error.value))
    assert str(config_error.value).startswith("cannot fetch config.json of hf-hub:org/gone from Hub repo org/gone")


def test_push_command_says_what_it_uploads_and_refuses_by_name(tmp_path, monkeypatch, capsys):
    folder = tiny_folder(tmp_path / "tiny")
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    with HubUploads() as server:
        hub_endpoint(monkeypatch, server.url)
        assert main(["push", str(folder), "me/tiny"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "uploading to me/tiny:"
        assert out[1:3] == [f"  {folder / n} ({(folder / n).stat().st_size:,} bytes)" for n in ("config.json", "model.safetensors")]
        assert out[3] == "  not uploaded (not part of the format): .env" and out[4].startswith("committed ")
        assert sorted(server.committed) == ["config.json", "model.safetensors"]
        (folder / "model.safetensors").rename(tmp_path / "weights")
        (folder / "model.safetensors").symlink_to(tmp_path / "weights")
        assert main(["push", str(folder), "me/tiny"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "model.safetensors is a symlink" in err[0] and "a bug" not in err[0]
        assert server.calls == ["create", "preupload", "commit"]


# ---- bad input ----------------------------------------------------------------------------------------


def saved_folder(tmp_path: Path) -> Path:
    meta, ckpt, _ = load_fixture("seg_vit")
    return hub.save_pretrained(vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt), tmp_path / "seg")


def load_file_into_seg_fixture_model(path: Path):
    return vitadapter.create_model("vit_adapter_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **fixture_kwargs("seg_vit"))


def test_truncated_or_corrupt_files_are_named(tmp_path):
    weights = saved_folder(tmp_path) / "model.safetensors"
    data = weights.read_bytes()
    pth = (FIXTURES / "seg_vit.pth").read_bytes()
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.pth", pth)
        zf.writestr("b.pth", pth)
    broken = {
        "short.safetensors": data[: len(data) // 2],
        "noise.safetensors": b"\x00" * 64,
        "short.pth": pth[: len(pth) // 2],
        "page.pth.tar": b"<html>Not Found</html>",
        "short.zip": archive.read_bytes()[:200],
    }
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*(truncated|corrupt)"):
            load_file_into_seg_fixture_model(tmp_path / name)
    with pytest.raises(ValueError, match="exactly one checkpoint.*a.pth, b.pth"):
        load_file_into_seg_fixture_model(archive)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_file_into_seg_fixture_model(tmp_path / "nowhere.pth")


def test_checkpoints_of_another_size_or_family_are_named(tmp_path):
    with pytest.raises(ValueError, match="96-wide ViT, the model's is 192 wide"):
        vitadapter.create_model("vit_adapter_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(FIXTURES / "seg_vit.pth")))
    with pytest.raises(ValueError, match="a 14x14 position grid, the model's is 24x24"):
        vitadapter.create_model(
            "vit_adapter_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(FIXTURES / "seg_vit.pth")), **dict(fixture_kwargs("seg_vit"), pretrain_size=384)
        )
    with pytest.raises(ValueError, match="BEiT"):
        load_file_into_seg_fixture_model(FIXTURES / "seg_beit.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a ViT-Adapter.*conv1.weight"):
        load_file_into_seg_fixture_model(tmp_path / "resnet.pth")


def test_no_source_and_unknown_tags_are_named():
    with pytest.raises(ValueError, match="no pretrained weights are registered for vit_adapter_t.deit_in1k"):
        vitadapter.create_model("vit_adapter_t", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=None))
    with pytest.raises(ValueError, match="vit_adapter_s_det has: .*deit_mask_rcnn_coco"):
        vitadapter.create_model("vit_adapter_s_det.upernet_ade20k", pretrained=True)


# ---- security -------------------------------------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """What a malicious meta could hold: unpickling it would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ConfigLike(dict):
    """Stands for mmcv's Config: importable here, and its __setstate__ has a side effect."""

    def __setstate__(self, state):
        Path(state["marker"]).touch()


def test_pickled_meta_objects_are_read_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    config = ConfigLike(lr=0.1)
    config.__dict__["marker"] = str(tmp_path / "setstate_ran")
    state_dict = torch.load(FIXTURES / "seg_upernet.pth", weights_only=True)["state_dict"]
    meta = {"hook": RunsCodeWhenUnpickled(marker), "config": config, "seed": np.int64(7), "best": np.float64(0.5), "CLASSES": ("wall", "sky")}
    torch.save({"meta": meta, "state_dict": state_dict}, tmp_path / "upernet.pth")

    checkpoint = read_checkpoint(tmp_path / "upernet.pth")
    assert isinstance(checkpoint["meta"]["hook"], InertGlobal) and checkpoint["meta"]["hook"].qualified_name.endswith(".system")
    assert checkpoint["meta"]["config"].items == {"lr": 0.1}
    assert checkpoint["meta"]["CLASSES"] == ("wall", "sky")
    model = load_file_into_seg_fixture_model(tmp_path / "upernet.pth")
    assert_matches_fixture(model, "seg_vit")
    meta_json = json.loads((FIXTURES / "seg_vit.json").read_text())
    vitadapter.load_upstream(meta_json["backbone"], meta_json["codebase"], tmp_path / "upernet.pth")
    assert not marker.exists() and not (tmp_path / "setstate_ran").exists()


# ---- push_to_hub ----------------------------------------------------------------------------------------


def tiny_folder(folder: Path) -> Path:
    model = vitadapter.create_model("vit_adapter_t", embed_dim=48, depth=4, num_heads=3, deform_num_heads=3)
    return hub.save_pretrained(model, folder)


def test_push_to_hub_uploads_only_the_formats_files(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "tiny")
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "notes.txt").write_text("private notes\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert hub.check_upload(folder) == [(n, (folder / n).stat().st_size) for n in ("config.json", "model.safetensors")]
    with HubUploads() as server:
        hub_endpoint(monkeypatch, server.url)
        url = vitadapter.push_to_hub(folder, "me/tiny", private=True, token="hf_test")
        assert server.calls == ["create", "preupload", "commit"]
        assert (server.created["organization"], server.created["name"], server.created["visibility"]) == ("me", "tiny", "private")
        assert server.authorization == {"Bearer hf_test"}
        assert server.committed == {
            n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
        assert url.startswith(server.url + "/me/tiny/commit/")
        # a model is saved first, then pushed the same way
        server.committed.clear()
        vitadapter.push_to_hub(vitadapter.create_model(f"local-dir:{folder}", pretrained=True), "me/again")
        assert sorted(server.committed) == ["config.json", "model.safetensors"]


def test_push_to_hub_refuses_symlinks_and_folders_that_do_not_load(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "tiny")
    config, weights = folder / "config.json", folder / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    with HubUploads() as server:
        hub_endpoint(monkeypatch, server.url)

        def refused(error, words):
            with pytest.raises(error, match=words):
                vitadapter.push_to_hub(folder, "me/tiny")
            with pytest.raises(error, match=words):
                hub.check_upload(folder)

        weights.symlink_to(outside)
        refused(ValueError, "model.safetensors is a symlink")
        weights.unlink()
        tiny_timm_deit(weights)
        refused(ValueError, "does not load into the vit_adapter_t")
        weights.write_bytes(outside.read_bytes()[:-100])
        refused(ValueError, "not a whole safetensors file")
        weights.unlink()
        refused(FileNotFoundError, "model.safetensors is missing")
        outside.rename(weights)
        saved = config.read_text()
        config.unlink()
        (tmp_path / "config.json").write_text(saved)
        config.symlink_to(tmp_path / "config.json")
        refused(ValueError, "config.json is a symlink")
        config.unlink()
        config.write_text(json.dumps({"architecture": "resnet50"}))
        refused(ValueError, "resnet50.*not a vitadapter architecture")
        config.write_text(json.dumps(dict(json.loads(saved), model_args=dict(json.loads(saved)["model_args"], depth=10**6))))
        refused(ValueError, "depth")
        refused_folder = tmp_path / "missing"
        with pytest.raises(FileNotFoundError, match="is not a folder"):
            vitadapter.push_to_hub(refused_folder, "me/tiny")
        assert server.calls == []


# ---- vitadapter convert --------------------------------------------------------------------------------


def upstream_config_file(tmp_path: Path, **extra) -> Path:
    meta = json.loads((FIXTURES / "seg_upernet.json").read_text())
    path = tmp_path / "upernet.json"
    path.write_text(json.dumps(dict(codebase="segmentation", backbone=meta["backbone"], **extra)))
    return path


def test_convert_writes_a_folder_that_loads(tmp_path, capsys):
    config = upstream_config_file(tmp_path, pretrained_cfg=dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    dst = tmp_path / "out" / "upernet-s"
    assert main(["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--upstream-config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "kept 298 tensors" in captured.out
    assert "dropped 82 keys: auxiliary_head (8), decode_head (74)" in captured.out
    # one line per step, so a log keeps them apart
    assert [line.split("]")[0] for line in captured.err.splitlines()] == [f"convert [{n}/3" for n in (1, 2, 3)]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((dst / "config.json").read_text())["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert_matches_fixture(vitadapter.create_model(f"local-dir:{dst}", pretrained=True), "seg_vit")


def test_convert_never_leaves_a_partial_destination(tmp_path, capsys, monkeypatch):
    config = upstream_config_file(tmp_path)
    dst = tmp_path / "dst"
    (tmp_path / "bad.pth").write_bytes(b"junk")
    failures = [
        ["convert", str(tmp_path / "bad.pth"), str(dst), "--upstream-config", str(config)],
        ["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--arch", "vit_adapter_s"],  # another size
        ["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--upstream-config", str(tmp_path / "none.json")],
    ]
    for argv in failures:
        assert main(argv) == 2
        assert "vitadapter: error:" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "upernet.json"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "save_file", disk_full)
    assert main(["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--upstream-config", str(config)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "upernet.json"]


def test_convert_refuses_an_existing_destination_and_bad_configs(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(FIXTURES / "seg_vit.pth"), str(tmp_path / "taken"), "--arch", "vit_adapter_t"]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text(json.dumps({"backbone": {}}))
    assert main(["convert", str(FIXTURES / "seg_vit.pth"), str(tmp_path / "new"), "--upstream-config", str(tmp_path / "cfg.json")]) == 2
    assert "codebase" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

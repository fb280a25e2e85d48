"""Hostile and unlucky input: stalled and trickling servers, archive bombs, file modes, killed runs,
malformed checkpoints and configs, odd image dtypes. Servers run on 127.0.0.1 with short limits."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitadapter
from conftest import FIXTURES
from local_server import HubUploads, LocalServer, SilentTLS, hub_endpoint
from vitadapter import hub, upstream
from vitadapter.weights import fetch, read
from vitadapter.cli import main
from vitadapter.weights.download import STALL_ENV, TIMEOUT_ENV, DownloadTimeout, Limits, download_limits

CONVERT_CFG = json.loads((FIXTURES / "seg_upernet.json").read_text())


def upstream_config(tmp_path: Path, backbone: dict = None, **extra) -> Path:
    path = tmp_path / "cfg.json"
    spec = dict(codebase="segmentation", backbone=backbone or CONVERT_CFG["backbone"], **extra)
    path.write_text(json.dumps(spec))
    return path


def convert_argv(tmp_path: Path, dst: Path) -> list:
    return ["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--upstream-config", str(upstream_config(tmp_path))]


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- file modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_usual_umask_modes(tmp_path, umask, capsys):
    previous = os.umask(umask)
    try:
        assert main(convert_argv(tmp_path, tmp_path / "converted")) == 0
    finally:
        os.umask(previous)
    folder = tmp_path / "converted"
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---- interrupted and concurrent convert -----------------------------------------------------------------

# Runs convert in a child whose safetensors writer stops for good once the file is written, so the
# parent can kill it with its staging folder on disk.
STALLED_CONVERT = """
import sys, time
from vitadapter import hub
from vitadapter.cli import main

save_file = hub.save_file

def save_then_stall(*args, **kwargs):
    save_file(*args, **kwargs)
    print("written", flush=True)
    time.sleep(600)

hub.save_file = save_then_stall
main(sys.argv[1:])
"""


def test_a_killed_convert_leaves_staging_that_the_next_run_removes(tmp_path, capsys):
    dst = tmp_path / "out" / "converted"
    argv = convert_argv(tmp_path, dst)
    child = subprocess.Popen([sys.executable, "-c", STALLED_CONVERT, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "written\n"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert len(leftovers(dst.parent)) == 1 and not dst.exists()

    assert main(argv) == 0
    assert sorted(p.name for p in dst.parent.iterdir()) == ["converted"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]


def test_a_convert_that_loses_the_race_for_its_destination_says_it_exists(tmp_path, capsys, monkeypatch):
    dst = tmp_path / "converted"
    save_file = hub.save_file

    def other_convert_finishes_first(*args, **kwargs):
        save_file(*args, **kwargs)
        dst.mkdir()
        (dst / "config.json").write_text("{}")

    monkeypatch.setattr(hub, "save_file", other_convert_finishes_first)
    assert main(convert_argv(tmp_path, dst)) == 2
    err = capsys.readouterr().err
    assert str(dst) in err and "already exists" in err
    assert (dst / "config.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


# ---- downloads that cannot hang -------------------------------------------------------------------------

RELEASE = "/czczup/ViT-Adapter/releases/download/v0.1.2/mask_rcnn_deit_adapter_tiny_fpn_3x_coco.pth.tar"
TAG = "vit_adapter_t_det.deit_mask_rcnn_coco"


def fetch_release(url: str, cache: Path, **kwargs):
    """Load the tag from ``url``; returns (error raised, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as caught:
        vitadapter.create_model(TAG, pretrained=True, cache_dir=cache, pretrained_cfg_overlay=dict(url=url), **kwargs)
    return caught.value, time.monotonic() - start


@pytest.mark.parametrize(
    "behaviour, env, kwargs, words",
    [
        # accepts the connection and never answers: nothing arrives within the stall window
        ("stall", {STALL_ENV: "1"}, {}, "no data for 1 s|less than 64 KiB moved in 1 s"),
        # one byte every 50 ms, status line and headers included: too little in each window
        ("trickle", {STALL_ENV: "1"}, {}, "less than 64 KiB moved in 1 s"),
        # enough to pass the minimum-progress rule of a long window, but over the deadline
        ("trickle", {STALL_ENV: "60"}, dict(timeout=1.5), "over the 1.5 s limit for the whole transfer"),
    ],
)
def test_stalled_and_trickling_release_servers_fail_within_the_limits(tmp_path, monkeypatch, behaviour, env, kwargs, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    content = (FIXTURES / "det_vit.pth").read_bytes()
    with LocalServer({RELEASE: content}, trickle_interval=0.05, **{behaviour: [RELEASE]}) as server:
        error, took = fetch_release(server.url + RELEASE, tmp_path / "cache", **kwargs)
    limit = kwargs.get("timeout", float(env[STALL_ENV]))
    assert limit <= took < limit + 5
    message = str(error)
    assert server.url + RELEASE in message and "pretrained_cfg_overlay=dict(file=PATH)" in message
    assert re.search(words, message), message
    assert isinstance(error.__cause__, DownloadTimeout)
    seconds = float(re.search(r"stopped after ([0-9.]+) s", message)[1])
    assert limit <= seconds <= took
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


LIMITS = [
    # nothing moves within the stall window
    ({STALL_ENV: "1"}, {}, "less than 64 KiB moved in 1 s|no data for 1 s"),
    # a long stall window, but over the deadline
    ({STALL_ENV: "60"}, dict(timeout=1.5), "over the 1.5 s limit for the whole transfer"),
]


@pytest.fixture
def hanging_lookup(monkeypatch):
    """Name lookups of hosts ending in '.example' hang (as a dead resolver does) until the test ends."""
    released = threading.Event()
    lookup = socket.getaddrinfo

    def hang(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".example"):
            released.wait(120)
            raise socket.gaierror(f"{host}: the test's resolver gave up")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    yield
    released.set()


@pytest.mark.parametrize("env, kwargs, words", LIMITS)
def test_a_name_lookup_that_hangs_is_cut_by_the_limits(tmp_path, monkeypatch, hanging_lookup, env, kwargs, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    error, _ = fetch_release("http://releases.example" + RELEASE, tmp_path / "cache", **kwargs)
    assert isinstance(error.__cause__, DownloadTimeout), error
    assert "while looking up the address of releases.example" in str(error) and re.search(words, str(error))


@pytest.mark.parametrize("trickle, env, kwargs, words", [
    # says nothing: before, the per-read timeout (the 60 s window) was all that bounded the handshake
    (False, *LIMITS[1]),
    # sends a byte at a time: before, every read got one and the handshake never ended
    (True, *LIMITS[0]),
])
def test_a_tls_handshake_that_never_completes_is_cut_by_the_limits(tmp_path, monkeypatch, trickle, env, kwargs, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with SilentTLS(trickle=trickle) as server:
        error, _ = fetch_release(server.url + RELEASE, tmp_path / "cache", **kwargs)
    assert isinstance(error.__cause__, DownloadTimeout), error
    assert server.url + RELEASE in str(error) and re.search(words, str(error)), error


def tiny_hub_folder(folder: Path) -> Path:
    model = vitadapter.create_model("vit_adapter_t", embed_dim=48, depth=4, num_heads=3, deform_num_heads=3)
    return hub.save_pretrained(model, folder)


@pytest.mark.parametrize("stall", ["create", "commit"])
@pytest.mark.parametrize("env, kwargs, words", LIMITS)
def test_a_hub_that_stalls_an_upload_is_cut_by_the_limits(tmp_path, monkeypatch, stall, env, kwargs, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    folder = tiny_hub_folder(tmp_path / "tiny")
    with HubUploads(stall=[stall]) as server:
        hub_endpoint(monkeypatch, server.url)
        with pytest.raises(DownloadTimeout) as caught:
            vitadapter.push_to_hub(folder, "me/tiny", **kwargs)
        assert server.calls[-1] == stall and server.committed == {}
    message = str(caught.value)
    assert message.startswith("upload to me/tiny stopped after") and re.search(words, message), message


def test_an_upload_whose_name_lookup_hangs_is_cut_by_the_limits(tmp_path, monkeypatch, hanging_lookup):
    monkeypatch.setenv(STALL_ENV, "1")
    hub_endpoint(monkeypatch, "http://hub.example")
    with pytest.raises(DownloadTimeout, match="upload to me/tiny .* while looking up the address of hub.example"):
        vitadapter.push_to_hub(tiny_hub_folder(tmp_path / "tiny"), "me/tiny")


# Loads in a fresh interpreter, as huggingface_hub reads HF_ENDPOINT when imported; prints what it raised.
HUB_CHILD = """
import json, sys, time
import vitadapter

vitadapter.list_models()  # the imports (torch, timm) happen here, not inside the timed loads
for name, kwargs in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        vitadapter.create_model(name, pretrained=True, **kwargs)
    except FileNotFoundError as e:
        print(f"{time.monotonic() - start:.2f} {e}")
"""
# what is loaded, and the Hub file its download asks for: a registered tag's ImageNet trunk, a Hub
# folder's config.json, and a timm trunk's weights (timm's own download has no deadline)
HUB_LOADS = [
    ("vit_adapter_t", dict(depth=4), "/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors"),
    ("hf-hub:org/tiny", {}, "/org/tiny/resolve/main/config.json"),
    ("vit_adapter", dict(trunk="vit_small_patch14_dinov2"), "/timm/vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors"),
]


def test_a_hub_endpoint_that_never_answers_fails_within_the_stall_window(tmp_path):
    paths = [path for _, _, path in HUB_LOADS]
    with LocalServer({}, stall=paths) as server:
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "hub"), **{STALL_ENV: "1"})
        loads = json.dumps([[name, kwargs] for name, kwargs, _ in HUB_LOADS])
        done = subprocess.run([sys.executable, "-c", HUB_CHILD, loads], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(paths)
    for line, path in zip(lines, paths):
        took, message = line.split(" ", 1)
        assert 1 <= float(took) < 10, line  # the 1 s window plus building a small model on a busy machine
        assert server.url + path in message and "stopped after" in message and STALL_ENV in message


def test_download_limits_come_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "120")
    monkeypatch.setenv(STALL_ENV, "7.5")
    assert download_limits() == Limits(120, 7.5) and download_limits(timeout=9) == Limits(9, 7.5)
    monkeypatch.delenv(TIMEOUT_ENV)
    monkeypatch.delenv(STALL_ENV)
    assert download_limits().timeout > download_limits().stall > 0
    for bad in (0, -1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            download_limits(timeout=bad)
    monkeypatch.setenv(STALL_ENV, "soon")
    with pytest.raises(ValueError, match=f"\\${STALL_ENV} must be a positive number of seconds, got 'soon'"):
        download_limits()


# Downloads the tag in a child that the test kills once its staging file is in the cache.
DOWNLOAD_CHILD = """
import sys
import vitadapter

vitadapter.create_model(sys.argv[1], pretrained=True, cache_dir=sys.argv[2], pretrained_cfg_overlay=dict(url=sys.argv[3]))
"""


def test_a_killed_download_leaves_staging_that_the_next_run_removes(tmp_path):
    cache = tmp_path / "cache"
    content = (FIXTURES / "det_vit.pth").read_bytes()
    with LocalServer({RELEASE: content}, trickle=[RELEASE], trickle_interval=0.005) as server:
        url = server.url + RELEASE
        child = subprocess.Popen([sys.executable, "-c", DOWNLOAD_CHILD, TAG, str(cache), url])
        try:
            deadline = time.monotonic() + 120
            while not (cache.is_dir() and leftovers(cache)) and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.05)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
    assert len(leftovers(cache)) == 1

    with LocalServer({RELEASE: content}) as server:
        path = fetch.fetch_weights(dict(url=server.url + RELEASE), cache_dir=cache)
    assert path.read_bytes() == content
    assert [p.name for p in cache.iterdir()] == [path.name]


# ---- archives ---------------------------------------------------------------------------------------------


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder, moved under tmp_path so a test can see what unpacking leaves in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def zip_with(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    """``members``: name -> bytes, or an int for that many zeros, streamed so the test never holds them."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in members.items():
            with archive.open(name, "w") as out:
                if isinstance(content, int):
                    for start in range(0, content, 1 << 20):
                        out.write(bytes(min(1 << 20, content - start)))
                else:
                    out.write(content)
    return path


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path, private_tmp):
    declared = 256 << 20
    bomb = zip_with(tmp_path / "release.zip", {"release/upernet.pth": declared})
    assert bomb.stat().st_size * 100 < declared
    with pytest.raises(ValueError, match=f"refusing to unpack .*release.zip: release/upernet.pth would take {declared} bytes, .* times its compressed size"):
        vitadapter.load_upstream(CONVERT_CFG["backbone"], "segmentation", bomb)
    assert list(private_tmp.iterdir()) == []


def test_archive_members_and_sizes_are_bounded(tmp_path, private_tmp, monkeypatch):
    monkeypatch.setattr(read, "MAX_UNPACKED_BYTES", 1 << 20)
    big = zip_with(tmp_path / "big.zip", {"big.pth": 2 << 20}, compression=zipfile.ZIP_STORED)
    with pytest.raises(ValueError, match="big.pth would take 2097152 bytes, more than vitadapter's ceiling of 1048576"):
        upstream.read_checkpoint(big)
    monkeypatch.setattr(read, "MAX_ARCHIVE_MEMBERS", 3)
    many = zip_with(tmp_path / "many.zip", {f"notes{i}.txt": b"x" for i in range(4)} | {"a.pth": b"x"})
    with pytest.raises(ValueError, match="many.zip: it lists 5 members, more than the 3"):
        upstream.read_checkpoint(many)
    assert list(private_tmp.iterdir()) == []


def test_unreadable_files_never_suggest_loading_them_unsafely(tmp_path, private_tmp):
    zeros = zip_with(tmp_path / "zeros.zip", {"zeros.pth": 1000})
    (tmp_path / "zeros.pth").write_bytes(bytes(1000))
    for path in (zeros, tmp_path / "zeros.pth"):
        with pytest.raises(ValueError, match="could not read .*zeros.* not a checkpoint") as caught:
            upstream.read_checkpoint(path)
        assert "weights_only" not in str(caught.value) and caught.value.__cause__ is None
    # the release fixture, unpacked and read: nothing stays in the temporary folder either
    good = zip_with(tmp_path / "good.zip", {"good.pth": (FIXTURES / "seg_vit.pth").read_bytes()})
    assert "state_dict" in upstream.read_checkpoint(good)
    assert list(private_tmp.iterdir()) == []


# ---- malformed checkpoints -----------------------------------------------------------------------------


def upernet_state() -> dict:
    return torch.load(FIXTURES / "seg_upernet.pth", weights_only=True)["state_dict"]


def with_entry(key, value) -> dict:
    return {"state_dict": {**upernet_state(), key: value}}


QKV = "backbone.blocks.0.attn.qkv.weight"
MALFORMED = {
    "int-key": (lambda: {"state_dict": {**upernet_state(), 7: torch.zeros(1)}}, r"checkpoint key 7 is a int, not a string"),
    "0-d-matrix": (lambda: with_entry("backbone.patch_embed.proj.weight", torch.tensor(1.0)),
                   r"'patch_embed.proj.weight' has shape \(\), expected 4 dimensions"),
    "0-d-block-matrix": (lambda: with_entry("backbone.blocks.1.mlp.fc2.weight", torch.tensor(1.0)),
                         r"shape mismatches: vit.blocks.1.mlp.fc2.weight: checkpoint \(\) vs model \(96, 384\)"),
    "1-d-matrix": (lambda: with_entry(QKV, torch.zeros(288)), r"vit.blocks.0.attn.qkv.weight: checkpoint \(288,\) vs model \(288, 96\)"),
    "0-d-token": (lambda: {**tiny_timm_state(), "cls_token": torch.tensor(0.0)}, r"'cls_token' has shape \(\), expected 3 dimensions"),
    "1-d-grid": (lambda: with_entry("backbone.pos_embed", torch.zeros(7)), r"'pos_embed' has shape \(7,\)"),
    "tensor": (lambda: torch.zeros(3, 3), "holds a Tensor"),
    "list": (lambda: [torch.zeros(3)], "holds a list"),
    # a path to a good checkpoint: content, never a file to follow
    "string": (lambda: str(FIXTURES / "seg_upernet.pth"), "holds a str"),
    "not-a-tensor": (lambda: with_entry(QKV, [1.0, 2.0]), r"entry 'blocks.0.attn.qkv.weight' is not a tensor \(list\)"),
    "integers": (lambda: with_entry(QKV, upernet_state()[QKV].long()),
                 r"dtype mismatches: vit.blocks.0.attn.qkv.weight: checkpoint torch.int64 vs model torch.float32"),
    "nan": (lambda: with_entry(QKV, upernet_state()[QKV].clone().fill_(float("nan"))),
            r"NaN or infinite values: vit.blocks.0.attn.qkv.weight"),
    "inf": (lambda: with_entry("backbone.level_embed", torch.full((3, 96), float("inf"))), r"NaN or infinite values: level_embed"),
}


def tiny_timm_state() -> dict:
    """A timm ViT checkpoint of the fixture's width (its prefix tokens are what the conversion reads)."""
    return timm.create_model("vit_tiny_patch16_224", embed_dim=96, depth=4, num_heads=3).state_dict()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoints_are_refused_naming_the_key_and_the_problem(tmp_path, capsys, case):
    make, words = MALFORMED[case]
    path = tmp_path / "bad.pth"
    torch.save(make(), path)
    with pytest.raises(ValueError, match=words):
        vitadapter.load_upstream(CONVERT_CFG["backbone"], "segmentation", path)
    dst = tmp_path / "converted"
    assert main(["convert", str(path), str(dst), "--upstream-config", str(upstream_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err.strip().splitlines()[-1])  # one line (the progress bar may precede it)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_malformed_safetensors_weights_are_refused_too(tmp_path):
    model = vitadapter.load_upstream(CONVERT_CFG["backbone"], "segmentation")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["vit.blocks.1.mlp.fc1.weight"] = state["vit.blocks.1.mlp.fc1.weight"].to(torch.int32)
    state["vit.blocks.2.mlp.fc2.bias"] = torch.full_like(state["vit.blocks.2.mlp.fc2.bias"], float("-inf"))
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="vit.blocks.1.mlp.fc1.weight: checkpoint torch.int32.*NaN or infinite values: vit.blocks.2.mlp.fc2.bias"):
        vitadapter.create_model("vit_adapter_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                                **upstream.upstream_kwargs(CONVERT_CFG["backbone"], "segmentation"))


# ---- configs ----------------------------------------------------------------------------------------------

TINY = dict(embed_dim=48, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8)
# (model_args changes, pretrained_cfg changes, words the error must hold)
BAD_CONFIG_JSON = {
    "zero-heads": (dict(num_heads=0), {}, "model_args.num_heads must be an integer from 1 to"),
    "string-width": (dict(embed_dim="48"), {}, "model_args.embed_dim must be an integer"),
    "deep": (dict(depth=100_000), {}, "model_args.depth must be an integer from 1 to 64, got 100000"),
    "indivisible": (dict(num_heads=5), {}, "model_args.num_heads 5 does not divide embed_dim 48"),
    "deform-indivisible": (dict(deform_num_heads=7), {}, r"model_args.deform_num_heads 7 does not divide embed_dim x deform_ratio \(48\)"),
    "window-zero": (dict(window_size=[0, None, None, None]), {}, "model_args.window_size must list one window"),
    "window-count": (dict(window_size=[7, None, None]), {}, "model_args.window_size lists 3 windows for 4 blocks"),
    "nan-ratio": (dict(mlp_ratio=float("nan")), {}, "model_args.mlp_ratio must be a number above 0"),
    "drop-path": (dict(drop_path_rate=1.5), {}, "model_args.drop_path_rate must be a number from 0 to 1"),
    "huge": (dict(embed_dim=4096, depth=64, num_heads=16, deform_num_heads=16), {}, r"model_args.embed_dim 4096 with depth 64 .* B parameters"),
    "unknown": (dict(frobnicate=1), {}, "unknown model argument.*model_args.frobnicate"),
    "ranges": (dict(interaction_indexes=[[0, 0]] * 100), {}, "model_args.interaction_indexes must list 1 to 64"),
    "trunk-depth": (dict(trunk="vit_small_patch16_224", trunk_kwargs=dict(depth=10_000)), {},
                    "model_args.trunk_kwargs.depth must be an integer from 1 to 64"),
    "trunk-download": (dict(trunk="vit_small_patch16_224", pretrained_trunk=True), {}, "model_args.pretrained_trunk must be false"),
    "flag": (dict(with_cffn="yes"), {}, "model_args.with_cffn must be true or false"),
    "short-mean": ({}, dict(mean=[0.5, 0.5]), r"pretrained_cfg.mean must be 3 numbers"),
    "zero-std": ({}, dict(std=[0.0, 1.0, 1.0]), r"pretrained_cfg.std must be 3 positive numbers"),
    "input-size": ({}, dict(input_size=[3, -1, 512]), r"pretrained_cfg.input_size must be \[channels, height, width\]"),
}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    hub.save_pretrained(vitadapter.create_model("vit_adapter_t", **TINY), folder)
    return folder


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_JSON))
def test_bad_config_json_values_are_named_before_anything_is_built(saved_tiny, tmp_path, capsys, case):
    model_args, pretrained_cfg, words = BAD_CONFIG_JSON[case]
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((saved_tiny / "config.json").read_text())
    config["model_args"].update(model_args)
    config["pretrained_cfg"].update(pretrained_cfg)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(saved_tiny / "model.safetensors")
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"local-dir:{folder} config.json: {words}"):
        vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    assert time.monotonic() - start < 5
    assert main(["features", "--model", f"local-dir:{folder}", "--pretrained", "--out", str(tmp_path / "p.png")]) == 2
    assert re.search(words, capsys.readouterr().err)


BAD_UPSTREAM = {
    "zero-heads": (dict(num_heads=0), {}, "num_heads must be an integer from 1"),
    "zero-depth": (dict(depth=0), {}, "depth must be an integer from 1 to 64, got 0"),
    "deep": (dict(depth=1_000_000, interaction_indexes=None), {}, "depth must be an integer from 1 to 64"),
    "indivisible": (dict(embed_dim=100), {}, "num_heads 3 does not divide embed_dim 100"),
    "window-size": (dict(window_attn=True, window_size="big"), {}, "window_size must list one window"),
    "window-flag": (dict(window_attn="yes"), {}, "window_attn must be true/false"),
    "img-size": (dict(img_size="224"), {}, "img_size must be an integer"),
    "huge": (dict(embed_dim=4096, depth=64, num_heads=16, deform_num_heads=16, interaction_indexes=None, window_attn=None,
                  window_size=None), {}, "embed_dim 4096 with depth 64 .* B parameters"),
    "short-mean": ({}, dict(mean=[0.5, 0.5]), "pretrained_cfg.mean must be 3 numbers"),
    "string-std": ({}, dict(std="0.5"), "pretrained_cfg.std must be 3 positive numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPSTREAM))
def test_bad_upstream_config_values_are_named_before_anything_is_built(tmp_path, capsys, case):
    changes, pretrained_cfg, words = BAD_UPSTREAM[case]
    backbone = {k: v for k, v in {**CONVERT_CFG["backbone"], **changes}.items() if v is not None}
    config = upstream_config(tmp_path, backbone, pretrained_cfg=pretrained_cfg)
    dst = tmp_path / "converted"
    start = time.monotonic()
    assert main(["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--upstream-config", str(config)]) == 2
    assert time.monotonic() - start < 5
    assert re.search(words, capsys.readouterr().err.strip().splitlines()[-1])
    assert not dst.exists()
    if not pretrained_cfg:
        with pytest.raises(ValueError, match=words):
            vitadapter.load_upstream(backbone, "segmentation")


# ---- odd inputs ---------------------------------------------------------------------------------------------


def tiny_model():
    return vitadapter.create_model("vit_adapter_t", **TINY).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_another_float_dtype_are_cast_to_the_models(dtype):
    model, image = tiny_model(), torch.randn(1, 3, 64, 96).to(dtype)
    with torch.no_grad():
        levels = model(image)
        reference = model(image.to(torch.float32))
    for level, ref in zip(levels, reference):
        assert level.dtype == torch.float32 and torch.equal(level, ref)


@pytest.mark.parametrize("training", [False, True])
def test_an_empty_batch_gives_empty_levels_of_the_usual_shapes(training):
    model = tiny_model().train(training)
    with torch.no_grad():
        full = model.eval()(torch.randn(1, 3, 70, 50))
    levels = model.train(training)(torch.randn(0, 3, 70, 50))
    for level, ref in zip(levels, full):
        assert level.shape == (0, *ref.shape[1:]) and level.dtype == ref.dtype
        assert level.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [2, 0])
def test_cpu_bf16_autocast_returns_every_level_in_its_dtype(batch):
    model, image = tiny_model(), torch.randn(batch, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        levels = model(image)
    with torch.no_grad():
        reference = model(image)
    assert {level.dtype for level in levels} == {torch.bfloat16}
    for level, ref in zip(levels, reference):
        assert level.shape == ref.shape and torch.isfinite(level).all()


@pytest.mark.parametrize("codebase", ["dinov2", "dinov3"])
def test_malformed_dino_adapter_checkpoints_pass_the_same_checks(tmp_path, codebase):
    meta = json.loads((FIXTURES.parent / "dino_adapters" / f"{codebase}_adapter.json").read_text())
    config = meta["constructor"]["kwargs"] if codebase == "dinov2" else {"vit": meta["vit"]["kwargs"], "adapter": meta["constructor"]["kwargs"]}
    path = tmp_path / "bad.pth"
    torch.save(str(FIXTURES.parent / "dino_adapters" / f"{codebase}_adapter.pth"), path)
    with pytest.raises(ValueError, match="holds a str"):
        vitadapter.load_upstream(config, codebase, path)
    with pytest.raises(ValueError, match="checkpoint key 3 is a int, not a string"):
        vitadapter.load_upstream(config, codebase, {"state_dict": {3: torch.zeros(1)}})


@pytest.mark.parametrize("trunk, key", [
    ("beit_base_patch16_224", "blocks.0.attn.relative_position_bias_table"),
    ("vit_small_patch16_dinov3", "patch_embed.proj.weight"),
])
def test_malformed_timm_checkpoints_of_other_trunk_families_are_named(trunk, key):
    shape = dict(img_size=64, embed_dim=48, depth=4, num_heads=3)
    model = vitadapter.create_model("vit_adapter", trunk=trunk, trunk_kwargs=shape, conv_inplane=16, deform_num_heads=3)
    state = timm.create_model(trunk, num_classes=0, **shape).state_dict()
    for bad in (torch.tensor(1.0), torch.zeros(5)):
        with pytest.raises(ValueError, match=f"'{key}' has shape {re.escape(str(tuple(bad.shape)))}, expected"):
            upstream.load_checkpoint(model, {**state, key: bad})

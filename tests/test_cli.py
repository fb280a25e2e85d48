"""The ``vitadapter`` command and the PCA pictures behind ``vitadapter features``."""
import math
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants, hf_hub_download
from PIL import Image
from safetensors.torch import save_file

from conftest import FIXTURES
from local_server import LocalServer
from vitadapter import catalog, create_model, list_models, list_pretrained
from vitadapter.cli import main
from vitadapter.cli._models import torch_hub_dir
from vitadapter.weights.fetch import fetch_weights
from vitadapter._meta import meta_device
from vitadapter.models import FAMILY_MODULES
from vitadapter.visualize import pca_rgb, principal_directions, pyramid_picture

SHAPE_ROW = re.compile(r"^\s*(\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.MULTILINE)


def shape_rows(out: str) -> list[tuple[int, ...]]:
    return [tuple(map(int, row)) for row in SHAPE_ROW.findall(out)]


def expected_rows(height: int, width: int, channels: int = 192) -> list[tuple[int, ...]]:
    return [(i + 1, s, channels, math.ceil(height / s), math.ceil(width / s)) for i, s in enumerate((4, 8, 16, 32))]


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A picture with some structure (a darker left half), saved in the format its suffix names."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] //= 4
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def odd_image(tmp_path):
    """A 70x50 (W x H) PNG: not a multiple of 32 either way."""
    return write_image(tmp_path / "odd.png", 70, 50)


def assert_one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---- list and describe ----------------------------------------------------------------------------------


def test_catalog_matches_the_registry():
    """list and describe read catalog.json; it must say what the registry says (after a change:
    python -m vitadapter.catalog). FLOPs are recounted for the smallest architecture of each family
    module: recounting all of them takes a minute."""
    saved = catalog.load()
    assert catalog.weights() == saved["weights"]
    assert list(saved["architectures"]) == list_models()
    recounted = set()
    for module in FAMILY_MODULES:
        built = [a for a in timm.list_models(module=module) if "parameters" in saved["architectures"][a]]
        recounted.add(min(built, key=lambda a: saved["architectures"][a]["parameters"]))
    assert len(recounted) == len(FAMILY_MODULES)
    for arch, entry in saved["architectures"].items():
        if arch in recounted:
            assert catalog.architecture(arch) == entry, arch
        else:
            assert catalog.architecture(arch, flops=False) == {k: v for k, v in entry.items() if k != "flops"}, arch


def test_list_prints_every_model_and_filters(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == list_models()
    assert main(["list", "*_t*"]) == 0
    assert capsys.readouterr().out.split() == list_models("*_t*")


def test_list_pretrained_marks_each_default_tag(capsys):
    for pattern in ("", "vit_adapter_s_det.*", "vit_adapter_b"):
        assert main(["list", "--pretrained", *[pattern] * bool(pattern)]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert [row[0] for row in rows] == list_pretrained(pattern)
        for name, *marks in rows:
            default = timm.models.get_pretrained_cfg(name.split(".")[0]).tag == name.split(".")[1]
            assert ("default" in marks) == default, name


def test_list_pretrained_and_describe_say_what_is_cached(tmp_path, capsys, monkeypatch):
    """A release file fetched by the loader and a Hub file fetched by the Hub client count as cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    release = timm.models.get_pretrained_cfg("vit_adapter_t_det.deit_mask_rcnn_coco").to_dict()
    trunk = timm.models.get_pretrained_cfg("vit_adapter_t.deit_in1k")
    path = "/" + release["url"].split("/", 3)[3]
    hub_path = f"/{trunk.hf_hub_id}/resolve/main/model.safetensors"
    with LocalServer({path: b"release bytes", hub_path: b"hub bytes"}) as server:
        fetch_weights(dict(release, url=server.url + path))
        hf_hub_download(trunk.hf_hub_id, "model.safetensors", endpoint=server.url, cache_dir=constants.HF_HUB_CACHE)
    assert torch_hub_dir() == Path(torch.hub.get_dir())
    assert main(["list", "--pretrained", "vit_adapter_t*"]) == 0
    cached = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith("cached")}
    # the DeiT-T trunk is the default tag of both T flavours
    assert cached == {"vit_adapter_t_det.deit_mask_rcnn_coco", "vit_adapter_t.deit_in1k", "vit_adapter_t_det.deit_in1k"}
    assert main(["describe", "vit_adapter_t_det.deit_mask_rcnn_coco"]) == 0
    assert ", cached\n" in capsys.readouterr().out
    assert main(["describe", "vit_adapter_s"]) == 0
    assert "not cached yet" in capsys.readouterr().out


def test_list_without_match_fails(capsys):
    assert main(["list", "resnet*"]) == 1
    assert "resnet*" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit_adapter_t", "vit_adapter_b_384.augreg_upernet_ade20k"])
def test_describe_states_size_compute_preprocessing_and_weights(name, capsys):
    assert main(["describe", name]) == 0
    out = capsys.readouterr().out
    arch = name.split(".")[0]
    cfg = timm.models.get_pretrained_cfg(name)
    with meta_device():
        model = create_model(arch)
    total, vit = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.vit.parameters())
    assert f"{total:,} = {vit:,} ViT (model.vit) + {total - vit:,} adapter" in out
    size = f"{cfg.input_size[2]}x{cfg.input_size[1]}"
    gmacs = catalog.flops_without_memory(model.eval(), cfg.input_size) / 2e9
    assert f"{gmacs:.1f} GMACs for one {size} image" in out
    assert f"mean ({', '.join(f'{v:g}' for v in cfg.mean)}) and std ({', '.join(f'{v:g}' for v in cfg.std)})" in out
    assert f"default size {size}" in out
    default = timm.models.get_pretrained_cfg(arch).tag
    assert (f"{arch}.{default}  (the default tag)" in out) == (name == arch)
    for info in model.feature_info:
        assert f"{info['num_chs']} channels, reduction {info['reduction']}\n" in out


def test_describe_unknown_model_or_tag(capsys):
    assert main(["describe", "vit_adapter_xl"]) == 2
    assert_one_line_error(capsys, "vit_adapter_xl", "vitadapter list")
    assert main(["describe", "vit_adapter_s.upernet"]) == 2
    assert_one_line_error(capsys, "'upernet'", "deit_upernet_ade20k")


def test_command_starts_without_torch():
    """--help, list, describe and usage errors import neither torch nor timm; importing vitadapter
    alone does not either, and the models still join timm's registry once timm is imported."""
    script = textwrap.dedent("""
        import contextlib, io, sys
        from vitadapter.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for argv in (["list"], ["list", "--pretrained"], ["describe", "vit_adapter_b"], ["--help"], ["features", "--size", "0"]):
                try:
                    main(argv)
                except SystemExit:
                    pass
        heavy = sorted({"torch", "timm", "numpy", "PIL.Image"} & set(sys.modules))
        assert not heavy, heavy
        import timm
        assert "vit_adapter_t" in timm.list_models(), "import timm after vitadapter must register the models"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_python_m_vitadapter_list():
    done = subprocess.run([sys.executable, "-m", "vitadapter", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == list_models()


# ---- features -----------------------------------------------------------------------------------------------


def test_features_resizes_to_the_models_input_size_by_default(odd_image, tmp_path, capsys):
    out_png = tmp_path / "pyramid.png"
    assert main(["features", str(odd_image), "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    short = create_model("vit_adapter_t").pretrained_cfg["input_size"][-1]
    width = round(70 * short / 50)
    assert f"{width}x{short} (W x H), resized from 70x50" in out
    assert shape_rows(out) == expected_rows(short, width)
    assert "random initialisation (seed 0)" in out and f"wrote {out_png}" in out
    with Image.open(out_png) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.width > picture.height  # a grid of three columns of landscape panels


def test_features_size_resizes_short_side_or_keeps_the_original(odd_image, tmp_path, capsys):
    assert main(["features", str(odd_image), "--size", "64", "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "90x64" in out and shape_rows(out) == expected_rows(64, 90)
    assert main(["features", str(odd_image), "--size", "original", "--out", str(tmp_path / "q.jpg")]) == 0
    out = capsys.readouterr().out
    assert "70x50 (W x H)\n" in out and shape_rows(out) == expected_rows(50, 70)
    with Image.open(tmp_path / "q.jpg") as picture:
        assert picture.format == "JPEG"


def test_features_of_a_folder_writes_one_picture_per_image(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "b.jpg", 40, 60, seed=1)
    write_image(folder / "a.png", 50, 40, seed=2)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pictures"
    assert main(["features", str(folder), "--size", "original", "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert f"wrote {out / 'a.png'}\nwrote {out / 'b.png'}\nwrote 2 pictures into {out}\n" == captured.out
    assert captured.err == ""  # no progress bar outside a terminal
    # each picture is the one the single-image command writes
    assert main(["features", str(folder / "b.jpg"), "--size", "original", "--out", str(tmp_path / "b.png")]) == 0
    with Image.open(out / "b.png") as a, Image.open(tmp_path / "b.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_features_with_a_weights_file_loads_and_names_it(odd_image, tmp_path, capsys):
    """Weights saved from a seed-7 model give exactly the picture of a seed-7 random model."""
    torch.manual_seed(7)
    weights = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("vit_adapter_t").state_dict().items()}, weights)
    loaded, seeded = tmp_path / "loaded.png", tmp_path / "seeded.png"
    args = ["features", str(odd_image), "--size", "64"]
    assert main([*args, "--weights", str(weights), "--seed", "0", "--out", str(loaded)]) == 0
    assert f"weights: {weights}\n" in capsys.readouterr().out
    assert main([*args, "--seed", "7", "--out", str(seeded)]) == 0
    with Image.open(loaded) as a, Image.open(seeded) as b:
        assert a.size == b.size
        rows, cols = np.nonzero(np.any(np.asarray(a) != np.asarray(b), axis=2))
    # the same panels: only the title on top and the caption in the last column say other things
    assert rows.size and np.all((rows < a.height // 10) | (cols > a.width * 2 // 3))


def test_features_pretrained_without_the_weights_is_one_line_pointing_at_weights_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["features", "--pretrained", "--out", str(tmp_path / "p.png"), "--model"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for model in ("vit_adapter_t", "vit_adapter_t_det.deit_mask_rcnn_coco"):
        cfg = timm.models.get_pretrained_cfg(model)
        assert main([*args, model]) == 2
        assert_one_line_error(capsys, f"{cfg.architecture}.{cfg.tag} are not cached", cfg.url or cfg.hf_hub_id, "--weights FILE")

    def no_network(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    cfg = timm.models.get_pretrained_cfg("vit_adapter_t_det.deit_mask_rcnn_coco")
    assert main([*args, "vit_adapter_t_det.deit_mask_rcnn_coco"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"fetching the weights of vit_adapter_t_det.deit_mask_rcnn_coco from {cfg.url}"
    assert len(err) == 2 and err[1].startswith("vitadapter: error: cannot fetch the weights")
    assert "Name or service not known" in err[1] and cfg.url in err[1] and err[1].endswith("--weights FILE")
    assert "pretrained_cfg_overlay" not in err[1]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--model", "vit_adapter_xl"], ["--model vit_adapter_xl: unknown model", "vitadapter list"]),
        (["--model", "vit_adapter_s.upernet"], ["--model vit_adapter_s.upernet", "deit_upernet_ade20k"]),
        (["--out", "picture"], ["--out picture", "without an extension"]),
        (["--out", "picture.xyz"], ["'.xyz'"]),
        (["--out", "absent/p.png"], ["--out absent/p.png", "does not exist"]),
        (["--weights", "nothere.pth"], ["--weights nothere.pth: no such file"]),
        (["--device", "warp-drive"], ["--device warp-drive", "--device cpu"]),
        (["nowhere.jpg"], ["nowhere.jpg"]),
    ],
)
def test_features_errors_are_one_line_naming_the_option(argv, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["features", *argv]) == 2
    assert_one_line_error(capsys, *fragments)
    assert capsys.readouterr().out == "" and list(tmp_path.iterdir()) == []


def test_features_on_files_that_are_not_images(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    assert main(["features", str(tmp_path / "notes.png"), "--out", str(tmp_path / "p.png")]) == 2
    err = assert_one_line_error(capsys, "notes.png is not an image file")
    assert "<_io" not in err and not (tmp_path / "p.png").exists()
    (tmp_path / "empty").mkdir()
    assert main(["features", str(tmp_path / "empty")]) == 2
    assert_one_line_error(capsys, "holds no image files")


def test_files_that_cannot_be_checkpoints_are_refused_up_front(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not a checkpoint")
    assert main(["convert", str(notes), str(tmp_path / "out"), "--arch", "vit_adapter_t"]) == 2
    assert_one_line_error(capsys, f"convert {notes} is not a checkpoint", ".pth")
    assert main(["features", "--weights", str(notes), "--out", str(tmp_path / "p.png")]) == 2
    assert_one_line_error(capsys, f"--weights {notes} is not a checkpoint")
    assert main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "out"), "--arch", "vit_adapter_t"]) == 2
    assert_one_line_error(capsys, "none.pth: no such file")
    assert main(["convert", str(notes), str(tmp_path / "out"), "--arch", "vit_adapter_xs"]) == 2
    assert_one_line_error(capsys, "is not a checkpoint")
    assert main(["convert", str(FIXTURES / "seg_vit.pth"), str(tmp_path / "out"), "--arch", "vit_adapter_xs"]) == 2
    assert_one_line_error(capsys, "--arch vit_adapter_xs: unknown model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_debug_flag_and_variable_show_the_traceback(tmp_path, capsys, monkeypatch):
    for argv in (["--debug", "features", "--weights", "none.pth"], ["features", "--weights", "none.pth", "--debug"]):
        with pytest.raises(ValueError, match="none.pth"):
            main(argv)
    monkeypatch.setenv("VITADAPTER_DEBUG", "1")
    with pytest.raises(ValueError, match="none.pth"):
        main(["features", "--weights", "none.pth"])


def test_unexpected_errors_say_they_are_bugs(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("vitadapter.cli.listing.list_names", broken)
    assert main(["list"]) == 2
    assert_one_line_error(capsys, "ZeroDivisionError: division by zero", "--debug")


def test_features_rejects_bad_size(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--size", "0"])
    assert exit_info.value.code == 2
    assert "positive integer or 'original'" in capsys.readouterr().err


# ---- the picture ----------------------------------------------------------------------------------------------


def test_pca_rgb_follows_low_rank_pattern():
    # Quadrant patterns (left half, top half, top-left corner) along random channel directions,
    # plus a little noise: a picture of it must have four flat quadrants of different colours.
    h, w, c = 20, 30, 16
    left = (torch.arange(w) < 12).double().expand(h, w)
    top = (torch.arange(h) < 8).double()[:, None].expand(h, w)
    directions = torch.randn(3, c, 1, 1, dtype=torch.float64)
    feature = sum(d * p for d, p in zip(directions, (left, top, left * top)))
    feature = feature + 1e-3 * torch.randn(c, h, w, dtype=torch.float64)

    picture = pca_rgb(feature)
    assert picture.size == (w, h) and picture.mode == "RGB"
    pixels = torch.tensor(np.array(picture), dtype=torch.float64)
    quadrants = [pixels[rows, cols] for rows in (slice(0, 8), slice(8, h)) for cols in (slice(0, 12), slice(12, w))]
    means = [q.reshape(-1, 3).mean(0) for q in quadrants]
    for q, mean in zip(quadrants, means):
        assert (q - mean).abs().max() < 20, "colour must be nearly flat where the pattern is constant"
    for i in range(4):
        for j in range(i):
            assert (means[i] - means[j]).abs().max() > 100, "colour must change where the pattern changes"


def test_pca_rgb_leaves_absent_components_black():
    # A rank-1 pattern has one component; the other two are rounding noise and must not be stretched.
    ramp = torch.linspace(-1, 1, 24)[None, :].expand(10, 24)
    picture = np.asarray(pca_rgb(torch.randn(8, 1, 1) * ramp))
    assert picture[..., 0].min() == 0 and picture[..., 0].max() == 255
    assert not picture[..., 1:].any()


def test_shared_directions_ignore_offsets_and_sizes_between_maps():
    """A direction all maps vary along wins over one only the largest map varies along, and over
    the maps' different means."""
    c = 12
    shared, own = torch.eye(c, dtype=torch.float64)[:2]
    ramp = lambda h, w: torch.linspace(-1, 1, h * w, dtype=torch.float64).view(1, h, w)  # noqa: E731
    big = shared.view(c, 1, 1) * ramp(40, 40) + 3 * own.view(c, 1, 1) * ramp(40, 40).flip(-1) + 50
    small = [shared.view(c, 1, 1) * ramp(n, n) - 20 * k for k, n in enumerate((10, 5, 3))]
    first = principal_directions([big, *small])[0]
    assert abs(first @ shared) > 0.99


def test_pyramid_picture_checks_level_shapes():
    image = Image.new("RGB", (70, 50))
    levels = [torch.randn(4, math.ceil(50 / s), math.ceil(70 / s)) for s in (4, 8, 16, 32)]
    assert pyramid_picture(image, levels, caption=["a note"], alert="a warning").height > 50
    with pytest.raises(ValueError, match="stride-8"):
        pyramid_picture(image, [levels[0], levels[0], levels[2], levels[3]])


def test_features_of_a_folder_skips_an_unreadable_image_and_says_so(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "good.png", 40, 48, seed=3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "pictures"
    assert main(["features", str(folder), "--size", "original", "--out", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert [p.name for p in out.iterdir()] == ["good.png"]
    assert "wrote 1 pictures" in captured.out
    assert "skipped" in captured.err and "broken.jpg" in captured.err and "1 file(s) could not be read" in captured.err

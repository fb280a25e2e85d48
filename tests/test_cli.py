"""The ``vitadapter`` command and the PCA pictures behind ``vitadapter features``."""
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import save_file

from vitadapter import create_model, list_models
from vitadapter.cli import main
from vitadapter.visualize import pca_rgb, pyramid_picture

SHAPE_ROW = re.compile(r"^\s*(\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.MULTILINE)


@pytest.fixture
def odd_image(tmp_path):
    """A 70x50 (W x H) picture with some structure, saved as PNG."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    pixels[:, :35] //= 4
    path = tmp_path / "odd.png"
    Image.fromarray(pixels).save(path)
    return path


def test_list_prints_every_model_and_filters(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == list_models()
    assert main(["list", "vit_adapter_?"]) == 0
    assert capsys.readouterr().out.split() == ["vit_adapter_b", "vit_adapter_l", "vit_adapter_s", "vit_adapter_t"]


def test_list_pretrained_prints_arch_tags(capsys):
    assert main(["list", "--pretrained", "vit_adapter_s_det.*"]) == 0
    assert capsys.readouterr().out.split() == [
        "vit_adapter_s_det.deit_cascade_mask_rcnn_coco",
        "vit_adapter_s_det.deit_in1k",
        "vit_adapter_s_det.deit_mask_rcnn_coco",
    ]


def test_list_without_match_fails(capsys):
    assert main(["list", "resnet*"]) == 1
    assert "resnet*" in capsys.readouterr().err


def test_python_m_vitadapter_list():
    done = subprocess.run([sys.executable, "-m", "vitadapter", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vit_adapter_t" in done.stdout.split()


def test_describe_counts_parameters(capsys):
    assert main(["describe", "vit_adapter_t"]) == 0
    out = capsys.readouterr().out
    total, vit, adapter = (int(n.replace(",", "")) for n in re.findall(r"[\d,]{5,}", out))
    assert total == vit + adapter and vit > adapter > 0
    for stride in (4, 8, 16, 32):
        assert f"192 channels, reduction {stride}\n" in out


def test_describe_unknown_model(capsys):
    assert main(["describe", "vit_adapter_xl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error:") and "vit_adapter_xl" in err


def test_features_on_odd_sized_image(odd_image, tmp_path, capsys):
    out_png = tmp_path / "pyramid.png"
    assert main(["features", str(odd_image), "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "random initialisation (seed 0)" in out and "no pretrained weights" in out
    assert "70x50" in out
    rows = [tuple(map(int, row)) for row in SHAPE_ROW.findall(out)]
    assert rows == [(i + 1, s, 192, math.ceil(50 / s), math.ceil(70 / s)) for i, s in enumerate((4, 8, 16, 32))]
    assert f"wrote {out_png}" in out
    with Image.open(out_png) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        # Five panels (input + 4 levels) side by side, each wider than tall like the input.
        assert picture.width > 5 * picture.height


def test_features_size_resizes_short_side(odd_image, tmp_path, capsys):
    assert main(["features", str(odd_image), "--size", "64", "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "90x64" in out
    assert (1, 4, 192, 16, 23) in [tuple(map(int, row)) for row in SHAPE_ROW.findall(out)]


def test_features_with_a_weights_file_loads_and_names_it(odd_image, tmp_path, capsys):
    """Weights saved from a seed-7 model give exactly the picture of a seed-7 random model."""
    torch.manual_seed(7)
    weights = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("vit_adapter_t").state_dict().items()}, weights)
    loaded, seeded = tmp_path / "loaded.png", tmp_path / "seeded.png"
    assert main(["features", str(odd_image), "--weights", str(weights), "--seed", "0", "--out", str(loaded)]) == 0
    assert f"weights: {weights}\n" in capsys.readouterr().out
    assert main(["features", str(odd_image), "--seed", "7", "--out", str(seeded)]) == 0
    with Image.open(loaded) as a, Image.open(seeded) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert main(["features", str(odd_image), "--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors" in capsys.readouterr().err


def test_features_missing_image(tmp_path, capsys):
    missing = tmp_path / "nowhere.jpg"
    assert main(["features", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error:") and "nowhere.jpg" in err


def test_features_unreadable_image(tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not a picture")
    assert main(["features", str(bogus), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "notes.png" in err
    assert not (tmp_path / "p.png").exists()


def test_features_unwritable_output(odd_image, tmp_path, capsys):
    assert main(["features", str(odd_image), "--out", str(tmp_path / "absent" / "p.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "absent" in captured.err


def test_features_rejects_bad_size(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--size", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


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


def test_pyramid_picture_checks_level_shapes():
    image = Image.new("RGB", (70, 50))
    levels = [torch.randn(4, math.ceil(50 / s), math.ceil(70 / s)) for s in (4, 8, 16, 32)]
    assert pyramid_picture(image, levels, height=100).height > 100
    with pytest.raises(ValueError, match="stride-8"):
        pyramid_picture(image, [levels[0], levels[0], levels[2], levels[3]])

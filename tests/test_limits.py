"""Limits: big photos segment in bounded memory, extreme inputs and options are refused with one named
line before any work, and broken files in a run are named."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitadapter import predict as prediction
from vitadapter.predict import MS_RATIOS, predict, predict_probs


class RandomLogits(nn.Module):
    """A segmentor answering fixed random logits (at a quarter of the input size, upsampled as a head's
    are), so that many pixels are close calls between classes."""

    def __init__(self, num_classes=7, crop=64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.num_classes, self.crop_size = num_classes, (crop, crop)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, image):
        h, w = image.shape[-2:]
        coarse = torch.randn(1, self.num_classes, h // 4, w // 4, generator=self.generator)
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + image.mean()


def photo(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(97, 61), (64, 64), (1, 50), (203, 3)])
@pytest.mark.parametrize("band_values", [1, 7 * 97 * 5 + 3, 1 << 22])
@pytest.mark.parametrize("aug", [False, True])
def test_labels_computed_in_bands_equal_the_full_size_argmax(size, band_values, aug, monkeypatch):
    """Bands of one row, of a few rows (a boundary inside the image) and of the whole image."""
    ratios, flip = (MS_RATIOS, True) if aug else ((1.0,), False)
    image = photo(*size)
    full = predict_probs(RandomLogits(), image, ratios=ratios, flip=flip).argmax(0)
    monkeypatch.setattr(prediction, "_BAND_VALUES", band_values)
    banded = predict(RandomLogits(), image, ratios=ratios, flip=flip)
    assert banded.shape == (size[1], size[0]) and torch.equal(banded, full)


def test_the_resize_is_mmsegs_bilinear_resize_of_the_logits():
    """Against F.interpolate at the photo's size: the same labels wherever the call is not a tie
    within float rounding."""
    image = photo(131, 77)
    stub = RandomLogits()
    labels = predict(stub, image, ratios=(0.75, 1.0), flip=True)
    generator = torch.Generator().manual_seed(0)
    stub.generator = generator
    passes = prediction._pass_logits(stub, image, 0, (0.75, 1.0), True, None)
    direct = sum(F.interpolate(p, size=(77, 131), mode="bilinear", align_corners=False).softmax(1) for p in passes)[0] / 4
    top2 = direct.topk(2, 0).values
    close_calls = (top2[0] - top2[1]) < 1e-5
    assert torch.equal(labels[~close_calls], direct.argmax(0)[~close_calls])
    assert close_calls.float().mean() < 0.01


PEAK = """
import resource, sys
import numpy as np, torch
from PIL import Image
from torch import nn
from vitadapter.predict import predict

class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.crop_size = (64, 64)

    def forward(self, image):
        return torch.randn(1, 64, *image.shape[-2:])

image = Image.fromarray(np.zeros((1500, 2000, 3), np.uint8))
model = Constant().eval()
predict(model, Image.new("RGB", (64, 64)))  # torch's own allocations before the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = predict(model, image)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_segmenting_a_photo_takes_memory_for_its_labels_not_its_logits():
    """64 classes over 2000 x 1500 pixels: full-size probabilities would take 768 MB (and as much
    again for their softmax); the label map takes 24 MB."""
    done = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 150 * 2**20, f"peak grew by {int(done.stdout) / 2**20:.0f} MiB"


@pytest.mark.parametrize("size", [(451, 300), (3000, 40), (40, 3000), (61, 97)])
def test_the_photo_is_resized_band_by_band_as_a_whole_resize_would(size):
    image = photo(*size)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    w, h = prediction.rescaled_size(*size, 64)
    whole = prediction._resize_pixels(pixels, h, w)
    banded = prediction._rescaled_pixels(image, h, w, torch.device("cpu"))
    assert banded.shape == whole.shape
    # float rounding may tip a value that is exactly between two integers
    assert (banded - whole).abs().max() <= 1 and (banded != whole).float().mean() < 1e-3


@pytest.mark.parametrize(
    "image, kwargs, words",
    [
        (Image.new("RGB", (0, 0)), {}, "0x0 pixels"),
        (Image.new("RGB", (0, 5)), {}, "0x5 pixels"),
        (photo(8, 8), dict(scale=-5), "scale must be"),
        (photo(8, 8), dict(scale=(512, -1)), "scale must be"),
        (photo(8, 8), dict(scale=True), "scale must be"),
        (photo(8, 8), dict(ratios=(1.0, -0.5)), "ratios must be positive"),
        (photo(8, 8), dict(ratios=(float("nan"),)), "ratios must be positive"),
        (photo(60, 40), dict(scale=60000), "over the 16,777,216 pixels"),
        ("photo.jpg", {}, "must be a PIL image"),
    ],
)
def test_predict_refuses_what_cannot_be_segmented(image, kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        predict(RandomLogits(), image, **kwargs)


def test_predict_on_the_meta_device_is_a_named_error():
    with torch.device("meta"):
        stub = RandomLogits()
    with pytest.raises(ValueError, match="meta device"):
        predict(stub, photo(8, 8))


# ---- train-seg: foreign checkpoints, bad labels, broken images, unwritable folders, full disks ----------

from test_train_seg import MODEL, TINY, one_line_error, options, shapes  # noqa: E402,F401

from vitadapter.cli import main  # noqa: E402
from vitadapter.train import CHECKPOINT, train_segmentation  # noqa: E402


def train_argv(data, run, *extra):
    return ["train-seg", str(data), "--model", MODEL, "--out", str(run), "--num-classes", "3", "--random-init",
            "--model-kwargs", json.dumps(TINY), "--crop", "64", "--iters", "2", "--warmup-iters", "1", "--lr", "1e-3",
            "--workers", "0", "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def checkpoint(shapes, tmp_path_factory):
    """A real last.pth of a 2-iteration run of ``train_argv``."""
    run = tmp_path_factory.mktemp("run")
    assert main(train_argv(shapes, run)) == 0
    return torch.load(run / CHECKPOINT, weights_only=True)


def with_optimizer_moment_resized(state):
    optimizer = dict(state["optimizer"], state={k: dict(v) for k, v in state["optimizer"]["state"].items()})
    moments = optimizer["state"][0]
    moments["exp_avg"] = torch.zeros(3, 3)
    return dict(state, optimizer=optimizer)


FOREIGN = {
    "a dict of other keys": (lambda c: {"state_dict": c["model"]}, "lacks model (the weights)"),
    "a list": (lambda c: [1, 2, 3], "it holds a list, not a dict"),
    "a tensor": (lambda c: torch.zeros(3), "it holds a Tensor"),
    "options not a dict": (lambda c: dict(c, options=["x"]), "options (the run's options) should be a dict, it is a list"),
    "no optimizer state": (lambda c: {k: v for k, v in c.items() if k != "optimizer"}, "lacks optimizer (the optimizer state)"),
    "an empty optimizer": (lambda c: dict(c, optimizer={}), "optimizer is not an optimizer's state_dict"),
    "weights of other shapes": (
        lambda c: dict(c, model={k: torch.zeros(2, *v.shape[1:]) if k.endswith("conv_seg.weight") else v for k, v in c["model"].items()}),
        "does not fit the model: other shapes: decode_head.conv_seg.weight (2, 32, 1, 1) (the model's: (3, 32, 1, 1))",
    ),
    "weights missing": (lambda c: dict(c, model={k: v for k, v in c["model"].items() if "aux" not in k}), "weights missing, e.g. auxiliary_head"),
    "optimizer moments of other shapes": (with_optimizer_moment_resized, "its optimizer's exp_avg of shape (3, 3) belongs to no parameter"),
    "a broken random state": (lambda c: dict(c, rng={"torch": torch.zeros(3)}), "rng lacks torch's random state"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_resuming_from_a_foreign_checkpoint_names_the_file_and_the_problem(case, checkpoint, shapes, tmp_path, capsys):
    make, words = FOREIGN[case]
    run = tmp_path / "run"
    run.mkdir()
    torch.save(make(checkpoint), run / CHECKPOINT)
    assert main(train_argv(shapes, run, "--resume")) == 2
    one_line_error(capsys, str(run / CHECKPOINT), words)


def test_labels_beyond_the_class_count_name_the_file_and_the_label(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    for kind in ("images", "annotations"):
        (data / kind / "training").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "images" / "training" / f"{name}.png")
    Image.fromarray(np.ones((64, 64), np.uint8)).save(data / "annotations" / "training" / "a.png")
    label = np.ones((64, 64), np.uint8)
    label[5, 5] = 200
    Image.fromarray(label).save(data / "annotations" / "training" / "b.png")
    assert main(train_argv(data, tmp_path / "run")) == 2
    one_line_error(capsys, str(data / "annotations" / "training" / "b.png"), "holds label 199 (stored 200, 1 pixels)",
                   "3-class model")


def test_a_truncated_image_in_a_worker_is_one_line_naming_it(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    for kind in ("images", "annotations"):
        (data / kind / "training").mkdir(parents=True)
        for path in (shapes / kind / "training").iterdir():
            (data / kind / "training" / path.name).write_bytes(path.read_bytes())
    broken = data / "images" / "training" / "3.png"
    broken.write_bytes(broken.read_bytes()[:300])
    assert main(train_argv(data, tmp_path / "run", "--workers", "2", "--iters", "8", "--save-every", "8")) == 2
    one_line_error(capsys, "cannot read image", str(broken))


UNPRIVILEGED = """
import os, sys
import vitadapter.train  # what the run imports, while the files are readable
from vitadapter import catalog
from vitadapter.cli import main
# the installed package may sit where nobody cannot read (a venv under /root): the catalog too is read
# now, while it can be
entries = catalog.load()
catalog.load = lambda: entries
from PIL import Image
Image.init()  # Pillow imports its format plugins on first use
if os.getuid() == 0:  # root writes anywhere: drop to nobody
    os.setgid(65534); os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def test_a_read_only_output_folder_is_refused_before_training(shapes):
    top = Path(tempfile.mkdtemp())
    try:
        os.chmod(top, 0o755)
        subprocess.run(["cp", "-r", str(shapes), str(top / "data")], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(top / "data")], check=True)
        run = top / "run"
        run.mkdir()
        os.chmod(run, 0o555)
        argv = train_argv(top / "data", run, "--iters", "100000")
        done = subprocess.run([sys.executable, "-c", UNPRIVILEGED, *argv], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HOME=str(top)))
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and f"--out {run}: cannot write there" in done.stderr, done.stderr
        assert "train-seg: starting" not in done.stdout
    finally:
        os.chmod(top / "run", 0o755)
        subprocess.run(["rm", "-rf", str(top)], check=True)


FULL_DISK = """
import resource, signal, sys
from vitadapter.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_debris(shapes, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(1 << 20), *train_argv(shapes, run)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"cannot write {run / CHECKPOINT}" in done.stderr, done.stderr
    # no last.pth, no staging file (a run folder the failed run made and left empty is removed)
    assert not run.exists() or [p.name for p in run.iterdir() if p.name != "log.jsonl"] == []


# ---- images and options the CLI refuses in one line -------------------------------------------------------

import vitadapter  # noqa: E402
from vitadapter import ms_deform_attn  # noqa: E402


def bomb(path, side):
    """A PNG of side x side pixels, small on disk: Pillow's bomb check reads its size from the header."""
    Image.new("L", (side, side)).save(path)


@pytest.fixture
def low_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # above the bitmap font's image


def test_a_decompression_bomb_says_which_limit_and_how_to_raise_it(tmp_path, capsys, low_pixel_limit):
    bomb(tmp_path / "big.png", 400)
    assert main(["segment", str(tmp_path / "big.png"), "--out", str(tmp_path / "out"), "--size", "32"]) == 2
    one_line_error(capsys, str(tmp_path / "big.png"), "PIL.Image.MAX_IMAGE_PIXELS (50,000)", "VITADAPTER_MAX_IMAGE_PIXELS=N")
    assert "a bug" not in capsys.readouterr().err


def test_the_pixel_limit_is_raised_from_the_environment(tmp_path, capsys, low_pixel_limit, monkeypatch):
    bomb(tmp_path / "big.png", 400)
    monkeypatch.setenv("VITADAPTER_MAX_IMAGE_PIXELS", "200000")
    assert main(["features", str(tmp_path / "big.png"), "--size", "32", "--out", str(tmp_path / "p.png")]) == 0
    monkeypatch.setenv("VITADAPTER_MAX_IMAGE_PIXELS", "lots")
    assert main(["features", str(tmp_path / "big.png"), "--size", "32", "--out", str(tmp_path / "p.png")]) == 2
    one_line_error(capsys, "VITADAPTER_MAX_IMAGE_PIXELS=lots: expected a positive number of pixels")


@pytest.mark.parametrize("command", ["segment", "features"])
def test_in_a_folder_bombs_and_broken_links_are_reported_and_skipped(command, tmp_path, capsys, low_pixel_limit):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(20, 20).save(folder / "good.png")
    bomb(folder / "big.png", 400)
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "noext").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "out"
    assert main([command, str(folder), "--out", str(out), "--size", "32", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    for name in ("big.png", "dangling.png", "loop.jpg"):
        assert f"vitadapter: skipped" in err and str(folder / name) in err, err
    assert "3 file(s) could not be read" in err and "a bug" not in err
    assert any(p.name.startswith("good") for p in out.iterdir())
    if command == "segment":
        assert "noext" in err  # listed among the files left out


@pytest.mark.parametrize("size", [(100000, 1), (20000, 32), (1, 100000)])
def test_features_refuses_extreme_strips_before_resizing(size, tmp_path, capsys):
    Image.new("RGB", size).save(tmp_path / "strip.png")
    assert main(["features", str(tmp_path / "strip.png"), "--out", str(tmp_path / "p.png")]) == 2
    one_line_error(capsys, "strip.png is", "over the 16,777,216 pixels", "crop it")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["segment", "--size", "60000"], "at most 8192"),
        (["features", "--size", "60000"], "at most 8192"),
        (["eval-seg", "x", "--size", "60000"], "at most 8192"),
        (["export-onnx", "vit_adapter_t", "m.onnx", "--size", "60000", "64"], "at most 8192"),
    ],
)
def test_option_sizes_are_bounded_before_any_work(argv, words, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("command", ["features", "segment"])
def test_the_meta_device_is_a_usage_error(command, tmp_path, capsys):
    assert main([command, "--device", "meta", "--out", str(tmp_path / ("p.png" if command == "features" else "o"))]) == 2
    one_line_error(capsys, "--device meta: the meta device holds shapes, not values")


def test_a_model_on_the_meta_device_refuses_a_meta_image():
    from vitadapter._meta import meta_device

    with meta_device():
        model = vitadapter.create_model("vit_adapter_t")
    with pytest.raises(ValueError, match="cannot run on the meta device"):
        model(torch.zeros(1, 3, 64, 64, device="meta"))


def msda_inputs(shapes=((4, 4), (2, 2)), dtype=torch.float32):
    positions = sum(h * w for h, w in shapes)
    value = torch.randn(1, positions, 2, 8).to(dtype)
    spatial = torch.tensor(shapes)
    start = torch.tensor([0, shapes[0][0] * shapes[0][1]])
    locations = torch.rand(1, 5, 2, 2, 3, 2)
    weights = torch.rand(1, 5, 2, 2, 3)
    return value, spatial, start, locations, weights


def test_ms_deform_attn_names_negative_shapes_and_integer_values():
    with pytest.raises(ValueError, match="spatial_shapes must hold positive"):
        ms_deform_attn(*msda_inputs(((-4, -4), (2, 2))))
    with pytest.raises(ValueError, match="spatial_shapes must hold positive"):
        ms_deform_attn(*msda_inputs(((0, 4), (2, 2))))
    with pytest.raises(TypeError, match="value must be a floating-point tensor, got torch.int64"):
        ms_deform_attn(*msda_inputs(dtype=torch.int64))
    value, spatial, start, locations, weights = msda_inputs()
    with pytest.raises(TypeError, match="attention_weights must be a floating-point"):
        ms_deform_attn(value, spatial, start, locations, weights.int())


DEEP = "[" * 5000 + "]" * 5000


def test_deeply_nested_json_is_a_named_error(tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04")
    assert main(["convert", str(tmp_path / "w.pth"), str(tmp_path / "d"), "--arch", "vit_adapter_t", "--model-kwargs", DEEP]) == 2
    one_line_error(capsys, "--model-kwargs: JSON nested more than 32 levels deep")
    nested = '{"a": ' * 40 + "1" + "}" * 40
    assert main(["train-seg", str(tmp_path), "--model", MODEL, "--out", str(tmp_path / "r"), "--model-kwargs", nested]) == 2
    one_line_error(capsys, "--model-kwargs: JSON nested more than 32 levels deep")
    (tmp_path / "cfg.json").write_text('{"codebase": "segmentation", "backbone": ' + DEEP + "}")
    assert main(["convert", str(tmp_path / "w.pth"), str(tmp_path / "d"), "--upstream-config", str(tmp_path / "cfg.json")]) == 2
    one_line_error(capsys, "--upstream-config", "JSON nested more than 32 levels deep")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architecture": "vit_adapter_t", "model_args": ' + nested + "}")
    with pytest.raises(ValueError, match="config.json: JSON nested more than 32 levels deep"):
        vitadapter.create_model(f"local-dir:{folder}")


# ---- models from files that would not fit ------------------------------------------------------------------

from vitadapter import hub, memory_check  # noqa: E402

HEAVY = {
    "a named 7B trunk": ("vit_adapter", dict(trunk="vit_7b_patch16_dinov3", deform_num_heads=16), None,
                         r"needs about \d+\.\d GiB \(7,\d{3} M parameters"),
    "a timm trunk of a million tokens": ("vit_adapter", dict(trunk="vit_small_patch16_224", trunk_kwargs=dict(img_size=2048, patch_size=1)),
                                         [3, 512, 512], r"needs about \d+\.\d GiB \(1,6\d\d M parameters.*largest activation for one 512x512 image"),
    "heads 4096 wide": ("upernet_vit_adapter_t", dict(num_classes=150, head_channels=4096, aux_channels=4096), None,
                        r"needs about \d+\.\d GiB \(1,\d{3} M parameters"),
    "a small model at a huge input size": ("vit_adapter_t", {}, [3, 16384, 16384], r"largest activation for one 16384x16384 image: \d+\.\d GiB"),
}


@pytest.mark.parametrize("case", list(HEAVY))
def test_models_from_files_that_would_not_fit_are_refused_with_the_numbers(case, tmp_path, monkeypatch):
    architecture, model_args, input_size, words = HEAVY[case]
    folder = tmp_path / "heavy"
    folder.mkdir()
    config = dict(architecture=architecture, model_args=model_args, pretrained_cfg=dict(input_size=input_size or [3, 512, 512]))
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(memory_check, "available_memory", lambda: 4 << 30)
    with pytest.raises(ValueError, match=f"local-dir:{folder} config.json.*{words}.*VITADAPTER_ALLOW_LARGE_MODELS=1"):
        vitadapter.create_model(f"local-dir:{folder}")


def test_the_memory_check_can_be_overridden_and_passes_what_fits(tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    hub.save_pretrained(vitadapter.create_model("vit_adapter_t", embed_dim=48, depth=4, num_heads=3, deform_num_heads=3), folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 2048, 2048]  # large enough for the fake forward
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(memory_check, "available_memory", lambda: 64 << 30)
    vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    monkeypatch.setattr(memory_check, "available_memory", lambda: 1 << 20)
    with pytest.raises(ValueError, match="more than the 0.0 GiB of memory free here"):
        vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    monkeypatch.setenv("VITADAPTER_ALLOW_LARGE_MODELS", "1")
    vitadapter.create_model(f"local-dir:{folder}", pretrained=True)

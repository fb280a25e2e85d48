"""Limits: big photos segment in bounded memory, extreme inputs and options are refused with one named
line before any work, and broken files in a run are named."""
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

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

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
from vitadapter.cli import main
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
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl"]

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

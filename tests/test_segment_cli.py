"""Segmenting images and scoring segmentors: mmseg's metrics, upstream's test pipeline, and the
``vitadapter segment`` / ``vitadapter eval-seg`` commands."""
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from torch import nn

from vitadapter import create_model
from vitadapter.cli import main
from vitadapter.data import ade20k
from vitadapter.metrics import SegmentationMetric
from vitadapter.predict import MS_RATIOS, predict, predict_probs, rescaled_size
from vitadapter.visualize import class_palette, label_image, segmentation_overlay

# ---- metrics ------------------------------------------------------------------------------------------------


def direct_scores(preds, labels, num_classes, ignore=255):
    """mmseg's definitions written out class by class with masks, over the whole dataset at once."""
    pred = np.concatenate([p.ravel() for p in preds])
    label = np.concatenate([t.ravel() for t in labels])
    keep = label != ignore
    pred, label = pred[keep], label[keep]
    iou, acc = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    for k in range(num_classes):
        inter = np.sum((pred == k) & (label == k))
        union = np.sum((pred == k) | (label == k))
        if union:
            iou[k] = inter / union
        if np.sum(label == k):
            acc[k] = inter / np.sum(label == k)
    return iou, acc, np.sum(pred == label) / label.size


def test_metric_accumulates_mmsegs_definitions_over_a_dataset():
    rng = np.random.default_rng(0)
    num_classes = 7
    preds, labels = [], []
    metric = SegmentationMetric(num_classes)
    for shape in [(5, 9), (12, 4), (1, 1), (30, 31)]:
        label = rng.integers(0, num_classes - 1, size=shape)  # class 6 is never labelled...
        label[rng.random(shape) < 0.2] = 255
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, num_classes, size=shape))  # ...but predicted
        pred[label == 255] = rng.integers(0, num_classes, size=int((label == 255).sum()))
        preds.append(pred)
        labels.append(label)
        metric.update(torch.from_numpy(pred), label)  # tensors and arrays alike
    iou, acc, aacc = direct_scores(preds, labels, num_classes)
    scores = metric.compute()
    np.testing.assert_allclose(scores.iou, iou)
    np.testing.assert_allclose(scores.acc, acc)
    assert np.isnan(scores.acc[6]) and 0 <= scores.iou[6] < 0.2  # predicted, never labelled: IoU counts it, Acc cannot
    assert scores.miou == pytest.approx(np.mean(iou)) and scores.macc == pytest.approx(np.nanmean(acc))
    assert scores.aacc == pytest.approx(aacc)


def test_metric_by_hand_absent_classes_and_ignored_pixels():
    metric = SegmentationMetric(4)
    label = np.array([[0, 0, 1, 255], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 3], [2, 2, 2, 3]])  # class 3 only where nothing is labelled: it does not count
    metric.update(pred, label)
    scores = metric.compute()
    # class 0: I=1, pred 1, label 3 -> U=3; class 1: I=1, U=2; class 2: I=2, U=3; class 3: nowhere -> NaN
    np.testing.assert_allclose(scores.iou, [1 / 3, 1 / 2, 2 / 3, np.nan])
    np.testing.assert_allclose(scores.acc, [1 / 3, 1, 1, np.nan])
    assert scores.miou == pytest.approx((1 / 3 + 1 / 2 + 2 / 3) / 3)
    assert scores.aacc == pytest.approx(4 / 6)


def test_metric_with_nothing_labelled_is_nan_without_warnings():
    metric = SegmentationMetric(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = metric.compute()
        assert np.isnan(scores.miou) and np.isnan(scores.aacc) and np.isnan(scores.iou).all()
        metric.update(np.zeros((4, 4), int), np.full((4, 4), 255))
        assert np.isnan(metric.compute().miou) and metric.pred_area.sum() == 0


def test_metric_refuses_labels_it_cannot_count():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="label holds class 3, outside 0..2"):
        metric.update(np.zeros((2, 2), int), np.array([[0, 1], [3, 255]]))
    with pytest.raises(ValueError, match="prediction holds class -1"):
        metric.update(np.array([[-1, 0]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="at least 1"):
        SegmentationMetric(0)


# ---- the test pipeline ------------------------------------------------------------------------------------


class Stub(nn.Module):
    """A segmentor whose answer is known: ``logits(image)`` of the normalised image it is given, which
    it records. ``crop_size`` sets the default test scale as a zoo segmentor's does."""

    def __init__(self, logits, num_classes=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop=64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.logits, self.num_classes, self.class_names = logits, num_classes, None
        self.crop_size = (crop, crop)
        self.pretrained_cfg = dict(mean=mean, std=std)
        self.seen = []

    def forward(self, image):
        self.seen.append(image.clone())
        return self.logits(image)


def strongest_channel(image):
    """Class = the colour channel that is largest: red 0, green 1, blue 2."""
    return 40 * image


def test_rescale_follows_mmcv_and_upstreams_scales():
    assert rescaled_size(451, 300, 512) == (770, 512)  # short side to 512
    assert rescaled_size(4000, 100, 512) == (2048, 51)  # the long side's cap, 4 x 512, wins
    assert rescaled_size(451, 300, 512, 0.5) == (385, 256)
    assert rescaled_size(451, 300, 512, 1.75) == (1347, 896)
    assert rescaled_size(451, 300, None, 1.5) == (677, 450)  # None: the image's own size
    assert rescaled_size(80, 64, 64) == (80, 64)


def test_predict_runs_the_segmentor_on_multiples_of_32_and_answers_at_the_image_size():
    rgb = np.zeros((50, 70, 3), np.uint8)
    rgb[:, :30, 0], rgb[:, 30:, 2] = 200, 200  # red left, blue right
    rgb[30:, 50:, 1] = 255  # a green block over the blue
    stub = Stub(strongest_channel, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    labels = predict(stub, Image.fromarray(rgb))
    assert labels.shape == (50, 70) and labels.dtype == torch.int64
    # scale 64: short side 50 -> 64, 70 -> 90, up to 96 x 64
    (seen,) = stub.seen
    assert seen.shape == (1, 3, 64, 96)
    red = (torch.tensor([200, 0, 0]) / 255 - torch.tensor([0.5, 0.5, 0.5])) / torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(seen[0, :, 2, 2], red)  # normalised with the model's mean and std
    assert (labels[:, :28] == 0).all() and (labels[:28, 32:] == 2).all() and (labels[32:, 52:] == 1).all()


def test_predict_flips_back_and_averages_probabilities():
    def left_is_class_0(image):
        width = image.shape[-1]
        left = (torch.arange(width) < width // 2).float().expand(1, 1, image.shape[-2], width)
        return 50 * torch.cat([left, 1 - left], 1)

    image = Image.new("RGB", (64, 64), "gray")
    plain = predict_probs(Stub(left_is_class_0, num_classes=2), image)
    assert (plain[0, :, :32] > 0.99).all() and (plain[1, :, 32:] > 0.99).all()
    flipped = predict_probs(Stub(left_is_class_0, num_classes=2), image, flip=True)
    # the flipped pass says the right half is class 0 once its answer is flipped back: each half is even
    torch.testing.assert_close(flipped, torch.full_like(flipped, 0.5))

    def by_size(image):  # the larger the pass, the surer of class 1; small passes favour class 0
        shift = image.shape[-1] / 32 - 2.5
        return torch.tensor([0.0, 4 * shift]).view(1, 2, 1, 1).expand(1, 2, *image.shape[-2:])

    stub = Stub(by_size, num_classes=2)
    both = predict_probs(stub, image, ratios=(0.5, 1.0, 1.75))
    assert [s.shape[-1] for s in stub.seen] == [32, 64, 128]
    single = [predict_probs(Stub(by_size, num_classes=2), image, ratios=(r,)) for r in (0.5, 1.0, 1.75)]
    torch.testing.assert_close(both, sum(single) / 3)  # the mean of softmaxes, not the softmax of a mean


def test_multi_scale_and_flip_are_upstreams_twelve_passes():
    stub = Stub(strongest_channel)
    predict(stub, Image.new("RGB", (70, 50), "red"), ratios=MS_RATIOS, flip=True)
    widths = [s.shape[-1] for s in stub.seen]
    # (4 x 64, 64) x 0.5 .. 1.75 keeping the ratio: widths 45, 67, 90, 112, 134, 157, each up to a
    # multiple of 32, every scale plain and flipped
    assert widths == [64, 64, 96, 96, 96, 96, 128, 128, 160, 160, 160, 160]
    assert torch.equal(stub.seen[1], stub.seen[0].flip(-1))


# ---- pictures ----------------------------------------------------------------------------------------------


def test_label_png_holds_class_indices_and_the_palette(tmp_path):
    labels = np.array([[0, 149], [12, 2]])
    palette = class_palette(150, ade20k.CLASSES)
    assert palette == list(ade20k.PALETTE)
    label_image(labels, palette).save(tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im), labels)
        assert tuple(im.convert("RGB").getpixel((1, 0))) == ade20k.PALETTE[149]
    from vitadapter.data import cityscapes, coco_stuff

    assert class_palette(171, coco_stuff.CLASSES) == list(coco_stuff.PALETTE)
    assert class_palette(19, cityscapes.CLASSES) == list(cityscapes.PALETTE)
    generated = class_palette(300)
    assert len(set(generated[:64])) == 64
    assert label_image(np.array([[299]]), generated).mode == "I;16"


def test_overlay_is_the_image_size_with_a_legend_and_the_alert():
    image = Image.new("RGB", (200, 120), (128, 128, 128))
    labels = np.zeros((120, 200), int)
    labels[:, 100:] = 1
    palette = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    plain = segmentation_overlay(image, labels, palette, ["a", "b", "c"])
    assert plain.size == image.size
    assert plain.getpixel((10, 100)) == (192, 64, 64)  # half image, half red
    assert plain.getpixel((110, 100)) == (64, 64, 192)
    legend = np.asarray(plain)[:60, 120:]
    assert (legend == [255, 0, 0]).all(-1).any() and (legend == [0, 0, 255]).all(-1).any()  # the two swatches
    assert not (legend == [0, 255, 0]).all(-1).any()  # an absent class is not listed
    alert = np.asarray(segmentation_overlay(image, labels, palette, ["a", "b", "c"], alert="RANDOM WEIGHTS"))
    red_text = (alert[..., 0] > 150) & (alert[..., 1] < 60) & (alert[..., 2] < 60)
    assert red_text[:20, :60].sum() > 20 and not red_text[40:, :60].any()
    with pytest.raises(ValueError, match="labels are 3x2"):
        segmentation_overlay(image, np.zeros((2, 3), int), palette, ["a", "b", "c"])


# ---- the commands -------------------------------------------------------------------------------------------


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No weights in any cache and no downloads: zoo names fall back to random weights."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def image_of(mode, size=(80, 64), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@pytest.fixture
def odd_folder(tmp_path):
    """Images as they come (gray, RGBA, 16-bit, EXIF-rotated, two sharing a stem), a file that only
    claims to be an image, and one that does not."""
    folder = tmp_path / "photos"
    folder.mkdir()
    image_of("L").save(folder / "gray.png")
    image_of("RGBA", (70, 50)).save(folder / "rgba.png")
    image_of("I;16").save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 x 64, shown turned a quarter: 64 x 80
    image_of("RGB").save(folder / "turned.jpg", exif=exif)
    image_of("RGB", (40, 40)).save(folder / "twin.png")
    image_of("RGB", (48, 40)).save(folder / "twin.jpg")
    (folder / "junk.png").write_bytes(b"not a picture at all")
    (folder / "notes.txt").write_text("hello")
    return folder


SHOWN_SIZES = {"gray.png": (80, 64), "rgba.png": (70, 50), "deep.png": (80, 64), "turned.jpg": (64, 80),
               "twin.png": (40, 40), "twin.jpg": (48, 40)}


def test_segment_a_folder_of_odd_images_skips_the_junk(odd_folder, tmp_path, capsys, offline):
    out = tmp_path / "out"
    assert main(["segment", str(odd_folder), "--out", str(out), "--size", "64", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "HF_HUB_OFFLINE" in err and "running on random weights" in err
    assert "skipped" in err and "junk.png is not an image file" in err and "notes.txt" in err
    assert "segmented 6 of 7 image(s)" in captured.out and "random weights" in captured.out
    for name, size in SHOWN_SIZES.items():  # two images share a stem: every output keeps the suffix
        with Image.open(out / f"{name}.label.png") as label, Image.open(out / f"{name}.overlay.png") as overlay:
            assert label.size == overlay.size == size, name
            assert label.mode == "P" and np.asarray(label).max() < 150
            assert overlay.mode == "RGB"
    assert len(list(out.iterdir())) == 12
    with Image.open(out / "gray.png.overlay.png") as overlay:  # the alert in red across the top
        top = np.asarray(overlay)[:10].astype(int)  # the white strip under the alert: red only in its text
        assert (top[..., 0] - top[..., 1:].max(-1) > 80).sum() > 20


@pytest.fixture(scope="module")
def class_2_weights(tmp_path_factory):
    """A whole checkpoint of the full-size T segmentor with 3 classes whose classifier answers class 2
    everywhere (zero weights, bias 0, 0, 10)."""
    torch.manual_seed(0)
    model = create_model("upernet_vit_adapter_t", num_classes=3)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.zero_()
        model.decode_head.conv_seg.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    path = tmp_path_factory.mktemp("weights") / "class2.pth"
    torch.save({"meta": {}, "state_dict": model.state_dict()}, path)
    return path


def test_segment_with_a_weights_file_uses_its_classes(class_2_weights, tmp_path, capsys):
    image = tmp_path / "one.png"
    image_of("RGB", (70, 50)).save(image)
    out = tmp_path / "out"
    assert main(["segment", str(image), "--weights", str(class_2_weights), "--out", str(out), "--size", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"weights: {class_2_weights}" in captured.out
    with Image.open(out / "one.label.png") as label, Image.open(out / "one.overlay.png") as overlay:
        assert label.size == overlay.size == (70, 50)
        assert (np.asarray(label) == 2).all()
        assert tuple(label.convert("RGB").getpixel((0, 0))) == class_palette(3)[2]  # colours for 3 classes
        # named "class 2" in the legend, no alert on top
        expected = segmentation_overlay(Image.open(image).convert("RGB"), np.asarray(label), class_palette(3), ["class 0", "class 1", "class 2"])
        assert np.array_equal(np.asarray(overlay), np.asarray(expected))


def write_dataset(root, labels_by_name, split="validation"):
    """ADE20K's layout: images/SPLIT/NAME.jpg and annotations/SPLIT/NAME.png (0 = other)."""
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i, (name, stored) in enumerate(labels_by_name.items()):
        image_of("RGB", stored.shape[::-1], seed=i).save(root / "images" / split / f"{name}.jpg")
        Image.fromarray(stored.astype(np.uint8)).save(root / "annotations" / split / f"{name}.png")


TABLE_ROW = re.compile(r"^(class \d)\s+(\S+)\s+(\S+)$", re.MULTILINE)
SUMMARY = re.compile(r"^aAcc (\S+)  mIoU (\S+)  mAcc (\S+)$", re.MULTILINE)


def test_eval_seg_of_a_model_that_always_says_class_2(class_2_weights, tmp_path, capsys):
    """Stored labels 0 (other, ignored), 1 and 3 (classes 0 and 2); class 1 appears nowhere."""
    rng = np.random.default_rng(1)
    stored = {f"ADE_val_{i:08d}": rng.choice([0, 1, 3, 3], size=shape) for i, shape in enumerate([(40, 56), (33, 47), (64, 64)])}
    write_dataset(tmp_path / "ade", stored)
    every = np.concatenate([s.ravel() for s in stored.values()])
    labelled, twos, zeros = np.sum(every != 0), np.sum(every == 3), np.sum(every == 1)
    iou_2, aacc = twos / labelled, twos / labelled
    argv = ["eval-seg", str(tmp_path / "ade"), "--weights", str(class_2_weights), "--size", "64", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 of 3 images" in out and "validation" in out and "single scale" in out
    rows = {name: (iou, acc) for name, iou, acc in TABLE_ROW.findall(out)}
    assert rows == {"class 0": ("0.00", "0.00"), "class 1": ("nan", "nan"), "class 2": (f"{100 * iou_2:.2f}", "100.00")}
    assert zeros > 0 and SUMMARY.search(out).groups() == (f"{100 * aacc:.2f}", f"{100 * iou_2 / 2:.2f}", "50.00")

    assert main([*argv, "--aug", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 images" in out and "multi-scale 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 + flip" in out
    first = stored["ADE_val_00000000"]
    assert SUMMARY.search(out).group(1) == f"{100 * np.sum(first == 3) / np.sum(first != 0):.2f}"


def test_eval_seg_scores_known_predictions_through_the_pipeline(tmp_path, capsys, monkeypatch):
    """Colour-coded images whose labels are wrong in known places, segmented by a stub that reads the
    colours: the command's table equals the metric computed on the arrays directly."""
    rng = np.random.default_rng(2)
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    stored = []
    for i, (h, w) in enumerate([(64, 128), (96, 64)]):  # the test scale, 64, keeps these sizes: no resampling
        truth = np.zeros((h, w), np.int64)
        truth[:, w // 2:] = 2
        truth[h // 2:, : w // 2] = 1
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[np.arange(h)[:, None], np.arange(w)[None, :], truth] = 220
        Image.fromarray(rgb).save(root / "images" / f"{i}.png")
        label = truth.copy()
        wrong = rng.random((h, w)) < 0.1
        label[wrong] = (label[wrong] + 1) % 3  # mislabelled
        label[rng.random((h, w)) < 0.1] = 255  # unlabelled
        Image.fromarray(label.astype(np.uint8)).save(root / "annotations" / f"{i}.png")
        stored.append(label)
    truths = [np.asarray(Image.open(root / "images" / f"{i}.png")).argmax(-1) for i in range(2)]
    stub = Stub(strongest_channel, crop=64)
    monkeypatch.setattr("vitadapter.cli.eval_seg.segmentor_model", lambda args, device, fall_back: (stub, "stub"))
    assert main(["eval-seg", str(root), "--no-reduce-zero-label"]) == 0
    out = capsys.readouterr().out
    assert [tuple(s.shape[-2:]) for s in stub.seen] == [(64, 128), (96, 64)]
    iou, acc, aacc = direct_scores(truths, stored, 3)
    assert 0.6 < np.nanmin(iou) < 0.9  # the mislabelled pixels count
    rows = {name: (i, a) for name, i, a in TABLE_ROW.findall(out)}
    assert rows == {f"class {k}": (f"{100 * iou[k]:.2f}", f"{100 * acc[k]:.2f}") for k in range(3)}
    assert SUMMARY.search(out).groups() == (f"{100 * aacc:.2f}", f"{100 * np.mean(iou):.2f}", f"{100 * np.mean(acc):.2f}")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["segment", "--model", "vit_adapter_t"], ["--model vit_adapter_t is a backbone", "vitadapter features", "upernet_"]),
        (["eval-seg", ".", "--model", "vit_adapter_s"], ["--model vit_adapter_s is a backbone"]),
        (["features", "--model", "upernet_vit_adapter_t"], ["is a segmentor", "vitadapter segment --model upernet_vit_adapter_t"]),
        (["segment", "--model", "upernet_vit_adapter_t.coco"], ["has no tag 'coco'", "augreg_ade20k"]),
        (["segment", "nowhere.jpg"], ["nowhere.jpg"]),
        (["segment", "--weights", "nothere.pth"], ["--weights nothere.pth: no such file"]),
        (["eval-seg", "nowhere"], ["no folder at 'nowhere'"]),
        (["eval-seg", "."], ["has no images/ folder"]),
    ],
)
def test_segment_and_eval_errors_are_one_line(argv, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and err.count("\n") == 1, err
    assert all(f in err for f in fragments), err
    assert list(tmp_path.iterdir()) == []


def test_a_lone_unreadable_image_is_the_error(tmp_path, capsys):
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8 truncated")
    assert main(["segment", str(tmp_path / "fake.jpg"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and "fake.jpg is not an image file" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_eval_seg_without_weights_fails_instead_of_scoring_random_ones(tmp_path, capsys, offline):
    write_dataset(tmp_path / "ade", {"a": np.ones((8, 8), int)})
    assert main(["eval-seg", str(tmp_path / "ade")]) == 2
    err = capsys.readouterr().err
    assert "not cached and HF_HUB_OFFLINE is set" in err and "--weights FILE" in err and err.count("\n") == 1


def test_eval_seg_names_labels_outside_the_models_classes(class_2_weights, tmp_path, capsys):
    write_dataset(tmp_path / "ade", {"a": np.full((8, 8), 9)})
    assert main(["eval-seg", str(tmp_path / "ade"), "--weights", str(class_2_weights), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "label holds class 8, outside 0..2" in err and err.count("\n") == 1


def test_usage_errors_of_the_new_commands_answer_without_torch():
    script = textwrap.dedent("""
        import contextlib, io, sys
        from vitadapter.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for argv in (["segment", "--size", "0"], ["segment", "--model", "vit_adapter_t"], ["eval-seg", "nowhere"],
                         ["eval-seg", ".", "--model", "nope"], ["eval-seg", "--help"]):
                try:
                    assert main(argv) == 2, argv
                except SystemExit:
                    pass
        heavy = sorted({"torch", "timm", "numpy", "PIL.Image"} & set(sys.modules))
        assert not heavy, heavy
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

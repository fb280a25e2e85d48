"""Fine-tuning: the augmentations, the sampler, the optimizer and schedule, a short CPU run whose loss
goes down, resuming after an interruption, torchrun, and the `vitadapter train-seg` command."""
import colorsys
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitadapter
from vitadapter.cli import main
from vitadapter.data.transforms import (
    SegmentationTrainTransform,
    hsv_to_rgb,
    normalize_and_pad,
    photometric_distortion,
    random_crop,
    random_resize,
    rgb_to_hsv,
)
from vitadapter.models.segmentor import Segmentor
from vitadapter.train import InfiniteSampler, TrainOptions, build_optimizer, build_segmentor, poly_schedule, train_segmentation

# a small UperNet (4 blocks of 48 channels, narrow heads): a step takes a fraction of a second on a CPU
TINY = dict(embed_dim=48, depth=4, num_heads=3, deform_num_heads=6, interaction_indexes=[0, 1, 2, 3], head_channels=32, aux_channels=16)
MODEL = "upernet_vit_adapter_t"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """8 RGB images 64x64 in ADE20K's layout: a blue background (class 0), a red square (1) and a
    green disc (2), with noise; the label PNGs store class + 1 (0 would be "other")."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    colours = np.array([[40, 60, 200], [220, 50, 40], [40, 200, 60]])
    rows, cols = np.mgrid[:64, :64]
    for kind in ("images", "annotations"):
        (root / kind / "training").mkdir(parents=True)
    for i in range(8):
        label = np.zeros((64, 64), np.uint8)
        top, left = rng.integers(0, 32, 2)
        label[top:top + 24, left:left + 24] = 1
        cy, cx = rng.integers(16, 48, 2)
        label[(rows - cy) ** 2 + (cols - cx) ** 2 < 100] = 2
        image = np.clip(colours[label] + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / "training" / f"{i}.png")
        Image.fromarray(label + 1).save(root / "annotations" / "training" / f"{i}.png")
    return root


def options(data: Path, out: Path, **changes) -> TrainOptions:
    settings = dict(num_classes=3, model_kwargs=TINY, pretrained_backbone=False, crop_size=64, batch_size=2, iters=6,
                    warmup_iters=2, lr=1e-3, workers=0, log_every=1, save_every=3)
    return TrainOptions(str(data), MODEL, str(out), **{**settings, **changes})


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- augmentations ----------------------------------------------------------------------------------


def test_random_resize_keeps_the_aspect_ratio_within_the_ratio_range():
    rng = np.random.default_rng(0)
    image, label = np.zeros((30, 60, 3), np.uint8), np.arange(1800).reshape(30, 60) % 7
    for _ in range(20):
        resized, resized_label = random_resize(image, label, rng, scale=(400, 40), ratio_range=(0.5, 2.0))
        height, width = resized_label.shape
        assert resized.shape == (height, width, 3)
        assert 20 <= height <= 80 and abs(width - 2 * height) <= 1  # the short side is 40 * ratio
        assert set(np.unique(resized_label)) <= set(range(7))  # nearest: no values between classes


def test_crop_pads_image_with_zero_and_label_with_ignore():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    out = normalize_and_pad(np.full((20, 30, 3), 255, np.uint8), np.ones((20, 30), np.int64), mean, std, (32, 40))
    assert out["image"].shape == (3, 32, 40) and out["label"].shape == (32, 40) and out["label"].dtype == torch.int64
    assert torch.all(out["image"][:, :20, :30] == 2.0)  # (1 - 0.5) / 0.25
    assert torch.all(out["image"][:, 20:] == 0) and torch.all(out["image"][:, :, 30:] == 0)
    assert torch.all(out["label"][:20, :30] == 1)
    assert torch.all(out["label"][20:] == 255) and torch.all(out["label"][:, 30:] == 255)


def test_transform_gives_crops_of_the_crop_size_at_any_image_size():
    transform = SegmentationTrainTransform((48, 48), (0.5,) * 3, (0.5,) * 3, scale=(256, 64))
    rng = np.random.default_rng(1)
    for height, width in ((10, 14), (64, 64), (200, 90)):
        label = np.random.default_rng(0).integers(0, 3, (height, width))
        out = transform(np.zeros((height, width, 3), np.uint8), label, rng)
        assert out["image"].shape == (3, 48, 48) and out["label"].shape == (48, 48)
    # kept at 10x14 (ratio 1 of a (40, 10) scale), the image is padded: the label with ignore
    small = SegmentationTrainTransform((48, 48), (0.5,) * 3, (0.5,) * 3, scale=(40, 10), ratio_range=(1.0, 1.0))
    out = small(np.zeros((10, 14, 3), np.uint8), np.zeros((10, 14), np.int64), rng)
    assert torch.all(out["label"][:10, :14] == 0) and torch.all(out["label"][10:] == 255) and torch.all(out["label"][:, 14:] == 255)


def test_flip_moves_image_and_label_together():
    """The red channel encodes the label, so any flip or crop the two do not share shows up."""
    label = np.zeros((40, 40), np.int64)
    label[:, 25:] = 1
    label[5:15, 2:8] = 2
    image = np.zeros((40, 40, 3), np.uint8)
    image[..., 0] = label * 100
    transform = SegmentationTrainTransform((32, 32), (0.0,) * 3, (1 / 255,) * 3, scale=(160, 40), ratio_range=(1.0, 1.0),
                                           cat_max_ratio=1.0, photometric=False)
    mirrored = 0
    for seed in range(16):
        out = transform(image, label, np.random.default_rng(seed))
        assert torch.equal(out["image"][0].round().long(), out["label"] * 100)
        mirrored += int(out["label"][:, 0].eq(1).all())  # class 1 on the left: this crop was flipped
    assert 3 <= mirrored <= 13  # p = 0.5 for each of 16


def test_random_crop_avoids_windows_dominated_by_one_class():
    """Columns 0-9 are unlabelled, 10-49 class 0, 50-99 stripes of classes 0 and 1: a 20-wide window
    left of column 50 holds one class (refused), one on the stripes about half of each."""
    label = np.zeros((20, 100), np.int64)
    label[:, :10] = 255
    label[:, 50:] = (np.arange(50) // 3 % 2)[None]
    image = np.zeros((20, 100, 3), np.uint8)
    for seed in range(10):
        _, window = random_crop(image, label, np.random.default_rng(seed), (20, 20), cat_max_ratio=0.75)
        values, counts = np.unique(window[window != 255], return_counts=True)
        assert len(values) == 2 and counts.max() / counts.sum() < 0.75, seed
    plain = [random_crop(image, label, np.random.default_rng(seed), (20, 20), cat_max_ratio=1.0)[1] for seed in range(30)]
    assert any(len(np.unique(w[w != 255])) < 2 for w in plain)  # without the rule such windows come up


def test_random_crop_keeps_the_eleventh_window_after_ten_refusals():
    label = np.zeros((50, 50), np.int64)  # one class: every window is refused
    image = np.arange(50 * 50 * 3, dtype=np.int64).reshape(50, 50, 3)
    rng, replay = np.random.default_rng(3), np.random.default_rng(3)
    crop, _ = random_crop(image, label, rng, (10, 10), cat_max_ratio=0.75)
    windows = [(int(replay.integers(0, 41)), int(replay.integers(0, 41))) for _ in range(11)]
    top, left = windows[-1]
    assert np.array_equal(crop, image[top:top + 10, left:left + 10])
    assert rng.integers(1 << 30) == replay.integers(1 << 30)  # no further draws


def test_hsv_round_trip_and_scales():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert np.array_equal(hsv_to_rgb(rgb_to_hsv(pixels)), pixels)
    hsv = rgb_to_hsv(pixels[:1, :8])[0]
    for (h, s, v), rgb in zip(hsv, pixels[0, :8]):
        expected = colorsys.rgb_to_hsv(*(rgb / 255))
        assert np.allclose((h, s, v), (expected[0] * 180, expected[1] * 255, expected[2] * 255), atol=1e-3)


def test_photometric_distortion_is_seeded_and_leaves_grey_grey():
    grey = np.repeat(np.random.default_rng(0).integers(0, 256, (16, 16, 1)).astype(np.uint8), 3, axis=2)
    outputs = [photometric_distortion(grey.copy(), np.random.default_rng(seed)) for seed in range(8)]
    for out in outputs:
        assert out.dtype == np.uint8 and out.shape == grey.shape
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])  # no hue on grey
    assert len({out.tobytes() for out in outputs}) > 4
    assert np.array_equal(photometric_distortion(grey.copy(), np.random.default_rng(5)), outputs[5])
    colour = np.random.default_rng(1).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert any(not np.array_equal(photometric_distortion(colour, np.random.default_rng(s)), colour) for s in range(4))


# ---- sampler, optimizer, schedule -----------------------------------------------------------------


def test_sampler_shards_epochs_between_processes_and_resumes_mid_stream():
    def take(sampler, n):
        stream = iter(sampler)
        return [next(stream) for _ in range(n)]

    ranks = [take(InfiniteSampler(7, seed=3, rank=r, world_size=2), 8) for r in range(2)]
    first_epoch = [index for rank in ranks for index, _ in rank[:4]]
    assert set(first_epoch) == set(range(7)) and len(first_epoch) == 8  # one index repeats to pad 7 to 8
    seeds = [seed for rank in ranks for _, seed in rank]
    assert len(set(seeds)) == len(seeds)  # every sample gets its own augmentation seed
    assert take(InfiniteSampler(7, seed=3, rank=1, world_size=2, start=5), 3) == ranks[1][5:8]
    assert take(InfiniteSampler(7, seed=4), 7) != take(InfiniteSampler(7, seed=3), 7)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vitadapter.create_model(MODEL, num_classes=3, **TINY)


def test_layer_decay_groups_follow_upstreams_constructor(tiny):
    optimizer = build_optimizer(tiny, lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    where = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    named = dict(tiny.named_parameters())

    def lr(name):
        return where[id(named[name])]["lr"]

    depth = 4
    assert lr("backbone.vit.patch_embed.proj.weight") == pytest.approx(1e-3 * 0.9 ** (depth + 1))
    for i in range(depth):
        assert lr(f"backbone.vit.blocks.{i}.attn.qkv.weight") == pytest.approx(1e-3 * 0.9 ** (depth - i))
    for name in ("backbone.level_embed", "backbone.spm.stem.0.weight", "decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight"):
        assert lr(name) == pytest.approx(1e-3), name  # the adapter and the heads: the full rate
    decay = {name: where[id(p)]["weight_decay"] for name, p in named.items()}
    assert decay["backbone.vit.blocks.0.attn.qkv.weight"] == 0.05 and decay["decode_head.conv_seg.weight"] == 0.05
    assert decay["backbone.vit.blocks.0.attn.qkv.bias"] == 0 and decay["backbone.vit.pos_embed"] == 0
    assert decay["backbone.level_embed"] == 0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)


def test_poly_schedule_with_linear_warmup():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 2.0}])
    scheduler = poly_schedule(optimizer, iters=100, warmup_iters=10)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2.0 * 1e-6)
    assert lrs[5] == pytest.approx(2.0 * 0.95 * (1 - 0.5 * (1 - 1e-6)))  # warm-up scales the decayed lr
    assert lrs[10] == pytest.approx(2.0 * 0.9) and lrs[50] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.02)
    assert optimizer.param_groups[0]["lr"] == 0


# ---- training runs ----------------------------------------------------------------------------------


def test_train_seg_command_learns_the_shapes(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train-seg", str(shapes), "--model", MODEL, "--out", str(run), "--num-classes", "3", "--random-init",
            "--model-kwargs", json.dumps(TINY), "--crop", "64", "--batch-size", "4", "--iters", "30", "--warmup-iters", "2",
            "--lr", "3e-3", "--workers", "0", "--log-every", "5", "--save-every", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train-seg: starting: upernet_vit_adapter_t, 8 images, 64x64 crops" in out and f"wrote {run / 'model.pth'}" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["iteration"] for entry in log] == [5, 10, 15, 20, 25, 30]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < 0.75 * first, (first, last)
    assert sorted(p.name for p in run.iterdir()) == ["last.pth", "log.jsonl", "model.pth"]

    # the final model loads by name, as the zoo loader reads a released checkpoint
    model = vitadapter.create_model(MODEL, pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(run / "model.pth")), **TINY)
    saved = torch.load(run / "model.pth", weights_only=True)
    assert saved["meta"] == {"architecture": MODEL, "num_classes": 3, "model_kwargs": TINY, "iterations": 30}
    assert all(torch.equal(value, saved["state_dict"][key]) for key, value in model.state_dict().items())


def test_resume_after_an_interruption_gives_the_uninterrupted_state(shapes, tmp_path, monkeypatch):
    """Six steps straight, against a run that dies in step 5 (after the checkpoint of step 3) and is
    resumed: the weights agree bit for bit (dropout, drop path and augmentations included)."""
    train_segmentation(options(shapes, tmp_path / "straight"))

    calls = {"n": 0}
    loss = Segmentor.loss

    def dies_in_step_five(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return loss(self, images, labels)

    monkeypatch.setattr(Segmentor, "loss", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        train_segmentation(options(shapes, tmp_path / "resumed"))
    monkeypatch.setattr(Segmentor, "loss", loss)
    assert torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["iteration"] == 3
    assert not (tmp_path / "resumed" / "model.pth").exists() and debris(tmp_path / "resumed") == []

    train_segmentation(options(shapes, tmp_path / "resumed", resume=True))
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert straight["iteration"] == resumed["iteration"] == 6
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert straight["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == 6
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])

    with pytest.raises(ValueError, match=r"other settings: lr 0\.001 -> 0\.002"):
        train_segmentation(options(shapes, tmp_path / "resumed", resume=True, lr=2e-3))
    with pytest.raises(ValueError, match="already holds a run"):
        train_segmentation(options(shapes, tmp_path / "resumed"))


    # --weights: a run's model starts another one, with a fresh classifier for another class count
    start = build_segmentor(options(shapes, tmp_path / "next", weights=str(tmp_path / "straight" / "model.pth"), num_classes=5))
    for key, value in start.state_dict().items():
        if ".conv_seg." in key:
            assert value.shape[0] == 5 and straight["model"][key].shape[0] == 3
        else:
            assert torch.equal(value, straight["model"][key]), key


def test_a_failed_checkpoint_write_keeps_the_previous_one(shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    saves = {"n": 0}
    save = torch.save

    def fails_the_second_time(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_the_second_time)
    with pytest.raises(OSError, match="No space left"):
        train_segmentation(options(shapes, run))
    assert debris(run) == [] and sorted(p.name for p in run.iterdir()) == ["last.pth", "log.jsonl"]
    assert torch.load(run / "last.pth", weights_only=True)["iteration"] == 3


def test_torchrun_two_cpu_processes(shapes, tmp_path):
    """DDP over gloo: both processes train, rank 0 alone writes."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(vitadapter.__file__).parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitadapter",
               "train-seg", str(shapes), "--model", MODEL, "--out", str(run), "--num-classes", "3", "--random-init",
               "--model-kwargs", json.dumps(TINY), "--crop", "64", "--batch-size", "2", "--iters", "2", "--workers", "0",
               "--log-every", "1", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 2 x 2 process(es)" in done.stdout and done.stdout.count("wrote ") == 1
    assert sorted(p.name for p in run.iterdir()) == ["last.pth", "log.jsonl", "model.pth"]
    assert torch.load(run / "last.pth", weights_only=True)["world_size"] == 2


# Holds the lock of a run folder, as a train-seg run writing into it does, until it is killed.
LOCK_HOLDER = """
import sys, time
from pathlib import Path
from vitadapter.weights.staging import folder_lock
with folder_lock(Path(sys.argv[1]), "train-seg run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_folder_in_use_is_refused_until_the_first_is_gone(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    argv = ["train-seg", str(shapes), "--model", MODEL, "--out", str(run), "--num-classes", "3", "--random-init",
            "--model-kwargs", json.dumps(TINY), "--crop", "64", "--iters", "2", "--workers", "0", "--log-every", "1"]
    env = dict(os.environ, PYTHONPATH=str(Path(vitadapter.__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(argv) == 2
        one_line_error(capsys, f"{run} is in use by another train-seg run")
        assert list(run.iterdir()) == []
    finally:
        holder.kill()  # as a crash would: the lock goes with the process, no stale lock remains
        holder.wait(timeout=60)
    assert main(argv) == 0
    assert sorted(p.name for p in run.iterdir()) == ["last.pth", "log.jsonl", "model.pth"]


# ---- command-line errors ----------------------------------------------------------------------------


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_train_seg_usage_errors_come_before_torch_loads(tmp_path):
    script = (
        "import sys\n"
        "from vitadapter.cli import main\n"
        f"assert main(['train-seg', {str(tmp_path / 'missing')!r}, '--model', 'upernet_vit_adapter_t', '--out', 'x']) == 2\n"
        "assert main(['train-seg', '.', '--model', 'vit_adapter_t', '--out', 'x']) == 2\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("vitadapter: error: ") == 2


def test_train_seg_reports_bad_input_in_one_line(shapes, tmp_path, capsys):
    base = ["--model", MODEL, "--out", str(tmp_path / "run")]
    assert main(["train-seg", str(tmp_path / "missing"), *base]) == 2
    one_line_error(capsys, "missing: no such folder")

    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "images" / "training").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(unlabelled / "images" / "training" / "a.png")
    assert main(["train-seg", str(unlabelled), *base]) == 2
    one_line_error(capsys, "have no label PNG", "a.png")

    assert main(["train-seg", str(shapes), "--model", "vit_adapter_t", "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "is a backbone", "upernet_vit_adapter_t")
    assert main(["train-seg", str(shapes), "--model", f"{MODEL}.augreg_ade20k", "--out", str(tmp_path / "run"), "--random-init"]) == 2
    one_line_error(capsys, "starts from that release", "--random-init")
    assert main(["train-seg", str(shapes), *base, "--resume"]) == 2
    one_line_error(capsys, "--resume: no last.pth")
    assert main(["train-seg", str(shapes), *base, "--model-kwargs", "{oops"]) == 2
    one_line_error(capsys, "--model-kwargs: not valid JSON")
    assert main(["train-seg", str(shapes), *base, "--layer-decay", "1.5"]) == 2
    one_line_error(capsys, "--layer-decay 1.5")
    assert main(["train-seg", str(shapes), *base, "--weights", str(tmp_path / "nope.pth")]) == 2
    one_line_error(capsys, "--weights", "no such file")
    assert main(["train-seg", str(shapes), *base, "--device", "tpu:9"]) == 2
    one_line_error(capsys, "--device tpu:9")
    assert main(["train-seg", str(shapes), *base, "--batch-size", "1", "--random-init", "--model-kwargs", json.dumps(TINY)]) == 2
    one_line_error(capsys, "--batch-size 1", "2 or more images")
    assert not (tmp_path / "run").exists()

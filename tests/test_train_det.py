"""Fine-tuning detectors: the COCO folder reader, the 3x augmentation keeping boxes, masks and pixels
together, the step schedule, and `vitadapter train-det` runs (every loss term logged, the loss
falling on a tiny scene, resuming bit for bit, one run per folder, bad data named in one line)."""
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
from vitadapter.data.coco_instances import CocoInstances, rle_decode
from vitadapter.data.detection_transforms import DetectionTrainTransform, flip, random_crop, resize
from vitadapter.models.detector import Detector
from vitadapter.trainer import step_schedule

# a small Mask R-CNN: 4 blocks of 48 channels, heads 32 wide (box fc 64): a step takes a fraction of a second
TINY = dict(embed_dim=48, depth=4, num_heads=3, conv_inplane=16, deform_num_heads=6,
            interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], window_size=[7, 7, None, 7], neck_channels=32, box_fc_channels=64,
            mask_channels=32)
MODEL = "mask_rcnn_vit_adapter_t"
TERMS = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a bool mask: column-major runs, starting with a run of 0s."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])) != 0)
    return np.diff(np.concatenate([[0], edges])).tolist()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """3 images 96x128 of a blue background with a red rectangle (category 7 "red", a polygon) and a
    green square (category 3 "green", uncompressed RLE), plus a crowd region; ids out of order."""
    root = tmp_path_factory.mktemp("scene")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        pixels = np.zeros((96, 128, 3), np.uint8)
        pixels[:] = (40, 60, 200)
        x, y = int(rng.integers(4, 50)), int(rng.integers(4, 40))
        pixels[y:y + 40, x:x + 56] = (220, 50, 40)
        green = np.zeros((96, 128), bool)
        gx, gy = int(rng.integers(70, 100)), int(rng.integers(50, 70))
        green[gy:gy + 24, gx:gx + 24] = True
        pixels[green] = (40, 200, 60)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append(dict(id=10 + i, file_name=f"{i}.png", height=96, width=128))
        annotations += [
            dict(id=3 * i + 1, image_id=10 + i, category_id=7, bbox=[x, y, 56, 40], area=56 * 40, iscrowd=0,
                 segmentation=[[x, y, x + 56, y, x + 56, y + 40, x, y + 40]]),
            dict(id=3 * i + 2, image_id=10 + i, category_id=3, bbox=[gx, gy, 24, 24], area=24 * 24, iscrowd=0,
                 segmentation=dict(counts=rle_counts(green), size=[96, 128])),
            dict(id=3 * i + 3, image_id=10 + i, category_id=7, bbox=[0, 80, 20, 16], area=320, iscrowd=1,
                 segmentation=dict(counts=rle_counts(np.pad(np.ones((16, 20), bool), ((80, 0), (0, 108)))), size=[96, 128])),
        ]
    categories = [dict(id=7, name="red"), dict(id=3, name="green")]
    (root / "instances.json").write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return root


def argv(scene: Path, run: Path, *extra: str) -> list[str]:
    return ["train-det", "--model", MODEL, "--data", str(scene / "images"), "--ann", str(scene / "instances.json"), "--out", str(run),
            "--random-init", "--model-kwargs", json.dumps(TINY), "--scales", "96,128", "--max-size", "160", "--workers", "0",
            "--warmup-iters", "2", "--lr", "1e-3", "--log-every", "1", *extra]


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---- data -------------------------------------------------------------------------------------------


def test_coco_folder_gives_xyxy_boxes_contiguous_labels_masks_and_crowds_to_ignore(scene):
    data = CocoInstances(scene / "images", scene / "instances.json")
    assert data.class_names == ["green", "red"] and data.category_ids == [3, 7] and len(data) == 3  # labels by category id
    annotations = json.loads((scene / "instances.json").read_text())["annotations"]
    for index in range(3):
        item = data[index]
        own = [a for a in annotations if a["image_id"] == 10 + index]
        red, green, crowd = own
        assert item["labels"].tolist() == [1, 0]
        for box, ann in zip(item["boxes"], (red, green)):
            x, y, w, h = ann["bbox"]
            assert box.tolist() == [x, y, x + w, y + h]
            # the mask is the box's rectangle: polygon and RLE alike
        for mask, box in zip(item["masks"], item["boxes"].astype(int)):
            expected = np.zeros((96, 128), bool)
            expected[box[1]:box[3], box[0]:box[2]] = True
            assert (mask != expected).sum() <= expected.sum() * 0.1 + 2 * (box[2] - box[0] + box[3] - box[1])
        assert item["ignore_boxes"].tolist() == [[0, 80, 20, 96]]
        assert np.array_equal(item["masks"][1], rle_decode(green["segmentation"]["counts"], 96, 128))


def test_rle_decoding_agrees_with_pycocotools_on_random_masks():
    coco_mask = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((height, width)) < rng.random()
        compressed = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert np.array_equal(rle_decode(compressed["counts"], height, width), mask)
        assert np.array_equal(rle_decode(rle_counts(mask) if mask.size else [], height, width), mask)


def random_instances(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """An image of random size with 0-3 random rectangles (masks filling their boxes, integer corners);
    its red channel is 255 on the first rectangle only, its green channel noise."""
    height, width = (int(v) for v in rng.integers(32, 100, 2))
    corners = np.sort(rng.integers(0, [[width + 1, height + 1]] * 2, (int(rng.integers(0, 4)), 2, 2)), axis=1)
    boxes = corners.reshape(-1, 4).astype(np.float32)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 4) & (boxes[:, 3] - boxes[:, 1] >= 4)]
    masks = np.zeros((len(boxes), height, width), bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        mask[y1:y2, x1:x2] = True
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = masks[:1].any(0) * 255
    image[..., 1] = rng.integers(0, 256, (height, width))
    crowd = boxes[:1] + 1
    return image, dict(boxes=boxes, labels=np.arange(len(boxes)), masks=masks, ignore_boxes=crowd)


def assert_aligned(sample: dict, tolerance: float) -> int:
    """Each instance's mask is a rectangle within ``tolerance`` px of its box, on the image; returns
    how many were checked (after a resize, boxes under 2 px may have lost their mask)."""
    masks = torch.as_tensor(np.ascontiguousarray(sample["masks"]))
    height, width = sample.get("image_size", sample["image"].shape[:2])
    checked = 0
    for box, mask in zip(torch.as_tensor(sample["boxes"]), masks):
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        if tolerance and min(box[2] - box[0], box[3] - box[1]) < 2:
            continue
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        assert len(rows) and len(cols), box
        found = torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()
        assert torch.all((found - box).abs() <= tolerance), (box, found)
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        checked += 1
    return checked


def test_flip_resize_and_crop_each_keep_boxes_and_masks_together():
    """Flip and crop move boxes exactly with the masks; a nearest-neighbour resize keeps each mask edge
    within a pixel of its scaled box edge. The labels and boxes to ignore follow their instances."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        image, instances = random_instances(rng)
        sample = dict(instances, image=image)
        flipped = flip(sample)
        assert assert_aligned(flipped, 0) == len(instances["boxes"])
        assert np.array_equal(flip(flipped)["boxes"], instances["boxes"]) and np.array_equal(flip(flipped)["image"], image)
        scale = tuple(int(v) for v in sorted(rng.integers(20, 200, 2)))
        resized = resize(sample, scale)
        assert resized["image"].shape[:2] == resized["masks"].shape[1:]
        assert max(resized["image"].shape[:2]) <= scale[1] and min(resized["image"].shape[:2]) <= scale[0]
        checked += assert_aligned(resized, 1)
        cropped = random_crop(sample, rng, (20, 50))
        assert assert_aligned(cropped, 0) == len(cropped["boxes"])
        for label, box in zip(cropped["labels"], cropped["boxes"]):
            source = instances["boxes"][label]  # the label still names the instance the box came from
            assert box[2] - box[0] <= source[2] - source[0] and box[3] - box[1] <= source[3] - source[1]
        assert len(cropped["ignore_boxes"]) <= len(instances["ignore_boxes"])
    assert checked > 30


def test_the_whole_augmentation_keeps_boxes_masks_and_pixels_together():
    """Random cases through flip, either policy and the final crop: masks stay rectangles near their
    boxes (two resizes: up to a pixel each, scaled), and the red channel, 255 on the first instance
    only, still marks its mask 3 px away from the edges (as far as the boxes may move)."""
    rng = np.random.default_rng(1)
    transform = DetectionTrainTransform((0.0,) * 3, (1 / 255,) * 3, scales=(48, 64, 80), max_size=120,
                                        crop_policy_scales=(60, 90), crop_policy_range=(40, 70), crop_size=(72, 72))
    checked = 0
    for case in range(60):
        image, instances = random_instances(rng)
        out = transform(image, instances, np.random.default_rng(case))
        h, w = out["image_size"]
        assert out["image"].shape[1:] == out["masks"].shape[1:] and out["image"].shape[1] % 32 == 0 and out["image"].shape[2] % 32 == 0
        assert not out["masks"][:, h:].any() and not out["masks"][:, :, w:].any() and not out["image"][:, h:].any()
        assert len(out["labels"]) == len(out["boxes"]) == len(out["masks"])
        checked += assert_aligned(out, 3)
        red = out["image"][0, :h, :w]
        first = out["labels"] == 0
        union = torch.nn.functional.pad(out["masks"][first, :h, :w].any(0).float(), (3, 3, 3, 3))[None, None]
        inner = torch.nn.functional.max_pool2d(-union, 7, 1)[0, 0] == -1  # 3 px inside every edge (the image's too)
        covered = union.clone()  # a sliver of a box may have lost its mask's pixels in a resize, not its colour
        for x1, y1, x2, y2 in out["boxes"][first].tolist():
            covered[..., int(y1) + 3:int(np.ceil(y2)) + 3, int(x1) + 3:int(np.ceil(x2)) + 3] = 1
        outer = torch.nn.functional.max_pool2d(covered, 7, 1)[0, 0].bool()
        assert torch.all(red[inner] > 200) and torch.all(red[~outer] < 55), case
    assert checked > 30


def test_step_schedule_warms_up_then_drops_tenfold_at_each_milestone():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 2.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}])
    scheduler = step_schedule(optimizer, milestones=[6, 9], warmup_iters=4, warmup_ratio=1e-3)
    seen = []
    for _ in range(12):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for i, lrs in enumerate(seen):
        decayed = 0.1 ** ((i >= 6) + (i >= 9))
        warm = 1e-3 + (1 - 1e-3) * i / 4 if i < 4 else 1.0  # linear from 0.001 to 1 over 4 iterations
        assert lrs == pytest.approx([2.0 * decayed * warm, 0.5 * decayed * warm]), i


# ---- runs -------------------------------------------------------------------------------------------


def test_train_det_logs_every_loss_term_and_brings_the_loss_down(scene, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(argv(scene, run, "--iters", "30", "--save-every", "30", "--lr", "2e-3")) == 0
    out = capsys.readouterr().out
    assert "train-det: starting: mask_rcnn_vit_adapter_t, 3 images, 2 classes, batch 2 x 1 process(es), 30 iterations (3x schedule)" in out
    log = read_log(run)
    assert [entry["iteration"] for entry in log] == list(range(1, 31))
    for entry in log:
        assert set(entry) == TERMS | {"iteration", "loss", "lr"}
        assert entry["loss"] == pytest.approx(sum(entry[k] for k in TERMS))
    first, last = np.mean([e["loss"] for e in log[:5]]), np.mean([e["loss"] for e in log[-5:]])
    assert last < 0.6 * first, (first, last)
    assert sorted(p.name for p in run.iterdir()) == ["hub", "last.pth", "log.jsonl", "model.pth"]

    # the final model loads from its folder with nothing else to say, and by name with its class count
    folder = vitadapter.create_model(f"local-dir:{run / 'hub'}", pretrained=True)
    assert folder.class_names == ("green", "red") and isinstance(folder, Detector)
    saved = torch.load(run / "model.pth", weights_only=True)
    assert saved["meta"]["class_names"] == ["green", "red"] and saved["meta"]["category_ids"] == [3, 7]
    model = vitadapter.create_model(MODEL, pretrained=True, num_classes=2, **TINY,
                                    pretrained_cfg_overlay=dict(file=str(run / "model.pth"), num_classes=2))
    for loaded in (model, folder):
        assert all(torch.equal(value, saved["state_dict"][key]) for key, value in loaded.state_dict().items())


def test_resume_after_an_interruption_gives_the_uninterrupted_weights_and_log(scene, tmp_path, monkeypatch, capsys):
    """Six steps straight, against a run that dies in step 5 (after the checkpoint of step 3) and is
    resumed: weights, optimizer state and every logged loss agree bit for bit (augmentation, drop
    path and the RoI samplers' draws included)."""
    settings = ("--iters", "6", "--save-every", "3")
    assert main(argv(scene, tmp_path / "straight", *settings)) == 0

    calls = {"n": 0}
    loss = Detector.loss

    def dies_in_step_five(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "loss", dies_in_step_five)
    assert main(argv(scene, tmp_path / "resumed", *settings)) == 130
    monkeypatch.setattr(Detector, "loss", loss)
    assert torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["iteration"] == 3
    assert main(argv(scene, tmp_path / "resumed", *settings, "--resume")) == 0
    assert "resuming at iteration 3" in capsys.readouterr().out

    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert straight["iteration"] == resumed["iteration"] == 6
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    log = read_log(tmp_path / "resumed")
    assert [e["iteration"] for e in log] == [1, 2, 3, 4, 4, 5, 6]  # the interrupted run had logged step 4
    assert log[:4] + log[5:] == read_log(tmp_path / "straight") and log[4] == log[3]

    # another setting is refused, as is a fresh run into the same folder
    assert main(argv(scene, tmp_path / "resumed", *settings, "--resume", "--seed", "1")) == 2
    one_line_error(capsys, "was trained with other settings: seed 0 -> 1")
    assert main(argv(scene, tmp_path / "resumed", *settings)) == 2
    one_line_error(capsys, "already holds a run")


def test_torchrun_two_cpu_processes(scene, tmp_path):
    """DDP over gloo, one image per process: both train, rank 0 alone writes."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(vitadapter.__file__).parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitadapter",
               *argv(scene, run, "--iters", "2", "--batch-size", "1", "--device", "cpu")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 1 x 2 process(es)" in done.stdout and done.stdout.count("wrote ") == 2  # model.pth and hub, once
    assert sorted(p.name for p in run.iterdir()) == ["hub", "last.pth", "log.jsonl", "model.pth"]
    assert torch.load(run / "last.pth", weights_only=True)["world_size"] == 2
    assert [set(entry) >= TERMS for entry in read_log(run)] == [True, True]


# Holds the lock of a run folder, as a train-det run writing into it does, until it is killed.
LOCK_HOLDER = """
import sys, time
from pathlib import Path
from vitadapter.weights.staging import folder_lock
with folder_lock(Path(sys.argv[1]), "train-det run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_folder_in_use_is_refused(scene, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(vitadapter.__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(argv(scene, run, "--iters", "1")) == 2
        one_line_error(capsys, f"{run} is in use by another train-det run")
        assert list(run.iterdir()) == []
    finally:
        holder.kill()
        holder.wait(timeout=60)


def bad_copy(scene: Path, tmp_path: Path, change) -> Path:
    data = json.loads((scene / "instances.json").read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def test_bad_data_is_named_in_one_line_before_training(scene, tmp_path, capsys):
    run = tmp_path / "run"

    def with_ann(path):
        args = argv(scene, run, "--iters", "1")
        args[args.index("--ann") + 1] = str(path)
        return args

    cases = {
        "missing image": (lambda d: d["images"].append(dict(id=99, file_name="gone.png", height=96, width=128)),
                          ["image 99 is", "gone.png", "does not exist"]),
        "unknown image": (lambda d: d["annotations"].append(dict(d["annotations"][0], id=500, image_id=77)),
                          ["annotations[9] (id 500) is of image_id 77, which no entry of images has"]),
        "unknown category": (lambda d: d["annotations"].append(dict(d["annotations"][0], id=501, category_id=12)),
                             ["annotations[9] (id 501) is of category_id 12, which categories does not list"]),
        "not JSON": (None, ["is not a JSON file"]),
    }
    for name, (change, words) in cases.items():
        path = bad_copy(scene, tmp_path, change) if change else tmp_path / "broken.json"
        if change is None:
            path.write_text("{oops")
        assert main(with_ann(path)) == 2, name
        one_line_error(capsys, str(path), *words)
    assert main(argv(scene, run, "--iters", "1", "--num-classes", "1")) == 2
    one_line_error(capsys, "category 7 'red' is label 1 of 2, not a class of this 1-class model", "--num-classes")
    assert main(argv(scene, run, "--model", "upernet_vit_adapter_t")) == 2
    one_line_error(capsys, "--model upernet_vit_adapter_t is not a detector", "cascade_mask_rcnn_vit_adapter_s")
    assert main(argv(scene, run, "--scales", "96,x")) == 2
    one_line_error(capsys, "--scales 96,x")
    assert not run.exists()


# HTC++ shrunk: a 4-block BEiT trunk 64 wide (the ExtraAttention neck's 32 heads must divide it), heads 32 wide
HTC_TINY = dict(trunk_kwargs=dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, qkv_bias=True, init_values=1e-6,
                                  use_abs_pos_emb=False, use_rel_pos_bias=True, img_size=224),
                conv_inplane=16, deform_num_heads=4, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], window_size=[7, 7, None, 7],
                neck_channels=32, box_fc_channels=64, mask_channels=32, box_conv_channels=32)
HTC_TERMS = {"loss_rpn_cls", "loss_rpn_bbox"} | {f"s{k}.{t}" for k in range(3) for t in ("loss_cls", "loss_bbox", "loss_mask")}


def test_train_det_fine_tunes_htc_with_upstreams_recipe(scene, tmp_path, capsys):
    run = tmp_path / "run"
    args = argv(scene, run, "--iters", "3", "--save-every", "3")
    args[args.index("--model") + 1] = "htc_beit_adapter_l"
    args[args.index("--model-kwargs") + 1] = json.dumps(HTC_TINY)
    args.remove("--lr"), args.remove("1e-3")
    assert main(args) == 0
    out = capsys.readouterr().out
    # upstream's htc++ config: AdamW 1e-4, weight decay 0.05, layer decay 0.9, the 3x schedule
    assert "htc_beit_adapter_l, 3 images, 2 classes" in out and "(3x schedule), lr 0.0001, weight decay 0.05, layer decay 0.9" in out
    log = read_log(run)
    assert [entry["iteration"] for entry in log] == [1, 2, 3]
    # a COCO instances file has no semantic maps: no semantic loss
    assert all(set(entry) == HTC_TERMS | {"iteration", "loss", "lr"} and np.isfinite(entry["loss"]) for entry in log)
    folder = vitadapter.create_model(f"local-dir:{run / 'hub'}", pretrained=True)
    saved = torch.load(run / "model.pth", weights_only=True)
    assert all(torch.equal(value, saved["state_dict"][key]) for key, value in folder.state_dict().items())

"""Data pipeline: synthetic set, COCO loader, transforms, resumable grouped batches."""
from __future__ import annotations

import json
import random
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from dyhead.data import synthetic
from dyhead.data.coco import CocoDetection, collate
from dyhead.data.sampler import GroupedBatchSchedule, ResumableBatchSampler
from dyhead.data.synthetic import make_synthetic_coco
from dyhead.data.transforms import (RandomHorizontalFlip, ResizeShortestSide, batch_images,
                                    build_transforms)
from dyhead.errors import DyheadError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    summary = make_synthetic_coco(root, num_train=40, num_val=12, seed=3, progress=False)
    return root, summary


# ---------------------------------------------------------------- synthetic set

def test_synthetic_is_deterministic(tmp_path):
    kw = dict(num_train=6, num_val=3, image_size=64, progress=False)
    make_synthetic_coco(tmp_path / "a", seed=0, **kw)
    make_synthetic_coco(tmp_path / "b", seed=0, **kw)
    make_synthetic_coco(tmp_path / "c", seed=1, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert "train/000000000001.png" in a and "annotations/instances_val.json" in a and "synth.json" in a
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["train/000000000001.png"] != c["train/000000000001.png"]
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*"))  # no temp dirs left


def test_synthetic_summary_and_format(synth):
    root, summary = synth
    train, val = summary["train"], summary["val"]
    assert train["images"] == 40 and val["images"] == 12
    assert all(train["sizes"][k] > 0 for k in ("small", "medium", "large"))
    assert sum(train["sizes"].values()) == train["boxes"]
    assert val["degenerate"] == 0
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 5, 8, 13]
    assert {im["width"] for im in coco["images"]} == {128}
    ann = coco["annotations"][0]
    assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
    with Image.open(root / "train" / coco["images"][0]["file_name"]) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (128, 128)


def test_synthetic_manifest_skips_and_rebuilds(tmp_path, monkeypatch):
    out = tmp_path / "set"
    kw = dict(num_train=3, num_val=2, image_size=48, progress=False)
    first = make_synthetic_coco(out, **kw)
    before = _files(out)

    def boom(*a, **k):
        raise AssertionError("should not render")
    with monkeypatch.context() as m:
        m.setattr(synthetic, "render_image", boom)
        assert make_synthetic_coco(out, **kw) == first
    assert _files(out) == before
    # other arguments: rebuilt in place
    second = make_synthetic_coco(out, **{**kw, "num_train": 4})
    assert second["train"]["images"] == 4
    assert json.loads((out / "synth.json").read_text())["arguments"]["num_train"] == 4


def test_synthetic_killed_run_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "set"
    real, calls = synthetic.render_image, []

    def dies_midway(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(synthetic, "render_image", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_coco(out, num_train=4, num_val=2, image_size=48, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "mine.txt").write_text("keep me")
    with pytest.raises(DyheadError, match="synth.json"):
        make_synthetic_coco(tmp_path / "set", num_train=2, num_val=1, progress=False)
    with pytest.raises(DyheadError, match="num_classes"):
        make_synthetic_coco(tmp_path / "x", num_train=2, num_val=1, num_classes=99, progress=False)


# ---------------------------------------------------------------- COCO loader

def _tiny_coco(root: Path) -> tuple[Path, Path]:
    """3 images: 1 has a real box, a crowd, a degenerate and a non-finite box; 2 only a crowd;
    3 only a box that is degenerate once clamped. Category ids unsorted and non-contiguous."""
    (root / "img").mkdir(parents=True)
    images = [(1, 40, 30), (2, 30, 40), (3, 40, 30)]
    for i, w, h in images:
        Image.new("RGB", (w, h), (10 * i, 20, 30)).save(root / "img" / f"{i:012d}.png")
    anns = [
        (1, 7, [5, 5, 10, 8], 0), (1, 3, [-4, 20, 14, 20], 0),  # the second is clamped to the image
        (1, 3, [0, 0, 20, 20], 1), (1, 11, [2, 2, 0.5, 9], 0), (1, 11, [2, 2, float("inf"), 9], 0),
        (2, 7, [1, 1, 20, 20], 1), (3, 11, [39.5, 3, 10, 10], 0)]
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.png", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": 1.0, "iscrowd": z}
                        for k, (i, c, b, z) in enumerate(anns)],
        "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in (11, 7, 3)]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return root / "img", ann_file


def test_coco_train_filtering_and_mapping(tmp_path):
    img_dir, ann = _tiny_coco(tmp_path)
    ds = CocoDetection(img_dir, ann, train=True)
    assert ds.category_ids == [3, 7, 11]
    assert [ds.label_to_category(i) for i in range(3)] == [3, 7, 11]
    assert ds.image_ids == [1] and len(ds) == 1  # 2: crowd only, 3: degenerate only
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert torch.allclose(image[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert target["boxes"].tolist() == [[5, 5, 15, 13], [0, 20, 10, 30]]
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (30, 40)
    assert target["scale"] == 1.0 and target["scale_xy"] == (1.0, 1.0)


def test_coco_eval_keeps_all_images(tmp_path):
    img_dir, ann = _tiny_coco(tmp_path)
    ds = CocoDetection(img_dir, ann, train=False)
    assert ds.image_ids == [1, 2, 3]
    assert ds.aspect_ratios() == [40 / 30, 30 / 40, 40 / 30]
    assert [len(ds[i][1]["boxes"]) for i in range(3)] == [2, 0, 0]  # crowd never a target
    assert ds[1][1]["boxes"].shape == (0, 4)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]


@pytest.mark.parametrize("content,match", [
    (None, "not found"), ("{not json", "cannot parse"),
    ('{"images": [], "annotations": []}', "categories"), ("[1, 2]", "JSON object")])
def test_coco_bad_annotation_file(tmp_path, content, match):
    img_dir, _ = _tiny_coco(tmp_path)
    ann = tmp_path / "bad.json"
    if content is not None:
        ann.write_text(content)
    with pytest.raises(DyheadError, match=match) as e:
        CocoDetection(img_dir, ann, train=True)
    assert str(ann) in str(e.value) and "\n" not in str(e.value)


def test_coco_missing_image_dir(tmp_path):
    _, ann = _tiny_coco(tmp_path)
    with pytest.raises(DyheadError, match="nope"):
        CocoDetection(tmp_path / "nope", ann, train=True)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_coco_corrupt_image(tmp_path, damage):
    img_dir, ann = _tiny_coco(tmp_path)
    path = img_dir / "000000000001.png"
    if damage == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.unlink()
    ds = CocoDetection(img_dir, ann, train=True)
    with pytest.raises(DyheadError, match="cannot decode image") as e:
        ds[0]
    assert str(path) in str(e.value)


def test_coco_image_size_mismatch(tmp_path):
    img_dir, ann = _tiny_coco(tmp_path)
    Image.new("RGB", (41, 30)).save(img_dir / "000000000001.png")
    with pytest.raises(DyheadError, match="differs"):
        CocoDetection(img_dir, ann, train=True)[0]


def test_coco_on_synthetic_set(synth):
    root, summary = synth
    train = CocoDetection(root / "train", root / "annotations" / "instances_train.json", train=True)
    val = CocoDetection(root / "val", root / "annotations" / "instances_val.json", train=False)
    assert len(val) == 12 and train.category_ids == [1, 2, 3, 5, 8, 13]
    targets = [train[i][1] for i in range(len(train))]
    # every non-crowd, non-degenerate box, and nothing else, becomes a target
    assert sum(len(t["boxes"]) for t in targets) == summary["train"]["boxes"]
    for t in targets:
        wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
        assert len(wh) > 0 and (wh > 1).all()


def test_coco_augmentation_reproducible_from_key(synth):
    root, _ = synth
    tf = build_transforms(True, (64, 160), 400, flip_prob=0.5)
    ds = CocoDetection(root / "train", root / "annotations" / "instances_train.json", train=True, transforms=tf)
    a, b = ds[(2, 12345)], ds[(2, 12345)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert torch.equal(ds[3][0], ds[(3, 3)][0])
    assert len({ds[(2, s)][0].shape[-1] for s in range(8)}) > 1  # multi-scale actually varies


# ---------------------------------------------------------------- transforms

def _sample(h, w, boxes):
    return torch.rand(3, h, w), {"boxes": torch.tensor(boxes, dtype=torch.float32), "scale": 1.0,
                                  "scale_xy": (1.0, 1.0)}


def test_resize_short_side_and_max_size():
    image, target = _sample(100, 200, [[10, 20, 50, 60]])
    out, t = ResizeShortestSide(50, 1000)(image, target, random.Random(0))
    assert out.shape == (3, 50, 100)
    assert t["boxes"].tolist() == [[5, 10, 25, 30]] and t["scale"] == 0.5 and t["scale_xy"] == (0.5, 0.5)
    out, t = ResizeShortestSide(100, 150)(image, target, random.Random(0))
    assert out.shape == (3, 75, 150)  # the long side caps the scale
    # rounding differs per axis: 333 -> 800 short, 500 -> 1201 long
    out, t = ResizeShortestSide(800, 1333)(*_sample(333, 500, [[0, 0, 500, 333]]), random.Random(0))
    assert out.shape == (3, 800, 1201)
    sx, sy = t["scale_xy"]
    assert sx == 1201 / 500 and sy == 800 / 333 and t["scale"] == pytest.approx((sx + sy) / 2)
    assert t["boxes"][0].tolist() == pytest.approx([0, 0, 1201, 800])


def test_resize_multiscale_reproducible():
    rs = ResizeShortestSide((64, 96), 1000)
    image, target = _sample(50, 60, [[1, 1, 5, 5]])
    sizes = [rs(image, target, random.Random(s))[0].shape[-2] for s in range(30)]
    assert sizes == [rs(image, target, random.Random(s))[0].shape[-2] for s in range(30)]
    assert min(sizes) >= 64 and max(sizes) <= 96 and len(set(sizes)) > 5


def test_flip_boxes():
    image, target = _sample(10, 40, [[1, 2, 11, 8], [30, 0, 40, 10]])
    out, t = RandomHorizontalFlip(1.0)(image, target, random.Random(0))
    assert torch.equal(out, image.flip(-1))
    assert t["boxes"].tolist() == [[29, 2, 39, 8], [0, 0, 10, 10]]
    out, t = RandomHorizontalFlip(0.0)(image, target, random.Random(0))
    assert torch.equal(out, image) and torch.equal(t["boxes"], target["boxes"])


def test_build_transforms_eval_is_fixed_size():
    tf = build_transforms(False, (64, 96), 1000)
    image, target = _sample(50, 60, [[1, 1, 5, 5]])
    assert {tf(image, target, random.Random(s))[0].shape[-2] for s in range(10)} == {96}


def test_batch_images_pads_to_multiple():
    a, b = torch.rand(3, 100, 130), torch.rand(3, 60, 200)
    batch, sizes = batch_images([a, b], 128)
    assert batch.shape == (2, 3, 128, 256) and sizes == [(100, 130), (60, 200)]
    assert torch.equal(batch[0, :, :100, :130], a) and batch[0, :, 100:].abs().sum() == 0
    assert batch[1, :, :, 200:].abs().sum() == 0
    assert batch_images([torch.rand(3, 128, 128)], 128)[0].shape == (1, 3, 128, 128)


# ---------------------------------------------------------------- batching

def _ratios(n=53, seed=0):
    rng = random.Random(seed)
    return [rng.choice([0.75, 1.0, 1.33, 0.5, 2.0]) for _ in range(n)]


def test_schedule_deterministic_grouped_and_complete():
    ratios = _ratios()
    s = GroupedBatchSchedule(ratios, batch_size=4, seed=7)
    assert s.epoch_batches(0) == GroupedBatchSchedule(ratios, batch_size=4, seed=7).epoch_batches(0)
    assert s.epoch_batches(0) != s.epoch_batches(1)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert len(batches) == s.iters_per_epoch
        assert {i for b in batches for i, _ in b} == set(range(len(ratios)))  # every sample seen
        for b in batches:
            assert len(b) == 4 and len({ratios[i] >= 1 for i, _ in b}) == 1  # single group
    seeds = [a for b in s.epoch_batches(0) + s.epoch_batches(1) for _, a in b]
    assert len(set(seeds)) == len(seeds)


def test_schedule_more_groups_and_drop_remainder():
    ratios = _ratios()
    s = GroupedBatchSchedule(ratios, batch_size=4, seed=0, num_groups=3, drop_last_group_remainder=True)
    for b in s.epoch_batches(0):
        assert len({s.groups[i] for i, _ in b}) == 1 and len({i for i, _ in b}) == 4
    assert len(set(s.groups)) == 3
    with pytest.raises(DyheadError, match="world_size"):
        GroupedBatchSchedule(ratios, batch_size=6, seed=0, world_size=4)


def test_schedule_batch_at_resume_and_shards():
    s = GroupedBatchSchedule(_ratios(), batch_size=4, seed=1)
    stream = list(islice(s.iter_from(0), 3 * s.iters_per_epoch + 2))
    assert stream == [s.batch_at(i) for i in range(len(stream))]
    k = s.iters_per_epoch + 3
    fresh = GroupedBatchSchedule(_ratios(), batch_size=4, seed=1)  # a restarted process
    assert list(islice(fresh.iter_from(k), len(stream) - k)) == stream[k:]
    assert list(ResumableBatchSampler(fresh, k, len(stream))) == stream[k:]
    r0 = GroupedBatchSchedule(_ratios(), batch_size=4, seed=1, rank=0, world_size=2)
    r1 = GroupedBatchSchedule(_ratios(), batch_size=4, seed=1, rank=1, world_size=2)
    for it in range(2 * s.iters_per_epoch):
        assert r0.batch_at(it) + r1.batch_at(it) == s.batch_at(it)


def test_dataloader_with_resumable_sampler(synth):
    root, _ = synth
    ds = CocoDetection(root / "train", root / "annotations" / "instances_train.json", train=True,
                       transforms=build_transforms(True, (96, 128), 128))
    sched = GroupedBatchSchedule(ds.aspect_ratios(), batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(sched, 5, 8), collate_fn=collate)
    assert len(loader) == 3
    batches = list(loader)
    images, targets = batches[0]
    assert len(images) == 4
    assert [t["image_id"] for t in targets] == [ds.image_ids[i] for i, _ in sched.batch_at(5)]
    again = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(sched, 5, 6),
                                                  collate_fn=collate)))
    assert all(torch.equal(a, b) for a, b in zip(again[0], images))

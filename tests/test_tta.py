"""Test-time augmentation: views mapped back to the original image, per-scale size ranges, class-wise merge."""
import json
import zipfile

import pytest
import torch
import yaml

from tests.helpers import dyhead
from dyhead.engine.tta import TTAConfig, in_size_range, merge, predict_tta, to_original

H, W = 60, 100
OBJECT = (10.0, 20.0, 40.0, 50.0)  # left of centre, so a missed un-flip lands elsewhere


def scene() -> torch.Tensor:
    image = torch.zeros(3, H, W)
    x1, y1, x2, y2 = (int(v) for v in OBJECT)
    image[:, y1:y2, x1:x2] = 1.0
    return image


class BrightBoxDetector:
    """A hand-built 'detector': the bounding box of the pixels brighter than 0.5, in its input's frame.

    Each view's score encodes the view (short side, flip), so tests can see which one survived.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        outs = []
        for im in images:
            ys, xs = torch.nonzero(im[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            left = box[0, 0] < im.shape[-1] - box[0, 2]
            self.calls.append((tuple(im.shape[-2:]), bool(left)))
            score = min(im.shape[-2:]) / 1000 + (0.0 if left else 0.0001)
            outs.append({"boxes": box, "scores": torch.tensor([score]), "labels": torch.tensor([2])})
        return outs


def config(**kw) -> TTAConfig:
    base = dict(scales=(60, 30, 120), max_size=400, base_size=60, base_max_size=100, flip=True)
    return TTAConfig(**{**base, **kw})


def test_to_original_undoes_scale_and_flip_exactly():
    # the object at 2x is [20, 40, 80, 100] in a 200x120 view; mirrored: x -> 200 - x
    mirrored = torch.tensor([[120.0, 40.0, 180.0, 100.0]])
    assert to_original(mirrored, (2.0, 2.0), True, 200).tolist() == [list(OBJECT)]
    # anisotropic factors (rounding of the resized size) are undone per axis
    box = torch.tensor([[5.0, 10.0, 20.0, 25.0]])
    assert to_original(box, (0.5, 0.5), False, 50).tolist() == [list(OBJECT)]


def test_every_view_maps_back_to_the_object():
    model, cfg = BrightBoxDetector(), config()
    images = [scene()]
    out = predict_tta(model, images, config(nms_thresh=1.0))  # IoU > 1 never: nothing suppressed
    # 3 scales x (plain, mirrored); the mirrored views saw the object on the right
    assert sorted(model.calls) == sorted([((60, 100), True), ((60, 100), False), ((30, 50), True), ((30, 50), False),
                                          ((120, 200), True), ((120, 200), False)])
    boxes = out[0]["boxes"]
    assert boxes.shape == (6, 4)
    torch.testing.assert_close(boxes, torch.tensor([OBJECT] * 6), atol=1.0, rtol=0)
    assert out[0]["labels"].tolist() == [2] * 6

    merged = predict_tta(BrightBoxDetector(), images, cfg)[0]  # NMS at 0.6: one box left, the best view's
    assert merged["boxes"].shape == (1, 4)
    torch.testing.assert_close(merged["boxes"][0], torch.tensor(OBJECT), atol=0.5, rtol=0)
    assert merged["scores"].item() == pytest.approx(0.1201)  # short side 120, mirrored
    assert len(list(cfg.views())) == 6


def test_large_scales_above_the_test_size_get_the_larger_max_size():
    model = BrightBoxDetector()
    predict_tta(model, [scene()], config(scales=(120,), flip=False, max_size=150))
    assert model.calls == [((90, 150), True)]  # long side capped at tta.max_size
    model = BrightBoxDetector()
    predict_tta(model, [scene()], config(scales=(50,), flip=False))
    assert model.calls == [((50, 83), True)]  # below the test size: the profile's max_size (100) allows it


def test_size_ranges_drop_what_a_scale_sees_poorly():
    # sqrt(area) of the object: 30 px at 1x, 15 at 0.5x, 60 at 2x (measured in each view)
    cfg = config(size_ranges=((0, 1e4), (0, 1e4), (0, 40)), nms_thresh=0.6)  # 2x keeps only objects < 40 px
    merged = predict_tta(BrightBoxDetector(), [scene()], cfg)[0]
    assert merged["scores"].item() == pytest.approx(0.0601)  # the best view left is 1x, mirrored
    nothing = predict_tta(BrightBoxDetector(), [scene()], config(size_ranges=((40, 1e4),) * 2 + ((0, 40),)))[0]
    assert nothing["boxes"].shape == (0, 4)
    assert in_size_range(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 50.0, 50.0]]), 9, 11).tolist() == [True,
                                                                                                            False]


def test_merge_is_class_wise_and_keeps_the_best():
    dets = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[0.5, 0.0, 10.5, 10.0], [0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.8, 0.7]),
         "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.3]), "labels": torch.tensor([0])},
    ]
    out = merge(dets, nms_thresh=0.6, keep=100)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.3])  # 0.8 overlaps 0.9 in class 0: suppressed
    assert out["labels"].tolist() == [0, 1, 0]
    assert merge(dets, nms_thresh=0.6, keep=2)["scores"].tolist() == pytest.approx([0.9, 0.7])


def test_size_ranges_must_match_the_scales():
    from dyhead.errors import DyheadError

    with pytest.raises(DyheadError, match="2 ranges for 3 scales"):
        config(size_ranges=((0, 1), (0, 1)))


@pytest.mark.slow
def test_cli_tta_and_testdev_on_tiny(repo_copy):
    """Train the Table 5 experiment on the tiny profile, evaluate with --tta, write a test-dev upload zip."""
    exp = "atss-x101dcn-dyh6-LSC-2x-ms"
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    dyhead("train", exp, "--profile", "tiny", "--dcn-backend", "torchvision", cwd=repo_copy)
    dyhead("evaluate", exp, "--profile", "tiny", "--tta", "--dcn-backend", "torchvision", cwd=repo_copy)
    run = repo_copy / "runs/tiny" / exp
    record = json.loads((run / "metrics_tta.json").read_text())
    assert record["tta"]["scales"] == [64, 48, 96] and set(record["metrics"]) >= {"AP", "APs"}
    assert json.loads((run / "train.json").read_text())["config"]["profile_settings"]["input"]["min_size_train"] == [52, 64]

    # two ranks (gloo) share the batches; rank 0's merge equals the single process's predictions
    single = (run / "predictions_tta.json").read_text()
    (run / "predictions_tta.json").unlink()
    dyhead("evaluate", exp, "--profile", "tiny", "--tta", "--dcn-backend", "torchvision", cwd=repo_copy, nproc=2)
    assert (run / "predictions_tta.json").read_text() == single

    # test-dev: an image_info file (images + categories, no annotations), as the COCO site ships it
    prof_path = repo_copy / "params/profiles/tiny.yaml"
    prof = yaml.safe_load(prof_path.read_text())
    val = json.loads((repo_copy / prof["data"]["val_annotations"]).read_text())
    info = repo_copy / "data/synthetic-tiny/annotations/image_info_test-dev.json"
    info.write_text(json.dumps({"images": val["images"], "categories": val["categories"]}))
    prof["data"].update(test_images=prof["data"]["val_images"], test_annotations=str(info.relative_to(repo_copy)))
    prof_path.write_text(yaml.safe_dump(prof))
    dyhead("evaluate", exp, "--profile", "tiny", "--split", "test-dev", "--dcn-backend", "torchvision", cwd=repo_copy)
    name = f"detections_test-dev2017_{exp}_results"
    with zipfile.ZipFile(run / f"{name}.zip") as zf:
        assert zf.namelist() == [f"{name}.json"]
        results = json.loads(zf.read(f"{name}.json"))
    assert {r["image_id"] for r in results} <= {im["id"] for im in val["images"]}
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)

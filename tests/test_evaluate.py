"""COCO evaluation glue: ground truth given as predictions scores AP 100; mapping back to pixels."""
import json

import pytest
import torch
from pycocotools.coco import COCO

from dyhead.engine.evaluate import coco_metrics
from dyhead.engine.inference import to_coco_results


@pytest.fixture
def coco_gt(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 150} for i in (1, 2, 3)]
    boxes = [(1, 3, [10, 10, 20, 30]), (1, 7, [50, 40, 100, 90]), (2, 3, [5, 5, 8, 8]), (3, 7, [0, 0, 150, 120]),
             (3, 3, [60, 20, 40, 40])]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    coco = COCO(str(path))
    return coco


def test_ground_truth_as_predictions_gives_ap_100(coco_gt):
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco_gt.dataset["annotations"]]
    metrics = coco_metrics(coco_gt, results)
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)


def test_wrong_class_scores_zero_and_empty_is_zero(coco_gt):
    results = [{"image_id": a["image_id"], "category_id": 10 - a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco_gt.dataset["annotations"]]
    assert coco_metrics(coco_gt, results)["AP"] == 0.0
    assert coco_metrics(coco_gt, []) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_results_mapped_back_to_original_pixels():
    out = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    target = {"image_id": 5, "scale_xy": (2.0, 0.5)}
    (res,) = to_coco_results(out, target, lambda lab: [3, 7][lab])
    assert res == {"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 80.0], "score": 0.9}

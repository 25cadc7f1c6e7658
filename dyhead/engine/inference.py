"""Inference shared by evaluation, TTA, test-dev, the training's AP curve and the figures: load a trained model,
predict, COCO results, COCOeval scores.

    model = load_trained(run, dataset.category_ids, rt.device, rt.backend, annotations)
    results = predict_sharded(model, dataset, batch_size, rt.ctx, rt.log, tag)   # COCO result entries

`forward` lets a caller replace the plain `model(images)` (TTA passes its multi-view prediction);
everything else, batching, sharding over ranks and the mapping back to original pixels, is one path.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Callable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dyhead.config import RunConfig
from dyhead.data.coco import collate
from dyhead.data.synthetic import area_ranges
from dyhead.engine import distributed
from dyhead.engine.runtime import to_device
from dyhead.errors import DyheadError
from dyhead.files import load_torch
from dyhead.modeling.build import build_detector

FINAL = "model_final.pth"


def final_weights(run: RunConfig) -> Path:
    return run.run_dir / FINAL


def load_final(run: RunConfig) -> dict:
    """The experiment's model_final.pth, loaded safely; a clear line when it is missing."""
    path = final_weights(run)
    if not path.exists():
        raise DyheadError(f"{path}: not found; train it first (`dyhead train {run.experiment} "
                          f"--profile {run.profile_name}`)")
    return load_torch(path, "model")


def load_trained(run: RunConfig, category_ids: list[int], device, backend: str, annotations: str):
    """The experiment's final weights in an eval-mode model, checked against the data's categories."""
    ckpt = load_final(run)
    if ckpt.get("category_ids") != category_ids:
        raise DyheadError(f"{final_weights(run)}: trained on categories {ckpt.get('category_ids')}, {annotations} has "
                          f"{category_ids}")
    model = build_detector(run, len(category_ids), backend, load_weights=False).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def to_coco_results(output: dict, target: dict, label_to_category) -> list[dict]:
    """One image's detections, mapped back to original-image pixels, as COCO result entries."""
    boxes = output["boxes"].detach().cpu().double()
    sx, sy = target.get("scale_xy", (target.get("scale", 1.0),) * 2)
    boxes[:, 0::2] /= sx
    boxes[:, 1::2] /= sy
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    return [
        {"image_id": int(target["image_id"]), "category_id": int(label_to_category(lab)),
         "bbox": [round(v, 3) for v in box], "score": round(float(s), 5)}
        for box, s, lab in zip(xywh, scores, labels)
    ]


@torch.no_grad()
def predict(model, dataset, batches: list[list[int]], device, log=print, tag: str = "",
            forward: Callable | None = None) -> list[dict]:
    """COCO result entries for `batches` (index lists) of `dataset`, in order; `forward(images)` defaults
    to `model(images)`."""
    model.eval()
    forward = forward or model
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    results, t0, n = [], time.perf_counter(), len(loader)
    for i, (images, targets) in enumerate(loader, 1):
        images, _ = to_device(images, [], device)
        for out, tgt in zip(forward(images), targets):
            results.extend(to_coco_results(out, tgt, dataset.label_to_category))
        if i % 20 == 0 or i == n:
            log(f"[{tag}] predict {i}/{n} batches, {(time.perf_counter() - t0) / i:.2f}s/batch")
    return results


def predict_sharded(model, dataset, batch_size: int, ctx, log, tag: str,
                    forward: Callable | None = None, limit: int | None = None) -> list[dict] | None:
    """Under torchrun each rank takes every world_size-th batch and rank 0 gathers (None elsewhere);
    a single process predicts every batch. `limit`: the first `limit` images only."""
    num = len(dataset) if limit is None else min(limit, len(dataset))
    batches = distributed.shard_batches(num, batch_size, ctx)
    results = predict(model, dataset, batches, ctx.device, log, tag, forward)
    ids = dataset.image_ids[:num]
    return distributed.gather_predictions(results, [ids[i] for b in batches for i in b], ids, ctx)


METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_eval(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None,
              area_ranges: dict | None = None) -> COCOeval:
    """pycocotools' bbox COCOeval, evaluated, accumulated and summarised (its prints silenced).

    `area_ranges` ({small, medium, large} -> [lo, hi] px^2) replaces COCO's 32^2 / 96^2 limits, which
    suit ~640 px images; the synthetic set scales them to its image size.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        if area_ranges is not None:
            ev.params.areaRng = [[0.0, 1e10]] + [list(area_ranges[k]) for k in ("small", "medium", "large")]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_metrics(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None,
                 area_ranges: dict | None = None) -> dict:
    """COCOeval bbox summary in percent; AP is 0 when there are no detections at all."""
    if not results:
        return {k: 0.0 for k in METRICS}
    ev = coco_eval(coco_gt, results, image_ids, area_ranges)
    # stats: AP, AP50, AP75, APs, APm, APl, then recalls; -1 means "no such objects".
    return {k: round(100.0 * float(v), 2) if v >= 0 else None for k, v in zip(METRICS, ev.stats[:6])}


def per_class_ap(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None,
                 area_ranges: dict | None = None) -> list[dict]:
    """Per category: AP (IoU .50:.95) and AP50 in percent from COCOeval's precision array
    [IoU, recall, category, area, max detections] at all areas and 100 detections; None where the
    category has no ground truth; and the number of non-crowd instances."""
    ids = sorted(coco_gt.getCatIds())
    ev = coco_eval(coco_gt, results, image_ids, area_ranges) if results else None
    rows = []
    for cat in ids:
        ann_ids = coco_gt.getAnnIds(imgIds=image_ids or [], catIds=[cat], iscrowd=False)
        row = {"category_id": cat, "instances": len(ann_ids), "AP": None, "AP50": None}
        if ev is None:
            row.update(AP=0.0 if ann_ids else None, AP50=0.0 if ann_ids else None)
        else:
            prec = ev.eval["precision"][:, :, ev.params.catIds.index(cat), 0, -1]
            for key, values in (("AP", prec), ("AP50", prec[0])):
                valid = values[values > -1]
                row[key] = round(100.0 * float(valid.mean()), 2) if valid.size else None
        rows.append(row)
    return rows


def profile_area_ranges(run: RunConfig) -> dict | None:
    """The synthetic set's object-size limits, scaled to its image size; None (COCO's own) for real data."""
    data = run.profile["data"]
    return area_ranges(data["synthetic"]["image_size"]) if data["source"] == "synthetic" else None

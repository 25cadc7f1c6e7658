"""Inference on the validation set, COCO-format predictions, and pycocotools' COCOeval metrics."""
from __future__ import annotations

import contextlib
import io
import time

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dyhead.config import RunConfig
from dyhead.data.coco import collate
from dyhead.data.synthetic import area_ranges
from dyhead.engine import distributed
from dyhead.engine.checkpoint import load_checkpoint, save_json
from dyhead.engine.tracking import log_run_outputs
from dyhead.engine.train import to_device, make_dataset, settings_digest, setup_runtime
from dyhead.errors import DyheadError
from dyhead.modeling.build import build_detector

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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


def coco_metrics(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None,
                 area_ranges: dict | None = None) -> dict:
    """COCOeval bbox summary in percent; AP is 0 when there are no detections at all.

    `area_ranges` ({small, medium, large} -> [lo, hi] px^2) replaces COCO's 32^2 / 96^2 limits, which
    suit ~640 px images; the synthetic set scales them to its image size.
    """
    if not results:
        return {k: 0.0 for k in METRICS}
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
    # stats: AP, AP50, AP75, APs, APm, APl, then recalls; -1 means "no such objects".
    return {k: round(100.0 * float(v), 2) if v >= 0 else None for k, v in zip(METRICS, ev.stats[:6])}


@torch.no_grad()
def predict(model, dataset, batch_size: int, device, log=print, tag: str = "",
            batches: list[list[int]] | None = None) -> list[dict]:
    """Detections for the whole dataset in order, or for `batches` (index lists: a rank's shard)."""
    model.eval()
    if batches is None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    results, t0, n = [], time.perf_counter(), len(loader)
    for i, (images, targets) in enumerate(loader, 1):
        images, _ = to_device(images, [], device)
        for out, tgt in zip(model(images), targets):
            results.extend(to_coco_results(out, tgt, dataset.label_to_category))
        if i % 20 == 0 or i == n:
            log(f"[{tag}] eval {i}/{n} batches, {(time.perf_counter() - t0) / i:.2f}s/batch")
    return results


def evaluate(run: RunConfig, *, threads: int | None = None, backend: str | None = None, log=print) -> dict:
    out = run.run_dir
    weights = out / "model_final.pth"
    ckpt = load_checkpoint(weights)
    device, backend = setup_runtime(run, threads, backend)
    ctx = distributed.init(device)  # under torchrun: each rank predicts a shard, rank 0 scores
    device, log = ctx.device, (log if ctx.is_main else lambda *args, **kwargs: None)
    dataset = make_dataset(run, train=False)
    if ckpt.get("category_ids") != dataset.category_ids:
        raise DyheadError(f"{weights}: trained on categories {ckpt.get('category_ids')}, "
                          f"{run.profile['data']['val_annotations']} has {dataset.category_ids}")
    model = build_detector(run, len(dataset.category_ids), backend, load_weights=False).to(device)
    model.load_state_dict(ckpt["model"])
    t0 = time.perf_counter()
    batches = distributed.shard_batches(len(dataset), run.profile["eval"]["batch_size"], ctx)
    results = predict(model, dataset, run.profile["eval"]["batch_size"], device, log, run.experiment, batches)
    results = distributed.gather_predictions(results, [dataset.image_ids[i] for b in batches for i in b],
                                             dataset.image_ids, ctx)
    if not ctx.is_main:  # rank 0 has every image's detections now
        return {}
    seconds = time.perf_counter() - t0
    save_json(out / "predictions.json", results)
    synth = run.profile["data"].get("synthetic") if run.profile["data"]["source"] == "synthetic" else None
    ranges = area_ranges(synth["image_size"]) if synth else None
    metrics = coco_metrics(dataset.coco, results, dataset.image_ids, ranges)
    record = {"experiment": run.experiment, "profile": run.profile_name, "split": "val", "area_ranges": ranges,
              "annotations": run.profile["data"]["val_annotations"], "images": len(dataset),
              "detections": len(results), "eval_seconds": round(seconds, 1), "dcn_backend": backend,
              "world_size": ctx.world_size, "metrics": metrics}
    save_json(out / "metrics.json", record)
    log_run_outputs(run, "evaluate", settings_digest(run), [out / "metrics.json"], metrics, run.max_iter)
    log(f"[{run.experiment}] " + " ".join(f"{k} {v}" for k, v in metrics.items()))
    return record


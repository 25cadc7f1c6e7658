"""`dyhead evaluate`: predictions on the validation set and pycocotools' COCOeval metrics, plain or with TTA.

    evaluate(run)            -> predictions.json, metrics.json
    evaluate(run, tta=True)  -> predictions_tta.json, metrics_tta.json (the profile's `tta` views)
"""
from __future__ import annotations

import time
from dataclasses import asdict

from dyhead.config import RunConfig
from dyhead.engine import runtime
from dyhead.engine.inference import METRICS, coco_metrics, load_trained, predict_sharded, profile_area_ranges  # noqa: F401
from dyhead.engine.tracking import log_run_outputs
from dyhead.engine.tta import predict_tta, tta_config
from dyhead.files import save_json


def evaluate(run: RunConfig, *, tta: bool = False, threads: int | None = None, backend: str | None = None,
             log=print) -> dict:
    """Predict the validation split with the trained model and score it; writes beside the weights."""
    cfg = tta_config(run.profile, run.profile_name) if tta else None
    rt = runtime.start(run, threads, backend, log)  # under torchrun: each rank predicts a shard, rank 0 scores
    dataset = runtime.make_dataset(run, train=False, transforms=not tta)  # TTA resizes the originals itself
    annotations = run.profile["data"]["val_annotations"]
    model = load_trained(run, dataset.category_ids, rt.device, rt.backend, annotations)
    batch = run.profile["eval"]["batch_size"]
    forward = None
    if cfg is not None:
        rt.log(f"[{run.experiment}] tta: {len(list(cfg.views()))} views per image (scales {list(cfg.scales)}, "
               f"flip {cfg.flip}, size ranges {'on' if cfg.size_ranges else 'off'})")
        batch = cfg.batch_size or batch
        forward = lambda images: predict_tta(model, images, cfg)  # noqa: E731
    t0 = time.perf_counter()
    with rt.autocast():
        results = predict_sharded(model, dataset, batch, rt.ctx, rt.log, run.experiment, forward)
    if not rt.ctx.is_main:  # rank 0 has every image's detections now
        return {}
    seconds = time.perf_counter() - t0
    suffix = "_tta" if tta else ""
    out = run.run_dir
    save_json(out / f"predictions{suffix}.json", results, compact=True)
    ranges = profile_area_ranges(run)
    metrics = coco_metrics(dataset.coco, results, dataset.image_ids, ranges)
    record = {"experiment": run.experiment, "profile": run.profile_name, "split": "val", "area_ranges": ranges,
              "annotations": annotations, "images": len(dataset), "detections": len(results),
              "eval_seconds": round(seconds, 1), "dcn_backend": rt.backend, "precision": rt.precision,
              "world_size": rt.ctx.world_size,
              "metrics": metrics}
    if cfg is not None:
        record["tta"] = asdict(cfg)
    save_json(out / f"metrics{suffix}.json", record)
    logged = {f"tta_{k}" if tta else k: v for k, v in metrics.items()}
    log_run_outputs(run, f"evaluate{suffix}", [out / f"metrics{suffix}.json"], logged, run.max_iter)
    rt.log(f"[{run.experiment}] {'tta ' if tta else ''}" + " ".join(f"{k} {v}" for k, v in metrics.items()))
    return record

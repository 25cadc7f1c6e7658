"""test-dev2017: predictions in the COCO evaluation server's upload format.

Tables 4-5 of the paper are on test-dev, whose labels are not public: the server scores a zip
holding one `detections_test-dev2017_<alg>_results.json` (a list of {image_id, category_id,
bbox [x, y, w, h], score}). The images are test2017/ listed by image_info_test-dev2017.json
(20,288 of the 40,670), which carries the 80 categories but no annotations.
"""
from __future__ import annotations

import json
import random
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dyhead.config import RunConfig
from dyhead.data.transforms import build_transforms
from dyhead.engine import runtime
from dyhead.engine.inference import load_trained, predict_sharded
from dyhead.engine.tta import predict_tta, tta_config
from dyhead.errors import DyheadError
from dyhead.files import atomic_write


class ImageInfoDataset(torch.utils.data.Dataset):
    """Images listed by an image_info file; targets carry only what the evaluator maps back with."""

    def __init__(self, image_dir, info_file, transforms=None):
        self.image_dir, self.info_file, self.transforms = Path(image_dir), Path(info_file), transforms
        try:
            info = json.loads(self.info_file.read_text())
            self.category_ids = sorted(int(c["id"]) for c in info["categories"])
            self.images = sorted((int(im["id"]), str(im["file_name"]), int(im["width"]), int(im["height"]))
                                 for im in info["images"])
        except FileNotFoundError:
            raise DyheadError(f"image info file not found: {info_file} (`dyhead fetch-coco` extracts it)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DyheadError(f"{info_file}: not a COCO image_info file ({exc!r})") from None
        if not self.image_dir.is_dir():
            raise DyheadError(f"image directory not found: {self.image_dir}")
        self.image_ids = [im[0] for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def label_to_category(self, label: int) -> int:
        return self.category_ids[int(label)]

    def __getitem__(self, index: int):
        image_id, name, width, height = self.images[index]
        path = self.image_dir / name
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DyheadError(f"cannot decode image {path}: {exc}") from None
        if arr.shape[:2] != (height, width):
            raise DyheadError(f"image {path}: decoded size {arr.shape[1]}x{arr.shape[0]} differs from "
                              f"{width}x{height} in {self.info_file}")
        image = torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(255.0)
        target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
                  "image_id": image_id, "orig_size": (height, width), "scale": 1.0, "scale_xy": (1.0, 1.0)}
        if self.transforms is not None:
            image, target = self.transforms(image, target, random.Random(index))
        return image, target


def results_name(experiment: str, tta: bool) -> str:
    """The server's file name, detections_test-dev2017_<alg>_results; <alg> is the experiment id (+ "-tta")."""
    alg = experiment + ("-tta" if tta else "")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", alg):
        raise DyheadError(f"experiment id {experiment!r}: not usable in the COCO server's file name")
    return f"detections_test-dev2017_{alg}_results"


def write_results_zip(results: list[dict], path: Path, member: str) -> None:
    """The zip the server takes, written under a temporary name and renamed."""
    def write(fh):
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, json.dumps(results))
    atomic_write(path, write)


def predict_testdev(run: RunConfig, *, tta: bool = False, threads: int | None = None, backend: str | None = None,
                    log=print) -> Path:
    data, inp = run.profile["data"], run.profile["input"]
    if not data.get("test_annotations") or not data.get("test_images"):
        raise DyheadError(f"params/profiles/{run.profile_name}.yaml: data.test_images/test_annotations not set "
                          "(test-dev exists for the coco profile only)")
    rt = runtime.start(run, threads, backend, log)  # under torchrun: each rank predicts a shard, rank 0 writes
    transforms = None if tta else build_transforms(False, inp["min_size_test"], inp["max_size"])
    dataset = ImageInfoDataset(data["test_images"], data["test_annotations"], transforms)
    model = load_trained(run, dataset.category_ids, rt.device, rt.backend, data["test_annotations"])
    cfg = tta_config(run.profile, run.profile_name) if tta else None
    forward = (lambda images: predict_tta(model, images, cfg)) if cfg is not None else None
    t0 = time.perf_counter()
    batch = (cfg and cfg.batch_size) or run.profile["eval"]["batch_size"]
    with rt.autocast():
        results = predict_sharded(model, dataset, batch, rt.ctx, rt.log, run.experiment, forward)
    name = results_name(run.experiment, tta)
    out = run.run_dir / f"{name}.zip"
    if not rt.ctx.is_main:
        return out
    write_results_zip(results, out, f"{name}.json")
    rt.log(f"[{run.experiment}] {len(results)} detections on {len(dataset)} test-dev images in "
           f"{time.perf_counter() - t0:.0f}s -> {out} (upload it to the COCO detection server)")
    return out

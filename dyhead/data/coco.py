"""COCO-format detection dataset (COCO 2017 layout or the synthetic set, unchanged).

Targets are built once at construction from the annotation file, so `__getitem__` only decodes the
image and runs the transforms. Category ids map to contiguous labels 0..K-1 in sorted id order.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from dyhead.errors import DyheadError, warn


def load_annotations(ann_file: Path) -> dict:
    """A COCO annotation file as a dict; a missing or unreadable file is one error line naming it."""
    if not ann_file.is_file():
        raise DyheadError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DyheadError(f"cannot parse annotation file {ann_file}: {e}") from None
    if not isinstance(data, dict):
        raise DyheadError(f"{ann_file}: expected a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DyheadError(f"{ann_file}: missing or non-list key '{key}'")
    return data


class CocoDetection(torch.utils.data.Dataset):
    def __init__(self, image_dir, ann_file, *, train: bool, transforms=None):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.train = train
        self.transforms = transforms
        data = load_annotations(self.ann_file)
        if not self.image_dir.is_dir():
            raise DyheadError(f"image directory not found: {self.image_dir}")
        try:
            self.category_ids = sorted(int(c["id"]) for c in data["categories"])
            images = {int(im["id"]): (str(im["file_name"]), int(im["width"]), int(im["height"]))
                      for im in data["images"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DyheadError(f"{self.ann_file}: malformed images/categories entry ({e!r})") from None
        if not self.category_ids:
            raise DyheadError(f"{self.ann_file}: no categories")
        self._cat_to_label = {c: i for i, c in enumerate(self.category_ids)}

        boxes: dict[int, list] = {i: [] for i in images}
        labels: dict[int, list] = {i: [] for i in images}
        dropped = 0
        for ann in data["annotations"]:
            aid = ann.get("id") if isinstance(ann, dict) else None
            try:
                image_id, cat = int(ann["image_id"]), int(ann["category_id"])
                x, y, w, h = (float(v) for v in ann["bbox"])
                crowd = bool(ann.get("iscrowd", 0))
            except (KeyError, TypeError, ValueError) as e:
                raise DyheadError(f"{self.ann_file}: malformed annotation id={aid!r} ({e!r})") from None
            if image_id not in images:
                raise DyheadError(f"{self.ann_file}: annotation id={aid!r} has unknown image_id {image_id}")
            if cat not in self._cat_to_label:
                raise DyheadError(f"{self.ann_file}: annotation id={aid!r} has unknown category_id {cat}")
            if crowd:  # crowd regions are ignored as targets (COCOeval treats them as ignore regions)
                continue
            _, width, height = images[image_id]
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, float(width)), min(y + h, float(height))
            # degenerate (non-finite, or <= 1 px wide/high inside the image): would poison the losses
            if not all(map(math.isfinite, (x, y, w, h))) or x2 - x1 <= 1 or y2 - y1 <= 1:
                dropped += 1
                continue
            boxes[image_id].append((x1, y1, x2, y2))
            labels[image_id].append(self._cat_to_label[cat])
        if dropped:
            warn(f"{self.ann_file}: {dropped} of {len(data['annotations'])} boxes ignored (negative, non-finite, "
                 "1 px or less, or outside the image)")

        # validated above, so pycocotools (kept for COCOeval) cannot trip over the file
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()

        ids = sorted(images)
        if train:  # an image with nothing to learn from costs a forward pass and gives no gradient
            ids = [i for i in ids if boxes[i]]
        self.image_ids: list[int] = ids
        self._images = {i: images[i] for i in ids}
        self._targets = {i: (np.asarray(boxes[i], np.float32).reshape(-1, 4), np.asarray(labels[i], np.int64))
                         for i in ids}

    def __len__(self) -> int:
        return len(self.image_ids)

    def label_to_category(self, label: int) -> int:
        return self.category_ids[int(label)]

    def aspect_ratios(self) -> list[float]:
        return [self._images[i][1] / self._images[i][2] for i in self.image_ids]

    def _decode(self, path: Path, width: int, height: int) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DyheadError(f"cannot decode image {path}: {e}") from None
        if arr.shape[:2] != (height, width):
            raise DyheadError(f"image {path}: decoded size {arr.shape[1]}x{arr.shape[0]} differs from "
                              f"{width}x{height} in {self.ann_file}")
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(255.0)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        index = int(index)
        if not 0 <= index < len(self.image_ids):
            raise IndexError(f"index {index} out of range for {len(self.image_ids)} images")
        image_id = self.image_ids[index]
        file_name, width, height = self._images[image_id]
        image = self._decode(self.image_dir / file_name, width, height)
        boxes, labels = self._targets[image_id]
        target = {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy()),
                  "image_id": image_id, "orig_size": (height, width), "scale": 1.0, "scale_xy": (1.0, 1.0)}
        if self.transforms is not None:
            image, target = self.transforms(image, target, random.Random(int(seed)))
        return image, target


def collate(batch):
    """Images differ in size: keep lists; the detector pads them itself."""
    images, targets = zip(*batch)
    return list(images), list(targets)

"""Test-time augmentation views: several input scales, each also mirrored, merged by class-wise NMS.

Follows the ATSS official multi-scale test (atss_core/engine/bbox_aug_vote.py), the one the
paper's Table 5 compares with: every scale runs on the image and on its mirror; scales up to the
test size keep the profile's long-side limit, larger ones get `tta.max_size`; optional per-scale
size ranges keep from each scale only the boxes whose sqrt(area), measured in that resized
image, lies in (lo, hi), so large scales contribute small objects and small scales large ones.
Boxes are mapped back to the original image before merging. The official code merges with soft
bounding-box voting; here it is plain class-wise NMS at the detector's test threshold.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from dyhead.data.transforms import ResizeShortestSide
from dyhead.errors import DyheadError
from dyhead.modeling.detectors.common import nms_per_image


@dataclass(frozen=True)
class TTAConfig:
    scales: tuple[int, ...]  # short side of each view
    max_size: int  # long-side limit of the views larger than the test size
    base_size: int  # the profile's test size: views up to it keep `base_max_size`
    base_max_size: int
    flip: bool = True
    size_ranges: tuple[tuple[float, float], ...] | None = None  # per scale, sqrt(area) in the resized image
    nms_thresh: float = 0.6  # ATSS test NMS
    detections_per_img: int = 100
    batch_size: int | None = None  # images per forward pass; None: the profile's eval.batch_size

    def __post_init__(self):
        if self.size_ranges is not None and len(self.size_ranges) != len(self.scales):
            raise DyheadError(f"tta.size_ranges: {len(self.size_ranges)} ranges for {len(self.scales)} scales")

    def max_size_for(self, scale: int) -> int:
        return self.base_max_size if scale <= self.base_size else self.max_size

    def views(self):
        """(scale, flipped, size range or None) for every forward pass."""
        for i, scale in enumerate(self.scales):
            rng = self.size_ranges[i] if self.size_ranges is not None else None
            for flipped in ((False, True) if self.flip else (False,)):
                yield scale, flipped, rng


def tta_config(profile: dict, profile_name: str = "") -> TTAConfig:
    if "tta" not in profile:
        raise DyheadError(f"params/profiles/{profile_name}.yaml: no `tta` section (needed by --tta)")
    t, inp = profile["tta"], profile["input"]
    ranges = t.get("size_ranges")
    return TTAConfig(
        scales=tuple(t["scales"]), max_size=t["max_size"], base_size=inp["min_size_test"],
        base_max_size=inp["max_size"], flip=t.get("flip", True),
        size_ranges=tuple(tuple(r) for r in ranges) if ranges else None,
        nms_thresh=t.get("nms_thresh", 0.6), detections_per_img=t.get("detections_per_img", 100),
        batch_size=t.get("batch_size"),
    )


def resize(image: Tensor, scale: int, max_size: int) -> tuple[Tensor, tuple[float, float]]:
    """The evaluation resize (same rounding), returning the per-axis factors."""
    target = {"boxes": torch.zeros((0, 4))}
    out, target = ResizeShortestSide(scale, max_size)(image, target, random.Random(0))
    return out, target["scale_xy"]


def to_original(boxes: Tensor, scale_xy: tuple[float, float], flipped: bool, width: int) -> Tensor:
    """Boxes predicted on a resized (and maybe mirrored, `width` px wide) view -> original pixels."""
    if flipped:
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    sx, sy = scale_xy
    return boxes / boxes.new_tensor([sx, sy, sx, sy])


def in_size_range(boxes: Tensor, lo: float, hi: float) -> Tensor:
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return (area > lo * lo) & (area < hi * hi)


def merge(detections: list[dict], nms_thresh: float, keep: int) -> dict:
    """One image's detections from all views (original pixels) -> class-wise NMS, best `keep`."""
    return nms_per_image([d["boxes"] for d in detections], [d["scores"] for d in detections],
                         [d["labels"] for d in detections], nms_thresh, keep)


@torch.no_grad()
def predict_tta(model, images: list[Tensor], cfg: TTAConfig) -> list[dict]:
    """Detections of `model` on original images (float 0..1, [3, H, W]) under every view, merged."""
    per_image: list[list[dict]] = [[] for _ in images]
    for scale, flipped, rng in cfg.views():
        views, factors = zip(*(resize(im, scale, cfg.max_size_for(scale)) for im in images))
        views = [v.flip(-1) for v in views] if flipped else list(views)
        for i, (out, view, sxy) in enumerate(zip(model(views), views, factors)):
            boxes = out["boxes"]
            keep = in_size_range(boxes, *rng) if rng is not None else slice(None)
            per_image[i].append({
                "boxes": to_original(boxes[keep], sxy, flipped, view.shape[-1]),
                "scores": out["scores"][keep], "labels": out["labels"][keep],
            })
    return [merge(dets, cfg.nms_thresh, cfg.detections_per_img) for dets in per_image]

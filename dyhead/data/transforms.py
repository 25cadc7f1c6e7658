"""Detection transforms on (image [3, H, W] float 0..1, target) pairs.

Randomness comes only from the `random.Random` passed in, which the dataset seeds from the sample
key: an augmentation is a pure function of (index, seed), whichever worker process runs it.
`target["scale_xy"]` accumulates the per-axis resize factors so the evaluator can map boxes back.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from dyhead.errors import DyheadError


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict, rng: random.Random):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class ResizeShortestSide:
    """Short side to `min_size` (or a size drawn from [lo, hi]) with the long side <= `max_size`."""

    def __init__(self, min_size: int | tuple[int, int], max_size: int):
        if isinstance(min_size, (list, tuple)):
            if len(min_size) != 2 or not 0 < min_size[0] <= min_size[1]:
                raise DyheadError(f"min_size: expected an int or (lo, hi) with 0 < lo <= hi, got {min_size!r}")
            min_size = (int(min_size[0]), int(min_size[1]))
        elif not int(min_size) > 0:
            raise DyheadError(f"min_size: must be positive, got {min_size!r}")
        if not int(max_size) > 0:
            raise DyheadError(f"max_size: must be positive, got {max_size!r}")
        self.min_size = min_size
        self.max_size = int(max_size)

    def __call__(self, image: Tensor, target: dict, rng: random.Random):
        if isinstance(self.min_size, tuple):
            size = rng.randint(*self.min_size)  # inclusive, multi-scale training
        else:
            size = int(self.min_size)
        h, w = image.shape[-2:]
        scale = min(size / min(h, w), self.max_size / max(h, w))
        # round (not floor) so 800/480*480 gives 800, not 799 from float error
        new_h, new_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        if (new_h, new_w) != (h, w):
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                                  align_corners=False, antialias=False)[0]
        sx, sy = new_w / w, new_h / h
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        px, py = target.get("scale_xy", (1.0, 1.0))
        target["scale_xy"] = (px * sx, py * sy)
        target["scale"] = (px * sx + py * sy) / 2
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Tensor, target: dict, rng: random.Random):
        # always draw, so later transforms see the same rng state whatever the outcome
        if rng.random() < self.p:
            w = image.shape[-1]
            image = image.flip(-1)
            target = dict(target)
            boxes = target["boxes"]
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return image, target


def batch_images(images: list[Tensor], size_divisible: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Zero-pad at the bottom/right to a common size that is a multiple of `size_divisible`."""
    if not images:
        raise DyheadError("batch_images: empty list of images")
    if size_divisible < 1:
        raise DyheadError(f"size_divisible: must be >= 1, got {size_divisible}")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    d = size_divisible
    h = -(-max(s[0] for s in sizes) // d) * d
    w = -(-max(s[1] for s in sizes) // d) * d
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for out, im in zip(batch, images):
        out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


def build_transforms(train: bool, min_size, max_size: int, flip_prob: float = 0.5) -> Compose:
    """Train: (multi-scale) resize + flip. Eval: one fixed size (the top of a training range)."""
    if train:
        return Compose([ResizeShortestSide(min_size, max_size), RandomHorizontalFlip(flip_prob)])
    if isinstance(min_size, (list, tuple)):
        min_size = max(min_size)
    return Compose([ResizeShortestSide(min_size, max_size)])

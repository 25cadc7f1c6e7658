"""What every detector shares: the input contract and the split that the FLOP counter relies on.

A detector takes images already resized by the data pipeline (float 0..1, [3, H, W]) and targets
with `boxes` (xyxy, pixels of that image) and contiguous `labels`. It normalises and pads them
itself, and returns a loss dict in training or, in eval, one dict per image with `boxes`,
`scores`, `labels` in the same pixel frame (the evaluator maps them back to the original image).

    forward(images, targets) = postprocess | losses ( network(preprocess(images)) )

`network` is the pure tensor part (backbone, neck, head): FLOPs are counted on it alone.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import batched_nms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def batch_images(images: list[Tensor], size_divisible: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Zero-pad images at the bottom/right to one size that is a multiple of `size_divisible`."""
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    h = (h + size_divisible - 1) // size_divisible * size_divisible
    w = (w + size_divisible - 1) // size_divisible * size_divisible
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for b, im in zip(batch, images):
        b[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


def reduce_mean(value: Tensor) -> Tensor:
    """Average a scalar over ranks (loss normalisers: positives counted over the whole batch)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class Detector(nn.Module):
    """Base class: normalisation + padding; subclasses define network, losses and postprocess."""

    def __init__(self, size_divisible: int, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
        super().__init__()
        self.size_divisible = size_divisible
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        normed = [(im - self.pixel_mean) / self.pixel_std for im in images]
        return batch_images(normed, self.size_divisible)

    def network(self, batch: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, outputs, targets: list[dict], batch: Tensor) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def postprocess(self, outputs, sizes: list[tuple[int, int]], batch: Tensor) -> list[dict]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        batch, sizes = self.preprocess(images)
        outputs = self.network(batch)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self.losses(outputs, targets, batch)
        return self.postprocess(outputs, sizes, batch)


def nms_per_image(boxes: list[Tensor], scores: list[Tensor], labels: list[Tensor], nms_thresh: float,
                  max_detections: int) -> dict:
    """One image's candidates from all levels (or TTA views) -> class-wise NMS, the best by score."""
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]  # sorted by decreasing score
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

"""What every detector shares: the input contract, and the parts the one-stage heads are built from.

A detector takes images already resized by the data pipeline (float 0..1, [3, H, W]) and targets with
`boxes` (xyxy, pixels of that image) and contiguous `labels`. It normalises and pads them itself, and
returns a loss dict in training or, in eval, one dict per image with `boxes`, `scores`, `labels` in the
same pixel frame (the evaluator maps them back to the original image).

    forward(images, targets) = postprocess | losses ( network(preprocess(images)) )

`network` is the pure tensor part (backbone, neck, head): FLOPs are counted on it alone.

One-stage parts: `Scale`, `conv_tower` (GN towers), `init_predictors`, `head_init_std`, `flatten_levels`,
`make_points` / `square_anchors`, and `DenseDetector`, whose postprocess is the dense decode every
one-stage detector here runs: per level the detector names its candidates (`level_candidates`, usually
`top_candidates` + a box decode), then one class-wise NMS per image. A new one-stage detector is a head
module and a `DenseDetector` subclass with `grids`, `losses` and `level_candidates`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image, generalized_box_iou_loss

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


def nms_per_image(boxes: list[Tensor], scores: list[Tensor], labels: list[Tensor], nms_thresh: float,
                  max_detections: int) -> dict:
    """One image's candidates from all levels (or TTA views) -> class-wise NMS, the best by score."""
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]  # sorted by decreasing score
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


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
        outputs = self.network(batch)  # in the autocast dtype when the caller runs under autocast
        # losses, assignment, box decoding and NMS in fp32: focal sums over every anchor and IoU tests at
        # thresholds are where bf16's 8 bits of mantissa go wrong
        with torch.autocast(batch.device.type, enabled=False) if batch.device.type in ("cpu", "cuda") \
                else contextlib.nullcontext():
            outputs = to_float32(outputs)
            if self.training:
                if targets is None:
                    raise ValueError("targets are required in training mode")
                return self.losses(outputs, targets, batch)
            return self.postprocess(outputs, sizes, batch)


def to_float32(outputs):
    """Half-precision tensors in a (nested) tuple/list/dict as fp32; everything else as it is."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() and outputs.dtype != torch.float32 else outputs
    if isinstance(outputs, dict):
        return type(outputs)((k, to_float32(v)) for k, v in outputs.items())
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(v) for v in outputs)
    return outputs


# -- one-stage heads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseConfig:
    """Settings every one-stage detector here shares: focal loss, the classifier's prior, and inference."""

    num_classes: int = 80
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    prior_prob: float = 0.01
    score_thresh: float = 0.05
    pre_nms_topk: int = 1000  # per level
    nms_thresh: float = 0.6
    detections_per_img: int = 100


class Scale(nn.Module):
    """A learnable scalar per pyramid level on the box branch (FCOS, ATSS)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def conv_tower(channels: int, convs: int, gn_groups: int) -> nn.Sequential:
    """`convs` x (conv3x3 + GroupNorm + ReLU), normal(0, 0.01) weights: the baseline towers of ATSS, FCOS
    and RepPoints. Zero convs is an empty tower (what a DyHead head leaves in their place)."""
    layers = []
    for _ in range(convs):
        conv = nn.Conv2d(channels, channels, 3, 1, 1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.GroupNorm(gn_groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def head_init_std(channels: int) -> float:
    """normal(0, 0.01) at the paper's 256 channels, scaled by sqrt(256 / C) for narrower heads.

    Without a norm layer between them, each conv scales the signal by about std * sqrt(k * k * C): at
    0.01 and 32 channels (the mini profile) a 4-conv RetinaNet tower passes ~1e-3 of its input and the
    head does not train. The scaling keeps the 256-channel per-layer gain at any width.
    """
    return 0.01 * math.sqrt(256 / channels)


def prior_bias(prior_prob: float) -> float:
    """The classifier bias that makes every class start at probability `prior_prob` (focal loss)."""
    return -math.log((1 - prior_prob) / prior_prob)


def init_predictors(convs: tuple[nn.Conv2d, ...], classifier: nn.Conv2d, prior_prob: float) -> None:
    """normal(0, 0.01) weights and zero bias for the prediction convs; the classifier starts at the prior."""
    for conv in convs:
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
    nn.init.constant_(classifier.bias, prior_bias(prior_prob))


def flatten_levels(maps: list[Tensor], channels: int) -> Tensor:
    """[N, A * C, H, W] per level -> [N, sum H W A, C] in (level, y, x, anchor) order (A = 1: one
    prediction per location), matching `make_points` / `square_anchors` and RetinaNet's anchors."""
    out = []
    for m in maps:
        n, _, h, w = m.shape
        out.append(m.reshape(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(out, dim=1)


def make_points(sizes: list[tuple[int, int]], strides: list[int], device) -> list[Tensor]:
    """Per level [H * W, 2] (x, y) at (i + 0.5) * stride, in (y, x) order."""
    points = []
    for (h, w), s in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([cx, cy], dim=-1).reshape(-1, 2))
    return points


def square_anchors(points: list[Tensor], strides: list[int], scale: float) -> list[Tensor]:
    """One square anchor of `scale * stride` centred on each point; per level [HW, 4] xyxy."""
    return [torch.cat([p - scale * s / 2, p + scale * s / 2], dim=1) for p, s in zip(points, strides)]


def top_candidates(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `k` best kept (location, class) pairs of one level: (scores, locations, classes).

    `scores` and `keep` are [locations, classes]; when no more than `k` are kept they stay in location order.
    """
    kept = scores[keep]
    loc, cls = keep.nonzero(as_tuple=True)
    if kept.numel() > k:
        kept, top = kept.topk(k)
        loc, cls = loc[top], cls[top]
    return kept, loc, cls


def centerness_losses(pred_boxes: Tensor, box_targets: Tensor, ctr_targets: Tensor, ctr_logits: Tensor,
                      num_pos: Tensor, box_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """GIoU box loss weighted by the centerness targets, and the centerness BCE (FCOS and ATSS)."""
    ctr_sum = reduce_mean(ctr_targets.sum()).clamp(min=1e-6)
    giou = generalized_box_iou_loss(pred_boxes, box_targets, reduction="none")
    loss_box = box_weight * (giou * ctr_targets).sum() / ctr_sum
    loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets, reduction="sum") / num_pos
    return loss_box, loss_ctr


def centerness_candidates(outputs, image: int, level: int, cfg: DenseConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level's best (cls x centerness) candidates of one image: scores, locations, classes and their
    regression rows. The threshold applies to the class score alone, as in both official codes."""
    logits, regression, ctrness = (o[level][image] for o in outputs)
    cls = logits.permute(1, 2, 0).reshape(-1, cfg.num_classes).sigmoid()
    ctr = ctrness.reshape(-1).sigmoid()
    scores, loc, labels = top_candidates(cls * ctr[:, None], cls > cfg.score_thresh, cfg.pre_nms_topk)
    return scores, loc, labels, regression.permute(1, 2, 0).reshape(-1, regression.shape[0])[loc]


class DenseDetector(Detector):
    """A one-stage detector: `network` = head(backbone(batch)); `postprocess` gathers each level's
    candidates, clips them to the image and keeps the best after one class-wise NMS.

    Subclasses set `self.cfg` (with nms_thresh and detections_per_img) and define `grids` (the anchors or
    points of every level), `losses`, and `level_candidates`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, size_divisible: int):
        super().__init__(size_divisible)
        self.backbone = backbone
        self.strides = backbone.strides
        self.head = head

    def network(self, batch: Tensor):
        return self.head(self.backbone(batch))

    def level_sizes(self, outputs) -> list[tuple[int, int]]:
        return [tuple(m.shape[-2:]) for m in outputs[0]]

    def grids(self, outputs, batch: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def level_inputs(self, outputs, batch: Tensor) -> list[Tensor]:
        """What `level_candidates` reads for each level: the anchors or points unless a detector decodes
        the whole batch at once."""
        return self.grids(outputs, batch)

    def level_candidates(self, outputs, grid: Tensor, image: int, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes, scores, labels) of one image on one level, before NMS."""
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def postprocess(self, outputs, sizes: list[tuple[int, int]], batch: Tensor) -> list[dict]:
        inputs = self.level_inputs(outputs, batch)
        results = []
        for i, (h, w) in enumerate(sizes):
            boxes, scores, labels = [], [], []
            for level, grid in enumerate(inputs):
                b, s, lab = self.level_candidates(outputs, grid, i, level)
                boxes.append(clip_boxes_to_image(b, (h, w)))
                scores.append(s)
                labels.append(lab)
            results.append(nms_per_image(boxes, scores, labels, self.cfg.nms_thresh, self.cfg.detections_per_img))
        return results

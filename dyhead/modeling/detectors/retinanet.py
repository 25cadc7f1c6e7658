"""RetinaNet (Lin et al., ICCV 2017) with either its 4-conv towers or a DyHead head.

Follows torchvision's and detectron2's RetinaNet. Nine anchors per location
on P3-P7: sizes 4 x stride x 2^{0, 1/3, 2/3} (32..512 x ... on COCO, torchvision's sizes without
its integer rounding) times aspect ratios h/w of 0.5, 1, 2, centred at i * stride (offset 0, as
torchvision and detectron2). Max-IoU matching at 0.5 / 0.4 with low-quality matches; anchors in
between are ignored. Focal loss (0.25, 2) and L1 on (dx, dy, dw, dh) deltas with unit weights,
both summed and divided by the positives of the whole batch averaged over ranks -- torchvision
instead normalises per image, which weighs an image with one object like one with fifty.

DyHead placements (`placement`): ``paper`` (Fig. 2b, the default) -- the blocks replace both towers and
the predictors read the one unified feature; ``official`` -- microsoft/DynamicHead's RetinaNet config,
which leaves detectron2's default 4-conv cls and box towers on top of the blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import box_iou, sigmoid_focal_loss

from dyhead.modeling.detectors.common import (DenseConfig, DenseDetector, flatten_levels, head_init_std, init_predictors,
                                              reduce_mean, top_candidates)
from dyhead.modeling.dyhead import check_placement


@dataclass(frozen=True)
class RetinaNetConfig(DenseConfig):
    anchor_scale: float = 4.0  # the smallest anchor of a level is 4 strides (32 px on P3)
    scales_per_octave: int = 3
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    tower_convs: int = 4  # baseline head; a DyHead head has no towers
    nms_thresh: float = 0.5
    tower_init: str = "paper"  # "paper": normal(0, 0.01) at 256 channels (width-scaled); "gain": He init
    placement: str = "paper"  # with DyHead: "paper" drops the towers, "official" keeps them on top

    @property
    def num_anchors(self) -> int:
        return self.scales_per_octave * len(self.aspect_ratios)


def plain_tower(channels: int, convs: int, init: str = "paper") -> nn.Sequential:
    """conv3x3 + ReLU, no norm (the RetinaNet head), zero bias.

    init "paper": the width-scaled normal(0, 0.01) above; each conv + ReLU then passes about a third of
    its input, ~1% through four. That trains from ImageNet features over 90k iterations; from scratch in the
    mini profile's 1000 it leaves the baseline at AP 0.5. "gain": He's normal(0, sqrt(2 / fan_in)), which
    keeps the signal's scale through the ReLUs (the mini profile's choice).
    """
    if init not in ("paper", "gain"):
        raise ValueError(f"plain_head_init: unknown value {init!r}; expected paper or gain")
    std = head_init_std(channels) if init == "paper" else math.sqrt(2.0 / (9 * channels))
    layers = []
    for _ in range(convs):
        conv = nn.Conv2d(channels, channels, 3, 1, 1)
        nn.init.normal_(conv.weight, std=std)
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Baseline: separate cls and box towers. DyHead (Fig. 2b): the blocks replace both towers and
    the two predictors read the one unified feature; the official placement keeps the towers after them."""

    def __init__(self, channels: int, cfg: RetinaNetConfig, dyhead: nn.Module | None = None):
        super().__init__()
        check_placement(cfg.placement)
        self.dyhead = dyhead
        convs = 0 if dyhead is not None and cfg.placement == "paper" else cfg.tower_convs
        self.cls_tower = plain_tower(channels, convs, cfg.tower_init)
        self.reg_tower = plain_tower(channels, convs, cfg.tower_init)
        self.cls_logits = nn.Conv2d(channels, cfg.num_anchors * cfg.num_classes, 3, 1, 1)
        self.bbox_pred = nn.Conv2d(channels, cfg.num_anchors * 4, 3, 1, 1)
        init_predictors((self.cls_logits, self.bbox_pred), self.cls_logits, cfg.prior_prob)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.dyhead is not None:
            features = self.dyhead(features)
        logits = [self.cls_logits(self.cls_tower(x)) for x in features]
        deltas = [self.bbox_pred(self.reg_tower(x)) for x in features]
        return logits, deltas


def make_anchors(sizes: list[tuple[int, int]], strides: list[int], cfg: RetinaNetConfig, device) -> list[Tensor]:
    """Per level [H * W * A, 4], ordered (y, x, ratio, scale) to match the head's channel layout."""
    ratios = torch.tensor(cfg.aspect_ratios, dtype=torch.float32, device=device)
    octave = 2.0 ** (torch.arange(cfg.scales_per_octave, dtype=torch.float32, device=device) / cfg.scales_per_octave)
    h_ratio = ratios.sqrt()[:, None]  # area kept, h / w = ratio
    anchors = []
    for (h, w), s in zip(sizes, strides):
        size = cfg.anchor_scale * s * octave[None, :]
        ws, hs = (size / h_ratio).reshape(-1), (size * h_ratio).reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # [A, 4], zero-centred
        ys = torch.arange(h, dtype=torch.float32, device=device) * s
        xs = torch.arange(w, dtype=torch.float32, device=device) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
        anchors.append((shifts + base[None]).reshape(-1, 4))
    return anchors


def match_anchors(matcher: Matcher, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """Matched box index per anchor; Matcher.BELOW_LOW_THRESHOLD (-1) background, BETWEEN (-2) ignored."""
    if gt_boxes.numel() == 0:  # torchvision's Matcher refuses an empty image: all background
        return torch.full((anchors.shape[0],), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.long, device=anchors.device)
    return matcher(box_iou(gt_boxes, anchors))


class RetinaNet(DenseDetector):
    def __init__(self, backbone: nn.Module, cfg: RetinaNetConfig, size_divisible: int,
                 dyhead: nn.Module | None = None):
        super().__init__(backbone, RetinaNetHead(backbone.out_channels, cfg, dyhead), size_divisible)
        self.cfg = cfg
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)

    def grids(self, outputs, batch: Tensor) -> list[Tensor]:
        return make_anchors(self.level_sizes(outputs), self.strides, self.cfg, batch.device)

    def losses(self, outputs, targets: list[dict], batch: Tensor) -> dict[str, Tensor]:
        anchors = torch.cat(self.grids(outputs, batch))
        logits = flatten_levels(outputs[0], self.cfg.num_classes)
        deltas = flatten_levels(outputs[1], 4)

        cls_targets = torch.zeros_like(logits)
        valid, fg, box_targets = [], [], []
        for i, t in enumerate(targets):
            matched = match_anchors(self.matcher, anchors, t["boxes"])
            pos = matched >= 0
            cls_targets[i, pos, t["labels"][matched[pos]]] = 1.0
            valid.append(matched != Matcher.BETWEEN_THRESHOLDS)
            fg.append(pos)
            box_targets.append(self.box_coder.encode_single(t["boxes"][matched[pos]], anchors[pos]))
        valid, fg = torch.stack(valid), torch.stack(fg)

        num_pos = reduce_mean(fg.sum().to(logits.dtype)).clamp(min=1.0)
        loss_cls = sigmoid_focal_loss(logits[valid], cls_targets[valid], self.cfg.focal_alpha, self.cfg.focal_gamma,
                                      reduction="sum") / num_pos
        loss_box = F.l1_loss(deltas[fg], torch.cat(box_targets), reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def level_candidates(self, outputs, grid: Tensor, image: int, level: int):
        logits, deltas = (o[level][image : image + 1] for o in outputs)
        scores = flatten_levels([logits], self.cfg.num_classes)[0].sigmoid()  # [H W A, K]
        scores, loc, labels = top_candidates(scores, scores > self.cfg.score_thresh, self.cfg.pre_nms_topk)
        d = flatten_levels([deltas], 4)[0][loc]
        return self.box_coder.decode_single(d, grid[loc]), scores, labels

"""FCOS (Tian et al., ICCV 2019) as the paper's baseline used it, with GN towers or a DyHead head.

Follows the original FCOS code (tianzhi0549/FCOS) and mmdetection's fcos_head, not torchvision's
variant. One point per location at (i + 0.5) * stride on P3-P7. A point is a positive for a box
when it lies inside the box, within 1.5 strides of its centre (centre sampling, Chebyshev
distance), and the largest of its distances (l, t, r, b) to the box sides falls in the level's
range; the ranges are multiples of the stride, [4s, 8s], open below on the first level and above
on the last, which on P3-P7 are exactly FCOS's 64/128/256/512 and on any other stride set scale
with it. A point claimed by several boxes goes to the smallest. Regression is relu(Scale_l(conv))
in stride units (norm_reg_targets), centerness sits on the regression branch.

Losses: focal / positives; GIoU on decoded boxes weighted by the centerness targets and divided
by their sum; centerness BCE / positives. Both normalisers are averaged over ranks.
Inference: cls > 0.05 (torchvision's default is 0.2), top 1000 per level by cls * ctr,
NMS 0.6, 100 per image, reported score sqrt(cls * ctr) as the original code does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from dyhead.modeling.detectors.common import (DenseConfig, DenseDetector, Scale, centerness_candidates, centerness_losses,
                                              conv_tower, flatten_levels, init_predictors, make_points, reduce_mean)

INF = float("inf")


@dataclass(frozen=True)
class FCOSConfig(DenseConfig):
    size_range_strides: tuple[float, float] = (4.0, 8.0)  # level l takes max(l,t,r,b) in [4 s_l, 8 s_l]
    center_radius: float = 1.5  # in strides; 0 turns centre sampling off
    tower_convs: int = 4
    tower_gn_groups: int = 32


class FCOSHead(nn.Module):
    """Baseline: GN towers for cls and for reg (centerness on reg). DyHead (Fig. 2b): the blocks
    replace both towers; cls, box and centerness predictors read the unified feature."""

    def __init__(self, channels: int, num_levels: int, cfg: FCOSConfig, dyhead: nn.Module | None = None):
        super().__init__()
        self.dyhead = dyhead
        convs = 0 if dyhead is not None else cfg.tower_convs
        self.cls_tower = conv_tower(channels, convs, cfg.tower_gn_groups)
        self.reg_tower = conv_tower(channels, convs, cfg.tower_gn_groups)
        self.cls_logits = nn.Conv2d(channels, cfg.num_classes, 3, 1, 1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(channels, 1, 3, 1, 1)
        init_predictors((self.cls_logits, self.bbox_pred, self.centerness), self.cls_logits, cfg.prior_prob)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if self.dyhead is not None:
            features = self.dyhead(features)
        logits, ltrb, ctrness = [], [], []
        for scale, x in zip(self.scales, features):
            cls_feat, reg_feat = self.cls_tower(x), self.reg_tower(x)
            logits.append(self.cls_logits(cls_feat))
            ltrb.append(F.relu(scale(self.bbox_pred(reg_feat))))  # distances in strides
            ctrness.append(self.centerness(reg_feat))
        return logits, ltrb, ctrness


def size_ranges(strides: list[int], multiples: tuple[float, float]) -> list[tuple[float, float]]:
    """[lo, hi] of max(l, t, r, b) per level: [m0 s, m1 s], the first open below, the last above."""
    ranges = [(multiples[0] * s, multiples[1] * s) for s in strides]
    ranges[0] = (0.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], INF)
    return ranges


def point_box_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """[P, G, 4] distances (l, t, r, b) from every point to every box's sides."""
    x, y = points[:, 0, None], points[:, 1, None]
    return torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=-1)


def fcos_assign(points_per_level: list[Tensor], strides: list[int], ranges: list[tuple[float, float]],
                gt_boxes: Tensor, center_radius: float) -> Tensor:
    """Index of the matched box for every point, -1 for background."""
    points = torch.cat(points_per_level)
    if gt_boxes.numel() == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    counts = [p.shape[0] for p in points_per_level]
    stride = torch.cat([points.new_full((n,), float(s)) for n, s in zip(counts, strides)])
    lo = torch.cat([points.new_full((n,), r[0]) for n, r in zip(counts, ranges)])
    hi = torch.cat([points.new_full((n,), r[1]) for n, r in zip(counts, ranges)])

    ltrb = point_box_distances(points, gt_boxes)
    match = ltrb.min(dim=-1).values > 0  # inside the box
    if center_radius > 0:
        centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        off = (points[:, None, :] - centres[None]).abs().max(dim=-1).values
        match &= off < center_radius * stride[:, None]
    reach = ltrb.max(dim=-1).values
    match &= (reach >= lo[:, None]) & (reach <= hi[:, None])  # both ends inclusive, as FCOS

    areas = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]))[None].expand_as(match)
    areas = torch.where(match, areas, torch.full_like(areas, INF))
    min_area, matched = areas.min(dim=1)
    matched[min_area == INF] = -1
    return matched


def matched_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """[P, 4] distances (l, t, r, b) from point i to box i."""
    return torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=1)


def centerness_from_ltrb(ltrb: Tensor) -> Tensor:
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def decode(points: Tensor, ltrb: Tensor, stride: Tensor | float) -> Tensor:
    d = ltrb * stride
    return torch.cat([points - d[:, :2], points + d[:, 2:]], dim=1)


class FCOS(DenseDetector):
    def __init__(self, backbone: nn.Module, cfg: FCOSConfig, size_divisible: int, dyhead: nn.Module | None = None):
        super().__init__(backbone, FCOSHead(backbone.out_channels, len(backbone.strides), cfg, dyhead), size_divisible)
        self.cfg = cfg
        self.ranges = size_ranges(self.strides, cfg.size_range_strides)

    def grids(self, outputs, batch: Tensor) -> list[Tensor]:
        return make_points(self.level_sizes(outputs), self.strides, batch.device)

    def losses(self, outputs, targets: list[dict], batch: Tensor) -> dict[str, Tensor]:
        points_per_level = self.grids(outputs, batch)
        points = torch.cat(points_per_level)
        stride = torch.cat([points.new_full((p.shape[0],), float(s)) for p, s in zip(points_per_level, self.strides)])
        logits = flatten_levels(outputs[0], self.cfg.num_classes)
        ltrb = flatten_levels(outputs[1], 4)
        ctrness = flatten_levels(outputs[2], 1).squeeze(-1)

        cls_targets = torch.zeros_like(logits)
        pos_mask, box_targets = [], []
        for i, t in enumerate(targets):
            matched = fcos_assign(points_per_level, self.strides, self.ranges, t["boxes"], self.cfg.center_radius)
            pos = matched >= 0
            cls_targets[i, pos, t["labels"][matched[pos]]] = 1.0
            pos_mask.append(pos)
            box_targets.append(t["boxes"][matched[pos]])
        pos_mask, box_targets = torch.stack(pos_mask), torch.cat(box_targets)

        num_pos = reduce_mean(pos_mask.sum().to(logits.dtype)).clamp(min=1.0)
        loss_cls = sigmoid_focal_loss(logits, cls_targets, self.cfg.focal_alpha, self.cfg.focal_gamma,
                                      reduction="sum") / num_pos
        if box_targets.numel() == 0:
            zero = ltrb.sum() * 0 + ctrness.sum() * 0
            return {"loss_cls": loss_cls, "loss_box": zero, "loss_ctr": zero}
        pos_points = points.expand(len(targets), -1, -1)[pos_mask]
        pos_stride = stride.expand(len(targets), -1)[pos_mask]
        ctr_targets = centerness_from_ltrb(matched_distances(pos_points, box_targets))
        pred_boxes = decode(pos_points, ltrb[pos_mask], pos_stride[:, None])
        loss_box, loss_ctr = centerness_losses(pred_boxes, box_targets, ctr_targets, ctrness[pos_mask], num_pos)
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}

    def level_candidates(self, outputs, grid: Tensor, image: int, level: int):
        scores, loc, labels, d = centerness_candidates(outputs, image, level, self.cfg)
        return decode(grid[loc], d, self.strides[level]), scores.sqrt(), labels  # reported score sqrt(cls * ctr)

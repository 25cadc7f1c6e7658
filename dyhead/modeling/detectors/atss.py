"""ATSS (Zhang et al., CVPR 2020) with either the baseline tower head or a DyHead head.

Follows the ATSS reference code (sfzhang15/ATSS) and the official DyHead ATSS config. One square anchor of
8 x stride per location centred at (i + 0.5) * stride; deltas coded with weights (10, 10, 5, 5).
Assignment: per level the 9 anchors nearest each box centre are candidates; positives have
IoU >= mean + std of their candidates' IoUs and a centre strictly inside the box; an anchor
claimed by several boxes goes to the one it overlaps most.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, sigmoid_focal_loss

from dyhead.modeling.detectors.common import (DenseConfig, DenseDetector, Scale, centerness_candidates, centerness_losses,
                                              conv_tower, flatten_levels, init_predictors, make_points, reduce_mean,
                                              square_anchors)

INF = float("inf")


@dataclass(frozen=True)
class ATSSConfig(DenseConfig):
    anchor_scale: float = 8.0
    topk: int = 9
    tower_convs: int = 4  # baseline head; a DyHead head has no towers
    # one tower read by cls and reg (a coupled head without attention: the control for DyHead's
    # unified branch); the paper's baseline has two
    tower_shared: bool = False
    tower_gn_groups: int = 32
    pred_kernel: int = 3
    reg_loss_weight: float = 2.0


class ATSSHead(nn.Module):
    """Predictors for cls, box deltas and centerness on P3-P7.

    Baseline: separate 4-conv GN towers for cls and for reg (centerness on the reg tower);
    `tower_shared` gives cls and reg one tower (a coupled head of plain convs).
    DyHead (Fig. 2b): the blocks replace both towers; all predictors read the unified feature.
    """

    def __init__(self, channels: int, num_levels: int, cfg: ATSSConfig, dyhead: nn.Module | None = None):
        super().__init__()
        self.dyhead = dyhead
        convs = 0 if dyhead is not None else cfg.tower_convs
        self.cls_tower = conv_tower(channels, convs, cfg.tower_gn_groups)
        self.reg_tower = self.cls_tower if cfg.tower_shared else conv_tower(channels, convs, cfg.tower_gn_groups)
        k, pad = cfg.pred_kernel, cfg.pred_kernel // 2
        self.cls_logits = nn.Conv2d(channels, cfg.num_classes, k, 1, pad)
        self.bbox_pred = nn.Conv2d(channels, 4, k, 1, pad)
        self.centerness = nn.Conv2d(channels, 1, k, 1, pad)
        init_predictors((self.cls_logits, self.bbox_pred, self.centerness), self.cls_logits, cfg.prior_prob)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if self.dyhead is not None:
            features = self.dyhead(features)
        logits, deltas, ctrness = [], [], []
        for scale, x in zip(self.scales, features):
            cls_feat = self.cls_tower(x)
            reg_feat = cls_feat if self.reg_tower is self.cls_tower else self.reg_tower(x)
            logits.append(self.cls_logits(cls_feat))
            deltas.append(scale(self.bbox_pred(reg_feat)))
            ctrness.append(self.centerness(reg_feat))
        return logits, deltas, ctrness


def make_anchors(sizes: list[tuple[int, int]], strides: list[int], scale: float, device) -> list[Tensor]:
    """One square anchor of `scale * stride` per location, centred at (i + 0.5) * stride; per level [HW, 4]."""
    return square_anchors(make_points(sizes, strides, device), strides, scale)


def atss_assign(anchors_per_level: list[Tensor], gt_boxes: Tensor, topk: int) -> Tensor:
    """Index of the matched box for every anchor, -1 for background."""
    anchors = torch.cat(anchors_per_level)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(anchor_ctr, gt_ctr)  # [A, G]

    candidates, start = [], 0
    for level in anchors_per_level:
        n = level.shape[0]
        k = min(topk, n)
        _, idx = dist[start : start + n].topk(k, dim=0, largest=False)
        candidates.append(idx + start)
        start += n
    candidates = torch.cat(candidates)  # [K, G]
    cols = torch.arange(num_gt, device=anchors.device)
    cand_ious = ious[candidates, cols]
    # torch.std is unbiased, as in the official and mmdetection code.
    std = cand_ious.std(0) if cand_ious.shape[0] > 1 else torch.zeros_like(cand_ious[0])
    threshold = cand_ious.mean(0) + std
    positive = cand_ious >= threshold

    cand_ctr = anchor_ctr[candidates]  # [K, G, 2]
    ltrb = torch.stack(
        [
            cand_ctr[..., 0] - gt_boxes[:, 0],
            cand_ctr[..., 1] - gt_boxes[:, 1],
            gt_boxes[:, 2] - cand_ctr[..., 0],
            gt_boxes[:, 3] - cand_ctr[..., 1],
        ],
        dim=-1,
    )
    positive &= ltrb.min(dim=-1).values > 0.01

    # Keep, for every anchor, the positive box with the highest IoU.
    scored = torch.full_like(ious, -INF)
    rows = candidates[positive]
    gts = cols.expand_as(candidates)[positive]
    scored[rows, gts] = ious[rows, gts]
    best_iou, best_gt = scored.max(dim=1)
    best_gt[best_iou == -INF] = -1
    return best_gt


def centerness_target(anchors: Tensor, boxes: Tensor) -> Tensor:
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    left, top = ctr[:, 0] - boxes[:, 0], ctr[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - ctr[:, 0], boxes[:, 3] - ctr[:, 1]
    lr = torch.stack([left, right], 1)
    tb = torch.stack([top, bottom], 1)
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


class ATSS(DenseDetector):
    def __init__(self, backbone: nn.Module, cfg: ATSSConfig, size_divisible: int, dyhead: nn.Module | None = None):
        super().__init__(backbone, ATSSHead(backbone.out_channels, len(backbone.strides), cfg, dyhead), size_divisible)
        self.cfg = cfg
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def grids(self, outputs, batch: Tensor) -> list[Tensor]:
        return make_anchors(self.level_sizes(outputs), self.strides, self.cfg.anchor_scale, batch.device)

    def losses(self, outputs, targets: list[dict], batch: Tensor) -> dict[str, Tensor]:
        logits, deltas, ctrness = outputs
        anchors_per_level = self.grids(outputs, batch)
        anchors = torch.cat(anchors_per_level)
        logits = flatten_levels(logits, self.cfg.num_classes)
        deltas = flatten_levels(deltas, 4)
        ctrness = flatten_levels(ctrness, 1).squeeze(-1)

        cls_targets = torch.zeros_like(logits)
        pos_mask, box_targets = [], []
        for i, t in enumerate(targets):
            matched = atss_assign(anchors_per_level, t["boxes"], self.cfg.topk)
            pos = matched >= 0
            cls_targets[i, pos, t["labels"][matched[pos]]] = 1.0
            pos_mask.append(pos)
            box_targets.append(t["boxes"][matched[pos]])
        pos_mask = torch.stack(pos_mask)
        box_targets = torch.cat(box_targets)
        pos_anchors = anchors.unsqueeze(0).expand(len(targets), -1, -1)[pos_mask]

        num_pos = reduce_mean(pos_mask.sum().to(logits.dtype)).clamp(min=1.0)
        loss_cls = sigmoid_focal_loss(
            logits, cls_targets, self.cfg.focal_alpha, self.cfg.focal_gamma, reduction="sum"
        ) / num_pos

        if box_targets.numel() == 0:
            zero = deltas.sum() * 0 + ctrness.sum() * 0
            return {"loss_cls": loss_cls, "loss_box": zero, "loss_ctr": zero}
        ctr_targets = centerness_target(pos_anchors, box_targets)
        pred_boxes = self.box_coder.decode_single(deltas[pos_mask], pos_anchors)
        loss_box, loss_ctr = centerness_losses(pred_boxes, box_targets, ctr_targets, ctrness[pos_mask], num_pos,
                                               self.cfg.reg_loss_weight)
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}

    def level_candidates(self, outputs, grid: Tensor, image: int, level: int):
        # product score, no sqrt (the official DyHead port)
        scores, loc, labels, d = centerness_candidates(outputs, image, level, self.cfg)
        return self.box_coder.decode_single(d, grid[loc]), scores, labels

"""RepPoints (Yang et al., ICCV 2019), moment version, with GN towers or a DyHead head.

Follows mmdetection's reppoints_head, point_assigner and its R-50 GN config. Per location of P3-P7, at (i + 0.5) * stride:

    init   = conv1x1(relu(conv3x3(pts_feat)))            9 points as (dy, dx) in strides
    offset = (0.9 * init.detach() + 0.1 * init) - grid   gradient to the init points scaled by 0.1
    cls    = conv1x1(relu(DCN(cls_feat, offset)))        DCNv1 sampling exactly at the points
    refine = conv1x1(relu(DCN(pts_feat, offset))) + init.detach()

Points -> box by moments: centre = mean of the points, half size = std * exp(transfer), with a
learnable 2-vector `transfer` whose gradient is scaled by moment_mul = 0.01.
Targets: the init stage uses the point assigner (a box goes to the level
floor(mean(log2(w / 4), log2(h / 4))) and there to the pos_num = 1 point nearest its centre,
distance measured in box widths/heights); the refine stage and the classification use max-IoU
(0.5 / 0.4, low-quality matches kept) between the boxes and the pseudo boxes of the detached init
points. Box losses are smooth-L1 (beta 0.11) on boxes divided by 4 * stride, weights 0.5 (init)
and 1.0 (refine), each over its positives averaged across ranks; classification is focal over
positives and negatives of the refine assignment, over the refine positives.

The head's un-normalised convs (DCNs, the 3x3 init conv, the 1x1 outputs) use mmdet's normal(0, 0.01)
at 256 channels, scaled by sqrt(256 / C) at narrower widths (see common.head_init_std): two of
them in series per branch pass so little signal at 0.01 and 32 channels that the head trains very
slowly (8-image overfit, 400 iterations: 25 AP unscaled, 87 AP scaled).
Deviations, both numerical guards: the std is sqrt(var + 1e-6 px^2) so that nine coincident points
have a finite gradient (torch.std's is 0/0), and a low-quality match needs IoU > 0, so a box that
overlaps no pseudo box does not claim every point (mmdet's min_pos_iou = 0 would).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, sigmoid_focal_loss

from dyhead.modeling.detectors.common import (DenseConfig, DenseDetector, conv_tower, flatten_levels, head_init_std, make_points,
                                              prior_bias, reduce_mean)
from dyhead.ops import deform_conv2d

IGNORE, BACKGROUND = -2, -1


@dataclass(frozen=True)
class RepPointsConfig(DenseConfig):
    num_points: int = 9
    tower_convs: int = 3
    tower_gn_groups: int = 32
    gradient_mul: float = 0.1
    moment_mul: float = 0.01
    point_base_scale: float = 4.0  # point assigner scale and box-loss normaliser (4 * stride)
    pos_num: int = 1
    pos_iou_thresh: float = 0.5
    neg_iou_thresh: float = 0.4
    smooth_l1_beta: float = 0.11
    init_loss_weight: float = 0.5
    refine_loss_weight: float = 1.0
    nms_thresh: float = 0.5


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, 1, k // 2)
    nn.init.normal_(conv.weight, std=head_init_std(cin))
    nn.init.zeros_(conv.bias)
    return conv


class DeformConv(nn.Module):
    """3x3 DCNv1 (no mask) at caller-given offsets; mmdet's normal(0, 0.01) init (width-scaled)."""

    def __init__(self, cin: int, cout: int, backend: str):
        super().__init__()
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.normal_(self.weight, std=head_init_std(cin))

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        return deform_conv2d(x, offset, None, self.weight, self.bias, 1, 1, 1, backend=self.backend)


def grid_offsets(num_points: int) -> Tensor:
    """The regular k x k kernel grid as (dy, dx) pairs, row-major: the DCN's zero-offset positions."""
    k = int(math.isqrt(num_points))
    if k * k != num_points:
        raise ValueError(f"num_points must be a square, got {num_points}")
    r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy, dx], dim=-1).reshape(-1)


class RepPointsHead(nn.Module):
    """Baseline: 3-conv GN towers for cls and points. DyHead (Fig. 2b): the blocks replace both
    towers; both stages and the classifier read the unified feature."""

    def __init__(self, channels: int, cfg: RepPointsConfig, dcn_backend: str, dyhead: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.dyhead = dyhead
        convs = 0 if dyhead is not None else cfg.tower_convs
        self.cls_tower = conv_tower(channels, convs, cfg.tower_gn_groups)
        self.pts_tower = conv_tower(channels, convs, cfg.tower_gn_groups)
        out_pts = 2 * cfg.num_points
        self.cls_dcn = DeformConv(channels, channels, dcn_backend)
        self.cls_out = _conv(channels, cfg.num_classes, 1)
        nn.init.constant_(self.cls_out.bias, prior_bias(cfg.prior_prob))
        self.pts_init_conv = _conv(channels, channels, 3)
        self.pts_init_out = _conv(channels, out_pts, 1)
        self.pts_refine_dcn = DeformConv(channels, channels, dcn_backend)
        self.pts_refine_out = _conv(channels, out_pts, 1)
        self.register_buffer("grid", grid_offsets(cfg.num_points).view(1, -1, 1, 1), persistent=False)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if self.dyhead is not None:
            features = self.dyhead(features)
        g = self.cfg.gradient_mul
        logits, pts_init, pts_refine = [], [], []
        for x in features:
            cls_feat, pts_feat = self.cls_tower(x), self.pts_tower(x)
            init = self.pts_init_out(F.relu(self.pts_init_conv(pts_feat)))
            offset = (1 - g) * init.detach() + g * init - self.grid
            logits.append(self.cls_out(F.relu(self.cls_dcn(cls_feat, offset))))
            pts_refine.append(self.pts_refine_out(F.relu(self.pts_refine_dcn(pts_feat, offset))) + init.detach())
            pts_init.append(init)
        return logits, pts_init, pts_refine


def points_to_boxes(points: Tensor, transfer: Tensor, moment_mul: float) -> Tensor:
    """[P, 2K] absolute (y, x) pairs -> [P, 4] xyxy boxes by moments (mean, std * exp(transfer))."""
    pts = points.view(points.shape[0], -1, 2)
    y, x = pts[..., 0], pts[..., 1]
    t = transfer * moment_mul + transfer.detach() * (1 - moment_mul)
    # unbiased variance like torch.std; +1e-6 keeps the gradient finite when all points coincide
    half_w = (x.var(dim=1) + 1e-6).sqrt() * torch.exp(t[0])
    half_h = (y.var(dim=1) + 1e-6).sqrt() * torch.exp(t[1])
    mx, my = x.mean(dim=1), y.mean(dim=1)
    return torch.stack([mx - half_w, my - half_h, mx + half_w, my + half_h], dim=1)


def point_assign(points: Tensor, strides: Tensor, gt_boxes: Tensor, scale: float = 4.0, pos_num: int = 1) -> Tensor:
    """mmdet's PointAssigner: index of the box each point is the init-stage target for, -1 for none.

    `points` [P, 2] (x, y); `strides` [P]. A box of size w x h belongs to the level
    int(mean(log2(w / scale), log2(h / scale))) (clamped to the levels present); there its pos_num
    points nearest to the centre (in units of w, h) are positives; a point wanted by several boxes
    goes to the nearer one.
    """
    num = points.shape[0]
    assigned = torch.full((num,), -1, dtype=torch.long, device=points.device)
    if gt_boxes.numel() == 0:
        return assigned
    lvl = torch.log2(strides).round().long()
    ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    gt_lvl = ((torch.log2(wh[:, 0] / scale) + torch.log2(wh[:, 1] / scale)) / 2).int().long()  # int() truncates
    gt_lvl = gt_lvl.clamp(int(lvl.min()), int(lvl.max()))
    best = torch.full((num,), float("inf"), device=points.device)
    for g in range(gt_boxes.shape[0]):
        idx = torch.where(lvl == gt_lvl[g])[0]
        dist = ((points[idx] - ctr[g]) / wh[g]).norm(dim=1)
        d, k = dist.topk(min(pos_num, idx.numel()), largest=False)
        chosen = idx[k]
        closer = d < best[chosen]
        assigned[chosen[closer]] = g
        best[chosen[closer]] = d[closer]
    return assigned


def max_iou_assign(boxes: Tensor, gt_boxes: Tensor, pos_thresh: float, neg_thresh: float) -> Tensor:
    """Matched box per proposal: IoU >= pos positive, < neg BACKGROUND, between IGNORE; each box
    also keeps the proposals it overlaps most (if it overlaps any)."""
    if gt_boxes.numel() == 0:
        return torch.full((boxes.shape[0],), BACKGROUND, dtype=torch.long, device=boxes.device)
    ious = box_iou(gt_boxes, boxes)  # [G, P]
    best_iou, matched = ious.max(dim=0)
    matched = matched.clone()
    matched[best_iou < pos_thresh] = IGNORE
    matched[best_iou < neg_thresh] = BACKGROUND
    gt_best = ious.max(dim=1, keepdim=True).values
    is_best = (ious == gt_best) & (gt_best > 0)
    # the last box wins a proposal that is the best of several, as mmdet's loop over boxes does
    order = torch.arange(1, gt_boxes.shape[0] + 1, device=boxes.device)[:, None]
    last = (is_best * order).max(dim=0).values
    matched = torch.where(last > 0, last - 1, matched)
    return matched


class RepPoints(DenseDetector):
    def __init__(self, backbone: nn.Module, cfg: RepPointsConfig, size_divisible: int, dcn_backend: str = "torchvision",
                 dyhead: nn.Module | None = None):
        super().__init__(backbone, RepPointsHead(backbone.out_channels, cfg, dcn_backend, dyhead), size_divisible)
        self.cfg = cfg
        self.moment_transfer = nn.Parameter(torch.zeros(2))

    def _locations(self, outputs, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Centres [P, 2] (x, y) and strides [P] of all locations, in (level, y, x) order."""
        per_level = self.grids(outputs, batch)
        strides = torch.cat([p.new_full((p.shape[0],), float(s)) for p, s in zip(per_level, self.strides)])
        return torch.cat(per_level), strides

    def _absolute(self, pts: Tensor, centres: Tensor, strides: Tensor) -> Tensor:
        """[N, P, 2K] (dy, dx) in strides -> absolute (y, x) pixels."""
        yx = centres.flip(-1).repeat(1, self.cfg.num_points)
        return pts * strides[:, None] + yx

    def _boxes(self, pts_abs: Tensor) -> Tensor:
        return points_to_boxes(pts_abs.reshape(-1, pts_abs.shape[-1]), self.moment_transfer,
                               self.cfg.moment_mul).view(*pts_abs.shape[:-1], 4)

    def losses(self, outputs, targets: list[dict], batch: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        centres, strides = self._locations(outputs, batch)
        logits = flatten_levels(outputs[0], cfg.num_classes)
        init_boxes = self._boxes(self._absolute(flatten_levels(outputs[1], 2 * cfg.num_points), centres, strides))
        refine_boxes = self._boxes(self._absolute(flatten_levels(outputs[2], 2 * cfg.num_points), centres, strides))
        norm = cfg.point_base_scale * strides[:, None]

        cls_targets = torch.zeros_like(logits)
        valid, init_pos, refine_pos, init_gt, refine_gt = [], [], [], [], []
        for i, t in enumerate(targets):
            m_init = point_assign(centres, strides, t["boxes"], cfg.point_base_scale, cfg.pos_num)
            m_ref = max_iou_assign(init_boxes[i].detach(), t["boxes"], cfg.pos_iou_thresh, cfg.neg_iou_thresh)
            pos = m_ref >= 0
            cls_targets[i, pos, t["labels"][m_ref[pos]]] = 1.0
            valid.append(m_ref != IGNORE)
            init_pos.append(m_init >= 0)
            refine_pos.append(pos)
            init_gt.append(t["boxes"][m_init[m_init >= 0]])
            refine_gt.append(t["boxes"][m_ref[pos]])
        valid, init_pos, refine_pos = torch.stack(valid), torch.stack(init_pos), torch.stack(refine_pos)

        num_init = reduce_mean(init_pos.sum().to(logits.dtype)).clamp(min=1.0)
        num_refine = reduce_mean(refine_pos.sum().to(logits.dtype)).clamp(min=1.0)
        loss_cls = sigmoid_focal_loss(logits[valid], cls_targets[valid], cfg.focal_alpha, cfg.focal_gamma,
                                      reduction="sum") / num_refine
        n = len(targets)
        init_norm = norm.expand(n, -1, -1)[init_pos]
        refine_norm = norm.expand(n, -1, -1)[refine_pos]
        loss_init = F.smooth_l1_loss(init_boxes[init_pos] / init_norm, torch.cat(init_gt) / init_norm,
                                     beta=cfg.smooth_l1_beta, reduction="sum") / num_init
        loss_refine = F.smooth_l1_loss(refine_boxes[refine_pos] / refine_norm, torch.cat(refine_gt) / refine_norm,
                                       beta=cfg.smooth_l1_beta, reduction="sum") / num_refine
        return {"loss_cls": loss_cls, "loss_pts_init": cfg.init_loss_weight * loss_init,
                "loss_pts_refine": cfg.refine_loss_weight * loss_refine}

    def grids(self, outputs, batch: Tensor) -> list[Tensor]:
        return make_points(self.level_sizes(outputs), self.strides, batch.device)

    def level_inputs(self, outputs, batch: Tensor) -> list[Tensor]:
        """Per level, every location's box from its refined points and its class scores, decoded for the whole
        batch at once: [N, HW, 4 + K]."""
        centres, strides = self._locations(outputs, batch)
        boxes = self._boxes(self._absolute(flatten_levels(outputs[2], 2 * self.cfg.num_points), centres, strides))
        scores = flatten_levels(outputs[0], self.cfg.num_classes).sigmoid()
        counts = [m.shape[-2] * m.shape[-1] for m in outputs[0]]
        return list(torch.cat([boxes, scores], dim=-1).split(counts, dim=1))

    def level_candidates(self, outputs, grid: Tensor, image: int, level: int):
        boxes, scores = grid[image, :, :4], grid[image, :, 4:]
        # mmdet: the top locations by their best class score, then the score threshold
        if scores.shape[0] > self.cfg.pre_nms_topk:
            top = scores.max(dim=1).values.topk(self.cfg.pre_nms_topk).indices
            scores, boxes = scores[top], boxes[top]
        loc, label = torch.where(scores > self.cfg.score_thresh)
        return boxes[loc], scores[loc, label], label

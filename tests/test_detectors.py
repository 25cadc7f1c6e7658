"""The Table 3 detectors: assigners and losses on hand-built cases, forward passes, COCO decoding,
FLOP counting, the build registry and the Table 3 report."""
import json
from dataclasses import replace
import math

import pytest
import torch
import yaml
from pycocotools.coco import COCO
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from dyhead.config import canonical_id, load_matrix, resolve
from dyhead.errors import DyheadError
from dyhead.engine.evaluate import coco_metrics
from dyhead.engine.inference import to_coco_results
from dyhead.engine.flops import count_gmacs
from dyhead.modeling import build
from dyhead.modeling.backbone import BackboneConfig, BackboneWithFPN
from dyhead.modeling.detectors import retinanet as rn_mod
from dyhead.modeling.detectors.faster_rcnn import FasterRCNN, FasterRCNNConfig, RoITaskAttention
from dyhead.modeling.detectors.common import make_points
from dyhead.modeling.detectors.fcos import FCOS, FCOSConfig, fcos_assign, size_ranges
from dyhead.modeling.detectors.reppoints import (
    BACKGROUND, IGNORE, RepPoints, RepPointsConfig, RepPointsHead, max_iou_assign, point_assign, points_to_boxes,
)
from dyhead.modeling.detectors.retinanet import RetinaNet, RetinaNetConfig, make_anchors, match_anchors
from dyhead.modeling.dyhead import DyHead, DyHeadConfig
from tests.helpers import REPO, write_fake_run

K = 3  # classes in the tiny models
LOG2 = math.log(2.0)


def tiny_backbone(levels=(3, 4, 5, 6, 7)):
    return BackboneWithFPN(BackboneConfig(depths=(1, 1, 1, 1), base_width=8, norm="bn", freeze_at=0,
                                          fpn_channels=16, levels=levels))


def tiny_dyhead(blocks, **switches):
    return DyHead(DyHeadConfig(blocks=blocks, channels=16, gn_groups=8, **switches)) if blocks else None


def tiny_model(name, blocks=0):
    """The detector with `blocks` DyHead blocks, assembled as dyhead.modeling.build does (backbone first)."""
    placement = name.split("-")[1] if "-" in name else "paper"
    if name.startswith("retinanet"):
        return RetinaNet(tiny_backbone(), RetinaNetConfig(num_classes=K, placement=placement), 128, tiny_dyhead(blocks))
    if name == "fcos":
        return FCOS(tiny_backbone(), FCOSConfig(num_classes=K, tower_gn_groups=8), 128, tiny_dyhead(blocks))
    if name == "reppoints":
        return RepPoints(tiny_backbone(), RepPointsConfig(num_classes=K, tower_gn_groups=8), 128,
                         dyhead=tiny_dyhead(blocks))
    # Fig. 2c: the blocks before the RoI pooling without task attention, pi_C on the RoIs
    switches = {"task": False} if placement == "paper" else {}
    return FasterRCNN(tiny_backbone((2, 3, 4, 5, 6)), FasterRCNNConfig(num_classes=K, placement=placement), 128,
                      tiny_dyhead(blocks, **switches))


def zeros_like_outputs(model, hw=(128, 128)):
    """The head's output maps for one image, all zero (shapes from a real forward)."""
    model.eval()
    with torch.no_grad():
        outputs = model.network(torch.zeros(1, 3, *hw))
    return tuple([torch.zeros_like(m) for m in maps] for maps in outputs)


# --------------------------------------------------------------------------------------- FCOS
def brute_force_fcos(points, strides, ranges, gts, radius):
    out = []
    for (x, y), s, (lo, hi) in zip(points.tolist(), strides, ranges):
        best = (math.inf, -1)
        for g, (x0, y0, x1, y1) in enumerate(gts.tolist()):
            ltrb = (x - x0, y - y0, x1 - x, y1 - y)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ok = min(ltrb) > 0 and lo <= max(ltrb) <= hi
            if radius:
                ok &= max(abs(x - cx), abs(y - cy)) < radius * s
            if ok and (x1 - x0) * (y1 - y0) < best[0]:
                best = ((x1 - x0) * (y1 - y0), g)
        out.append(best[1])
    return out


def test_fcos_size_ranges_are_the_papers_on_p3_p7():
    assert size_ranges([8, 16, 32, 64, 128], (4, 8)) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf)]


def test_fcos_centre_sampling_size_ranges_and_smallest_box():
    strides = [8, 16]
    levels = make_points([(8, 8), (4, 4)], strides, "cpu")
    ranges = size_ranges(strides, (4, 8))  # P3 (0, 64], P4 (64, inf)
    box_a = [0.0, 0.0, 40.0, 40.0]  # centre (20, 20): P3 points within 12 px -> x, y in {12, 20, 28}
    box_c = [16.0, 16.0, 24.0, 24.0]  # inside A, smaller: takes the shared point (20, 20)
    matched = fcos_assign(levels, strides, ranges, torch.tensor([box_a, box_c]), 1.5)
    points = torch.cat(levels)
    got = {tuple(points[i].tolist()): int(matched[i]) for i in torch.where(matched >= 0)[0]}
    expected = {(x, y): 0 for x in (12.0, 20.0, 28.0) for y in (12.0, 20.0, 28.0)}
    expected[(20.0, 20.0)] = 1
    assert got == expected  # nothing on P4: reaches there are <= 32, below its 64

    no_sampling = fcos_assign(levels, strides, ranges, torch.tensor([box_a]), 0.0)
    assert int((no_sampling == 0).sum()) == 25  # every P3 point inside the box

    big = torch.tensor([[0.0, 0.0, 128.0, 128.0]])  # reaches of ~60-64 on P3, 64+ on P4
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g) * 40
    boxes = torch.cat([big, torch.cat([xy, xy + 4 + torch.rand(6, 2, generator=g) * 60], 1)])
    levels = make_points([(16, 16), (8, 8)], strides, "cpu")
    flat_strides = [8] * 256 + [16] * 64
    flat_ranges = [ranges[0]] * 256 + [ranges[1]] * 64
    for radius in (1.5, 0.0):
        want = brute_force_fcos(torch.cat(levels), flat_strides, flat_ranges, boxes, radius)
        assert fcos_assign(levels, strides, ranges, boxes, radius).tolist() == want


def test_fcos_losses_have_known_values_for_zero_outputs():
    """Zero outputs: every box degenerates to its point (GIoU loss exactly 1), centerness logits 0
    (BCE exactly log 2), focal loss p = 0.5 everywhere: closed forms over the positives."""
    model = tiny_model("fcos")
    outputs = zeros_like_outputs(model)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 100.0]]),
                "labels": torch.tensor([0, 2])}]
    losses = model.losses(outputs, targets, torch.zeros(1, 3, 128, 128))
    points = make_points([tuple(m.shape[-2:]) for m in outputs[0]], model.strides, "cpu")
    pos = int((fcos_assign(points, model.strides, model.ranges, targets[0]["boxes"], 1.5) >= 0).sum())
    total = sum(p.shape[0] for p in points) * K
    assert losses["loss_box"].item() == pytest.approx(1.0, abs=1e-6)
    assert losses["loss_ctr"].item() == pytest.approx(LOG2, abs=1e-6)
    focal = ((total - pos) * 0.75 + pos * 0.25) * 0.25 * LOG2 / pos
    assert losses["loss_cls"].item() == pytest.approx(focal, rel=1e-5)


# --------------------------------------------------------------------------------------- RetinaNet
def test_retinanet_anchors_nine_per_location():
    cfg = RetinaNetConfig()
    (a,) = make_anchors([(2, 3)], [8], cfg, "cpu")
    assert a.shape == (2 * 3 * 9, 4)
    first = a[:9]
    wh = first[:, 2:] - first[:, :2]
    sizes = (wh[:, 0] * wh[:, 1]).sqrt()
    torch.testing.assert_close(sizes[:3], torch.tensor([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]))
    torch.testing.assert_close(wh[::3, 1] / wh[::3, 0], torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close((first[:, :2] + first[:, 2:]) / 2, torch.zeros(9, 2))  # centre at i * s, offset 0
    torch.testing.assert_close(a[9:18] - a[:9], torch.tensor([8.0, 0, 8, 0]).expand(9, 4))  # next x


def test_retinanet_matcher_thresholds():
    matcher = RetinaNet(tiny_backbone(), RetinaNetConfig(num_classes=K), 128).matcher
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 6.0],    # IoU 0.6  -> positive
        [0.0, 0.0, 10.0, 4.5],    # IoU 0.45 -> ignored
        [0.0, 0.0, 10.0, 3.0],    # IoU 0.3  -> background
        [50.0, 50.0, 60.0, 60.0],  # no overlap -> background
    ])
    assert match_anchors(matcher, anchors, gt).tolist() == [0, -2, -1, -1]
    # a box whose best anchor is below 0.4 still gets it (low-quality match)
    assert match_anchors(matcher, anchors[2:], gt).tolist() == [0, -1]
    assert match_anchors(matcher, anchors, torch.zeros(0, 4)).tolist() == [-1] * 4


def test_retinanet_losses_are_normalised_by_the_positives_of_the_whole_batch(monkeypatch):
    model = tiny_model("retinanet")
    outputs = tuple([torch.cat([m, m]) for m in maps] for maps in zeros_like_outputs(model))
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [60.0, 60.0, 120.0, 110.0], [0.0, 70.0, 30.0, 128.0]]),
                "labels": torch.tensor([0, 2, 2])}]
    anchors = torch.cat(model.grids(outputs, torch.zeros(2, 3, 128, 128)))
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    pos, neg, l1 = 0, 0, 0.0
    for t in targets:
        m = match_anchors(model.matcher, anchors, t["boxes"])
        pos += int((m >= 0).sum())
        neg += int((m == -1).sum())
        l1 += coder.encode_single(t["boxes"][m[m >= 0]], anchors[m >= 0]).abs().sum().item()
    # per valid anchor, K focal terms at p = 0.5: 0.25 * log 2 * alpha_t
    cls_sum = (neg * K * 0.75 + pos * ((K - 1) * 0.75 + 0.25)) * 0.25 * LOG2
    batch = torch.zeros(2, 3, 128, 128)
    losses = model.losses(outputs, targets, batch)
    assert losses["loss_cls"].item() == pytest.approx(cls_sum / pos, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(l1 / pos, rel=1e-5)
    # the normaliser is the all-rank average of the positives: a stand-in world reports 40
    monkeypatch.setattr(rn_mod, "reduce_mean", lambda v: torch.full_like(v, 40.0))
    assert model.losses(outputs, targets, batch)["loss_box"].item() == pytest.approx(l1 / 40, rel=1e-5)


# --------------------------------------------------------------------------------------- RepPoints
def test_point_assigner_levels_nearest_point_and_conflicts():
    strides = [8, 16]
    levels = make_points([(8, 8), (4, 4)], strides, "cpu")
    points = torch.cat(levels)
    stride = torch.tensor([8.0] * 64 + [16.0] * 16)
    boxes = torch.tensor([
        [5.0, 5.0, 37.0, 37.0],    # 32 x 32 -> level 3, centre (21, 21): nearest P3 point (20, 20)
        [0.0, 0.0, 64.0, 64.0],    # 64 x 64 -> level 4, centre (32, 32): P4 points tie at (24|40, 24|40)
        [0.0, 50.0, 100.0, 70.0],  # 100 x 20 -> mean(log2 25, log2 5) = 3.48 -> level 3; nearest (52, 60)
    ])
    got = point_assign(points, stride, boxes, scale=4, pos_num=1)
    assert int((got >= 0).sum()) == 3
    where = {int(g): tuple(points[i].tolist()) + (int(stride[i]),) for i, g in enumerate(got) if g >= 0}
    assert where[0] == (20.0, 20.0, 8)
    assert where[1][2] == 16 and where[1][:2] in {(24.0, 24.0), (40.0, 24.0), (24.0, 40.0), (40.0, 40.0)}
    assert where[2] == (52.0, 60.0, 8)
    # two boxes wanting the same point: the nearer one (in box units) keeps it, the other gets none
    pair = torch.tensor([[4.0, 4.0, 36.0, 36.0], [5.0, 5.0, 37.0, 37.0]])  # centres (20, 20) and (21, 21)
    got = point_assign(points, stride, pair, scale=4, pos_num=1)
    assert got.tolist().count(0) == 1 and got.tolist().count(1) == 0


def test_moment_points_to_box_and_transfer_gradient():
    d, cx, cy = 10.0, 50.0, 30.0
    r = torch.tensor([-d, 0.0, d])
    ys, xs = torch.meshgrid(cy + r * 2, cx + r, indexing="ij")  # spread twice as far in y
    pts = torch.stack([ys, xs], -1).reshape(1, 18)  # (y, x) pairs
    transfer = torch.zeros(2, requires_grad=True)
    box = points_to_boxes(pts, transfer, 0.01)[0]
    half = d * math.sqrt(6 / 8)  # unbiased std of {-d, 0, d} x 3
    torch.testing.assert_close(box, torch.tensor([cx - half, cy - 2 * half, cx + half, cy + 2 * half]), atol=1e-4,
                               rtol=0)
    box[2].backward()  # d(x1)/d(t_w) = half_w, scaled by moment_mul
    assert transfer.grad[0].item() == pytest.approx(0.01 * half, rel=1e-4)
    wider = points_to_boxes(pts, torch.tensor([math.log(2.0), 0.0]), 0.01)[0]
    assert (wider[2] - wider[0]).item() == pytest.approx(4 * half, rel=1e-4)
    # nine coincident points: a zero-size box with a finite gradient
    same = torch.full((1, 18), 5.0, requires_grad=True)
    points_to_boxes(same, torch.zeros(2), 0.01).sum().backward()
    assert torch.isfinite(same.grad).all()


def test_refine_max_iou_assign():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 4.5], [0.0, 0.0, 10.0, 3.0], [50, 50, 60, 60.0]])
    # box 1 overlaps nothing: it claims no proposal (mmdet's min_pos_iou = 0 would hand it all)
    assert max_iou_assign(boxes, gt, 0.5, 0.4).tolist() == [0, IGNORE, BACKGROUND, BACKGROUND]
    assert max_iou_assign(boxes[1:], gt, 0.5, 0.4).tolist() == [0, BACKGROUND, BACKGROUND]  # low-quality
    assert max_iou_assign(boxes, torch.zeros(0, 4), 0.5, 0.4).tolist() == [BACKGROUND] * 4


def test_init_points_feed_the_dcn_with_a_tenth_of_the_gradient():
    grads = []
    for mul in (0.1, 1.0):
        torch.manual_seed(0)
        head = RepPointsHead(16, RepPointsConfig(num_classes=K, tower_gn_groups=8, gradient_mul=mul), "torchvision")
        logits, _, _ = head([torch.randn(1, 16, 8, 8)])
        logits[0].sum().backward()  # reaches the init points only through the DCN offsets
        grads.append(head.pts_init_out.weight.grad.clone())
    torch.testing.assert_close(grads[0], 0.1 * grads[1], rtol=1e-4, atol=1e-9)


def test_reppoints_losses_normalised_and_weighted():
    model = tiny_model("reppoints")
    outputs = zeros_like_outputs(model)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}]
    losses = model.losses(outputs, targets, torch.zeros(1, 3, 128, 128))
    assert set(losses) == {"loss_cls", "loss_pts_init", "loss_pts_refine"}
    # zero points: every box is a ~0-size box at its location; one init positive at stride 8 (a 40x48 box)
    centre = torch.tensor([28.0, 36.0])  # the P3 location nearest the box centre (30, 36)
    box = torch.tensor([10.0, 12.0, 50.0, 60.0])
    pred = torch.cat([centre, centre])
    expected = torch.nn.functional.smooth_l1_loss(pred / 32, box / 32, beta=0.11, reduction="sum")
    assert losses["loss_pts_init"].item() == pytest.approx(0.5 * expected.item(), rel=1e-3)


# --------------------------------------------------------------------------------------- Faster R-CNN
def test_roi_task_attention_shapes_and_start():
    attn = RoITaskAttention(16, 7)
    x = torch.randn(5, 16, 7, 7)
    out = attn(x)
    assert out.shape == (5, 16 * 49) and attn.out_features == 16 * 49
    torch.testing.assert_close(out, torch.relu(x).flatten(1))  # DyReLU starts as ReLU
    # per-RoI coefficients: changing one RoI leaves the others' outputs alone
    attn.attn.fc2.weight.data.normal_()
    y = x.clone()
    y[0] *= 3
    torch.testing.assert_close(attn(y)[1:], attn(x)[1:])
    assert RoITaskAttention(16, 7, task=False)(x).shape == (5, 784)


def test_faster_rcnn_placements():
    paper, official = tiny_model("faster_rcnn-paper", 2), tiny_model("faster_rcnn-official", 2)
    assert isinstance(paper.roi_heads.box_head, RoITaskAttention)
    assert all(b.task_attn is None for b in paper.dyhead.blocks)  # pi_L, pi_S only before pooling
    assert isinstance(official.roi_heads.box_head, TwoMLPHead)
    assert all(b.task_attn is not None for b in official.dyhead.blocks)
    baseline = tiny_model("faster_rcnn")
    assert isinstance(baseline.roi_heads.box_head, TwoMLPHead) and baseline.dyhead is None


def test_retinanet_placements():
    """Fig. 2b drops both towers; the official config keeps its 4-conv towers after the blocks."""
    convs = lambda tower: sum(isinstance(m, torch.nn.Conv2d) for m in tower)  # noqa: E731
    baseline, paper, official = tiny_model("retinanet"), tiny_model("retinanet", 2), tiny_model("retinanet-official", 2)
    assert baseline.head.dyhead is None and convs(baseline.head.cls_tower) == convs(baseline.head.reg_tower) == 4
    assert len(paper.head.dyhead.blocks) == 2 and convs(paper.head.cls_tower) == convs(paper.head.reg_tower) == 0
    assert len(official.head.dyhead.blocks) == 2 and convs(official.head.cls_tower) == convs(official.head.reg_tower) == 4
    with pytest.raises(ValueError, match="placement: unknown value 'before'"):
        RetinaNet(tiny_backbone(), RetinaNetConfig(num_classes=K, placement="before"), 128, tiny_dyhead(1))


# --------------------------------------------------------------------------------------- forward passes
MODELS = [(name, blocks) for name in ("retinanet", "fcos", "reppoints", "faster_rcnn") for blocks in (0, 1)]


@pytest.mark.parametrize("name, blocks", MODELS + [("faster_rcnn-official", 1), ("retinanet-official", 1)])
def test_train_and_eval_forward(name, blocks):
    torch.manual_seed(0)
    model = tiny_model(name, blocks)
    images = [torch.rand(3, 100, 120), torch.rand(3, 128, 90)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 5.0, 118.0, 95.0]]),
                "labels": torch.tensor([2, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        assert len(o["boxes"]) == len(o["scores"]) == len(o["labels"]) <= 100
        if len(o["boxes"]):
            assert o["boxes"][:, 2].max() <= im.shape[2] and o["boxes"][:, 3].max() <= im.shape[1]
            assert o["labels"].min() >= 0 and o["labels"].max() < K


# --------------------------------------------------------------------------------------- COCO decoding
GT = [(1, [8.0, 10.0, 40.0, 30.0]), (2, [60.0, 50.0, 58.0, 70.0])]  # (label, xywh) in one 128x128 image


@pytest.fixture
def coco_gt(tmp_path):
    anns = [{"id": i + 1, "image_id": 1, "category_id": lab + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (lab, b) in enumerate(GT)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 128, "height": 128}],
                                "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    return COCO(str(path))


def gt_xyxy():
    return torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in GT])


def level_of(model, index):
    """(level, location) of a flat (level, y, x) index."""
    for lvl, s in enumerate(model.strides):
        n = (128 // s) ** 2
        if index < n:
            return lvl, index
        index -= n


def set_at(maps, lvl, loc, values):
    w = maps[lvl].shape[-1]
    maps[lvl][0, :, loc // w, loc % w] = values


def hand_outputs_retinanet(model):
    logits, deltas = zeros_like_outputs(model)
    for m in logits:
        m.fill_(-10.0)
    anchors = torch.cat(model.grids((logits,), torch.zeros(1)))
    a = model.cfg.num_anchors
    for (lab, _), box in zip(GT, gt_xyxy()):
        best = int(torch.argmax(rn_mod.box_iou(box[None], anchors)))
        lvl, idx = level_of(model, best // a)
        code = model.box_coder.encode_single(box[None], anchors[best][None])[0]
        k = best % a
        w = logits[lvl].shape[-1]
        logits[lvl][0, k * K + lab, idx // w, idx % w] = 10.0
        deltas[lvl][0, k * 4 : k * 4 + 4, idx // w, idx % w] = code
    return logits, deltas


def hand_outputs_fcos(model):
    logits, ltrb, ctr = zeros_like_outputs(model)
    for m in logits:
        m.fill_(-10.0)
    points = torch.cat(make_points([tuple(m.shape[-2:]) for m in logits], model.strides, "cpu"))
    matched = fcos_assign(make_points([tuple(m.shape[-2:]) for m in logits], model.strides, "cpu"),
                          model.strides, model.ranges, gt_xyxy(), 1.5)
    for g, ((lab, _), box) in enumerate(zip(GT, gt_xyxy())):
        i = int(torch.where(matched == g)[0][0])
        lvl, loc = level_of(model, i)
        s = model.strides[lvl]
        x, y = points[i].tolist()
        dist = torch.tensor([x - box[0], y - box[1], box[2] - x, box[3] - y]) / s
        set_at(logits, lvl, loc, torch.tensor([10.0 if k == lab else -10.0 for k in range(K)]))
        set_at(ltrb, lvl, loc, dist)
        set_at(ctr, lvl, loc, torch.tensor([10.0]))
    return logits, ltrb, ctr


def hand_outputs_reppoints(model):
    logits, pts_init, pts_refine = zeros_like_outputs(model)
    for m in logits:
        m.fill_(-10.0)
    points = torch.cat(make_points([tuple(m.shape[-2:]) for m in logits], model.strides, "cpu"))
    for (lab, _), box in zip(GT, gt_xyxy()):
        i = int(torch.argmin(((points - (box[:2] + box[2:]) / 2) ** 2).sum(1)))  # a P3 location
        lvl, loc = level_of(model, i)
        s = model.strides[lvl]
        c = (box[:2] + box[2:]) / 2
        half = (box[2:] - box[:2]) / 2 / math.sqrt(6 / 8)  # grid spacing whose unbiased std is half the size
        r = torch.tensor([-1.0, 0.0, 1.0])
        ys, xs = torch.meshgrid(c[1] + r * half[1], c[0] + r * half[0], indexing="ij")
        yx = torch.stack([ys, xs], -1).reshape(-1)
        set_at(pts_refine, lvl, loc, (yx - points[i].flip(0).repeat(9)) / s)
        set_at(logits, lvl, loc, torch.tensor([10.0 if k == lab else -10.0 for k in range(K)]))
    return logits, pts_init, pts_refine


def hand_outputs_faster_rcnn(model):
    proposals = [gt_xyxy()]
    logits = torch.full((2, K + 1), -10.0)
    for r, (lab, _) in enumerate(GT):
        logits[r, lab + 1] = 10.0
    return proposals, logits, torch.zeros(2, 4 * (K + 1))


@pytest.mark.parametrize("name", ["retinanet", "fcos", "reppoints", "faster_rcnn"])
def test_hand_set_outputs_decode_to_ap_100(name, coco_gt):
    model = tiny_model(name).eval()
    outputs = globals()[f"hand_outputs_{name}"](model)
    (res,) = model.postprocess(outputs, [(128, 128)], torch.zeros(1, 3, 128, 128))
    assert sorted(res["labels"].tolist()) == sorted(lab for lab, _ in GT)
    results = to_coco_results(res, {"image_id": 1}, lambda lab: lab + 1)
    metrics = coco_metrics(coco_gt, results, area_ranges={"small": [0, 32**2], "medium": [32**2, 96**2],
                                                          "large": [96**2, 1e10]})
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------- FLOPs
def test_flops_count_the_reppoints_dcn(monkeypatch):
    with torch.device("meta"):
        model = tiny_model("reppoints").eval()
    counted = count_gmacs(model, (128, 128))["gmacs"]
    # The same count with each deformable conv replaced by an output of its shape and no work
    from dyhead.modeling.detectors import reppoints

    def no_work(x, offset, mask, weight, *args, **kwargs):
        return x.new_empty(x.shape[0], weight.shape[0], *x.shape[2:])

    monkeypatch.setattr(reppoints, "deform_conv2d", no_work)
    without = count_gmacs(model, (128, 128))["gmacs"]
    locations = sum((128 // s) ** 2 for s in (8, 16, 32, 64, 128))
    dcn = 2 * locations * 16 * 16 * 9  # cls and refine DCNs, 16 -> 16 channels, 3x3, stride 1
    assert counted - without == pytest.approx(dcn / 1e9, rel=1e-6)


def test_flops_of_faster_rcnn_cover_1000_rois():
    with torch.device("meta"):
        model = tiny_model("faster_rcnn").eval()
    parts = count_gmacs(model, (128, 128))["parts_gmacs"]
    rep = 4 * 16
    per_roi = 16 * 49 * rep + rep * rep + rep * (K + 1) * 5
    assert parts["roi_heads"] == pytest.approx(1000 * per_roi / 1e9, rel=1e-6)
    assert parts["rpn"] > 0 and parts["backbone"] > 0


# --------------------------------------------------------------------------------------- registry, params
def test_registry_matches_the_schema_and_builds_every_table3_experiment():
    schema = yaml.safe_load((REPO / "dyhead/schemas/experiments.schema.yaml").read_text())
    enum = schema["properties"]["experiments"]["additionalProperties"]["properties"]["detector"]["enum"]
    assert set(build.DETECTORS) == set(enum)
    matrix = load_matrix(REPO)
    exps = matrix.table_experiments("table3")
    assert len(exps) == 12 and {"atss-r50-base-1x", "atss-r50-dyh6-LSC-1x"} <= set(exps)
    for exp in exps:
        model = build.build_detector(resolve(exp, "tiny", REPO), 3, "torchvision", load_weights=False)
        assert type(model).__name__.lower().replace("fasterrcnn", "faster_rcnn") == exp.split("-")[0]
    for exp in ("faster_rcnn-r50-dyh6-LSC-official-1x", "retinanet-r50-dyh6-LSC-official-1x"):
        assert build.build_detector(resolve(exp, "tiny", REPO), 3, "torchvision").cfg.placement == "official"
    atss = resolve("atss-r50-dyh6-LSC-1x", "tiny", REPO)
    atss = replace(atss, spec={**atss.spec, "placement": "official"})
    with pytest.raises(DyheadError, match="placement applies to faster_rcnn and retinanet only, not 'atss'"):
        build.build_detector(atss, 3, "torchvision")


def test_canonical_id_names_a_non_default_placement():
    spec = {"detector": "faster_rcnn", "backbone": "r50", "schedule": "1x", "head": {"blocks": 6}}
    assert canonical_id(spec) == "faster_rcnn-r50-dyh6-LSC-1x"
    assert canonical_id({**spec, "placement": "paper"}) == "faster_rcnn-r50-dyh6-LSC-1x"
    assert canonical_id({**spec, "placement": "official"}) == "faster_rcnn-r50-dyh6-LSC-official-1x"


def test_table3_report_pairs_rows_and_says_where_dyhead_helps(repo_copy):
    from dyhead.report.results import collect
    from dyhead.report.tables import render_table

    matrix = load_matrix()
    table = matrix.tables["table3"]
    for row in table["rows"]:
        exp, base = row["experiment"], row["label"]["DyHead"] == ""
        ap = 20.0 if base else (23.0 if row["label"]["detector"] != "FCOS" else 18.5)
        lr = 0.01 if exp.startswith("retinanet") else 0.02  # as the lr_scale override trains them
        write_fake_run(repo_copy, "mini", exp, ap, gmacs=200.0 + len(exp), base_lr=lr, iterations=5,
                       spec=matrix.experiments[exp])
    text = render_table("table3", matrix, "mini", collect("mini", matrix, repo_copy / "runs"))
    assert "| Faster R-CNN | ✓ official | " in text
    row = next(line for line in text.splitlines() if line.startswith("| FCOS | ✓ |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{200.0 + len('fcos-r50-dyh6-LSC-1x'):.2f}"  # absolute GFLOPs
    assert cells[3:5] == ["18.50", "40.00"]  # AP, ours and the paper's
    assert cells[5:7] == ["-1.50", "+1.20"]  # gain against FCOS's own baseline, ours and the paper's
    assert "it does not for FCOS (-1.50)" in text
    assert "RetinaNet (+3.00)" in text and "Faster R-CNN official (+3.00)" in text
    assert "RetinaNet official (+3.00)" in text
    assert "backbones from `dyhead pretrain` (object-crop classification on the training split)" in text
    assert ("Base lr 0.01 for `retinanet-r50-base-1x`, `retinanet-r50-dyh6-LSC-1x`, "
            "`retinanet-r50-dyh6-LSC-official-1x`.") in text


def test_per_experiment_lr_scale_holds_under_every_profile():
    """RetinaNet trains at half the profile's lr everywhere; gradients are clipped on mini only."""
    for profile in ("coco", "mini", "tiny"):
        base = resolve("fcos-r50-base-1x", profile, REPO).profile["solver"]["base_lr"]
        for exp in ("retinanet-r50-base-1x", "retinanet-r50-dyh6-LSC-1x", "retinanet-r50-dyh6-LSC-official-1x",
                    "retinanet-r50-dyh6-LSC-3x"):
            solver = resolve(exp, profile, REPO).profile["solver"]
            assert solver["base_lr"] == pytest.approx(base * 0.5)
            assert solver.get("clip_grad_norm") == (10 if profile == "mini" else None)
    assert resolve("retinanet-r50-base-1x", "coco", REPO).profile["solver"]["base_lr"] == pytest.approx(0.01)
    assert "clip_grad_norm" not in resolve("fcos-r50-base-1x", "mini", REPO).profile["solver"]


def test_table3_trains_3x_on_mini_and_the_papers_1x_elsewhere():
    mini, coco = load_matrix(REPO, "mini"), load_matrix(REPO, "coco")
    assert coco.table_experiments("table3") == load_matrix(REPO).table_experiments("table3")
    assert all(e.endswith("-1x") for e in coco.table_experiments("table3"))
    three = mini.table_experiments("table3")
    assert len(three) == 12 and all(e.endswith("-3x") for e in three)
    assert [r["paper_experiment"] for r in mini.tables["table3"]["rows"]] == coco.table_experiments("table3")
    assert mini.tables_of("atss-r50-base-3x") == ["table3"]
    assert "table3" not in mini.tables_of("atss-r50-base-1x") and "table3" in coco.tables_of("atss-r50-base-1x")
    # the 3x experiments are real experiments under any profile (FLOPs are counted on coco)
    assert resolve("atss-r50-base-3x", "mini", REPO).max_iter == 3000
    assert resolve("atss-r50-base-3x", "coco", REPO).max_iter == 270000
    # Tables 1-2 keep mini's 1x
    assert all(e.endswith("-1x") or e.endswith("-seed1") for e in mini.table_experiments("table2"))


def test_profile_schedule_must_not_contradict_an_experiment(repo_copy):
    exps = yaml.safe_load((repo_copy / "params/experiments.yaml").read_text())
    exps["experiments"]["fcos-r50-base-3x"] = {"detector": "fcos", "backbone": "r50", "schedule": "3x",
                                                "head": {"blocks": 0}, "seed": 0, "solver": {"lr_scale": 2.0}}
    (repo_copy / "params/experiments.yaml").write_text(yaml.safe_dump(exps))
    with pytest.raises(DyheadError, match=r"table3\.profile_schedule\.mini: fcos-r50-base-1x at 3x is fcos-r50-base-3x"):
        load_matrix(repo_copy, "mini")


def test_profile_schedule_names_a_known_profile(repo_copy):
    text = (repo_copy / "params/tables.yaml").read_text().replace("profile_schedule: {mini: 3x}", "profile_schedule: {mni: 3x}")
    (repo_copy / "params/tables.yaml").write_text(text)
    with pytest.raises(DyheadError, match=r"tables.yaml: table3.profile_schedule.mni: no params/profiles/mni.yaml"):
        load_matrix(repo_copy)


def test_faster_rcnn_rois_per_image_from_the_profile():
    from dyhead.modeling.build import build_detector

    for profile, rois in (("mini", 128), ("tiny", 512)):
        model = build_detector(resolve("faster_rcnn-r50-base-1x", profile, REPO), 3, "torchvision", load_weights=False)
        assert model.roi_heads.fg_bg_sampler.batch_size_per_image == rois


def test_profile_lr_scale_touches_only_the_named_profile():
    """The deep 2x stand-ins train at half the lr on mini; the coco profile keeps the paper's 0.02."""
    assert resolve("atss-r101-dyh6-LSC-2x", "coco", REPO).profile["solver"]["base_lr"] == pytest.approx(0.02)
    mini = resolve("atss-r50-base-1x", "mini", REPO).profile["solver"]["base_lr"]
    assert resolve("atss-r101-dyh6-LSC-2x", "mini", REPO).profile["solver"]["base_lr"] == pytest.approx(mini / 2)


def test_plain_head_init_paper_on_coco_he_on_mini():
    """RetinaNet's norm-free towers: the paper's normal(0, 0.01) on coco, He init on mini."""
    from dyhead.modeling.detectors.retinanet import plain_tower

    torch.manual_seed(0)
    paper, gain = plain_tower(256, 1, "paper")[0].weight, plain_tower(32, 1, "gain")[0].weight
    assert paper.std().item() == pytest.approx(0.01, rel=0.02)
    assert gain.std().item() == pytest.approx(math.sqrt(2 / (9 * 32)), rel=0.05)
    with pytest.raises(ValueError, match="plain_head_init"):
        plain_tower(32, 1, "xavier")
    assert resolve("retinanet-r50-base-1x", "mini", REPO).profile["model"]["plain_head_init"] == "gain"
    assert resolve("retinanet-r50-base-1x", "coco", REPO).profile["model"].get("plain_head_init", "paper") == "paper"


# ---------------------------------------------------------------------- the coupling control (ours)
def test_coupling_control_towers_depth_and_sharing():
    """tower_convs / tower_shared build the control's heads; a shared tower runs once and is one module."""
    assert canonical_id({"detector": "atss", "backbone": "r50", "schedule": "1x",
                         "head": {"blocks": 0, "tower_convs": 6, "tower_shared": True}}) == "atss-r50-tower6shared-1x"
    assert canonical_id({"detector": "atss", "backbone": "r50", "schedule": "1x",
                         "head": {"blocks": 0, "tower_convs": 4, "tower_shared": False}}) == "atss-r50-base-1x"
    convs = lambda tower: sum(isinstance(m, torch.nn.Conv2d) for m in tower)  # noqa: E731
    heads = {}
    for exp in load_matrix(REPO).table_experiments("coupling"):
        if "dyh" not in exp:
            heads[exp] = build.build_detector(resolve(exp, "tiny", REPO), 3, "torchvision", load_weights=False).head
    assert (convs(heads["atss-r50-base-1x"].cls_tower), convs(heads["atss-r50-tower6-1x"].reg_tower)) == (4, 6)
    assert heads["atss-r50-base-1x"].cls_tower is not heads["atss-r50-base-1x"].reg_tower
    shared = heads["atss-r50-tower6shared-1x"]
    assert shared.cls_tower is shared.reg_tower and convs(shared.cls_tower) == 6
    calls = []
    shared.cls_tower.register_forward_hook(lambda *args: calls.append(1))
    shared([torch.randn(1, shared.cls_logits.in_channels, 8, 8)])
    assert len(calls) == 1  # the reg branch reuses the cls feature instead of running the tower again


def test_tower_options_are_refused_outside_the_atss_baseline(repo_copy):
    path = repo_copy / "params/experiments.yaml"
    data = yaml.safe_load(path.read_text())
    data["experiments"]["atss-r50-dyh2-LSC-1x"]["head"]["tower_shared"] = True
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(Exception, match=r"experiments.atss-r50-dyh2-LSC-1x.head.tower_shared: applies to the ATSS"):
        load_matrix()


def test_control_report_is_headed_as_ours_with_its_note(repo_copy):
    from dyhead.report.results import collect
    from dyhead.report.tables import render_table

    matrix = load_matrix()
    for i, exp in enumerate(matrix.table_experiments("coupling")):
        write_fake_run(repo_copy, "mini", exp, 20.0 - i, gmacs=250.0 + i, iterations=5, spec=matrix.experiments[exp])
    text = render_table("coupling", matrix, "mini", collect("mini", matrix, repo_copy / "runs"))
    assert text.startswith("# Control (coupling): Coupled head or attention?")
    assert "Not a table of the paper." in text
    row = next(line for line in text.splitlines() if line.startswith("| shared | 6 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:5] == ["+3.00", "–"]  # FLOPs change against the baseline; the paper has no such row
    assert cells[6:10] == ["17.00", "–", "-3.00", "–"]  # AP (ours, paper), AP gain (ours, paper)


def test_reports_say_where_the_backbones_start():
    from dyhead.config import load_profile
    from dyhead.report.text import backbone_start

    assert backbone_start(load_profile("coco", REPO)) == "backbones from ImageNet weights"
    assert backbone_start(load_profile("mini", REPO)).startswith("backbones from `dyhead pretrain`")
    assert backbone_start({"model": {"backbones": {"r50": {}}}}) == "backbones from random weights"

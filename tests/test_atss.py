"""ATSS: anchors, assignment on hand-built cases, box coding, losses and inference."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from dyhead.modeling.backbone import BackboneConfig, BackboneWithFPN
from dyhead.modeling.detectors.atss import ATSS, ATSSConfig, atss_assign, centerness_target, make_anchors
from dyhead.modeling.dyhead import DyHead, DyHeadConfig


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def brute_force_assign(levels, gts, topk):
    """ATSS written as plain loops, straight from the paper's Algorithm 1."""
    anchors = [a.tolist() for lvl in levels for a in lvl]
    best = [(-1.0, -1)] * len(anchors)
    for g, gt in enumerate(gts.tolist()):
        gc = ((gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2)
        cands, start = [], 0
        for lvl in levels:
            d = []
            for j, a in enumerate(lvl.tolist()):
                ac = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
                d.append((math.dist(ac, gc), start + j))
            cands += [j for _, j in sorted(d)[: min(topk, len(d))]]
            start += len(lvl)
        ious = [iou(anchors[j], gt) for j in cands]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for j, v in zip(cands, ious):
            a = anchors[j]
            cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            inside = min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > 0.01
            if v >= mean + std and inside and v > best[j][0]:
                best[j] = (v, g)
    return [g for _, g in best]


def small_levels():
    return make_anchors([(8, 8), (4, 4), (2, 2)], [8, 16, 32], 8.0, "cpu")


def test_anchors_are_centred_squares_of_8_strides():
    (a,) = make_anchors([(2, 3)], [16], 8.0, "cpu")
    assert a.shape == (6, 4)
    # first location centred at (8, 8), size 128
    assert a[0].tolist() == [8 - 64, 8 - 64, 8 + 64, 8 + 64]
    # (level, y, x) order: second anchor is one stride to the right
    assert a[1, 0] - a[0, 0] == 16


def test_assignment_matches_brute_force_on_hand_built_boxes():
    levels = small_levels()
    gts = torch.tensor([[4.0, 4.0, 28.0, 36.0], [30.0, 10.0, 62.0, 60.0], [0.0, 0.0, 64.0, 64.0], [40, 40, 46, 47.0]])
    got = atss_assign(levels, gts, topk=9).tolist()
    assert got == brute_force_assign(levels, gts, 9)
    assert all(g >= 0 for g in [got.count(i) > 0 and i for i in range(3)])  # the three large boxes get positives


def test_assignment_random_cases_match_brute_force():
    g = torch.Generator().manual_seed(0)
    levels = small_levels()
    for _ in range(20):
        xy = torch.rand(5, 2, generator=g) * 48
        wh = torch.rand(5, 2, generator=g) * 40 + 3
        gts = torch.cat([xy, xy + wh], 1)
        assert atss_assign(levels, gts, 9).tolist() == brute_force_assign(levels, gts, 9)


def test_box_equal_to_an_anchor_claims_it_and_centres_outside_never_do():
    levels = small_levels()
    anchors = torch.cat(levels)
    gt = anchors[70:71].clone()  # a level-1 anchor, clipped nowhere
    matched = atss_assign(levels, gt, 9)
    assert matched[70] == 0
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    inside = (ctr > gt[0, :2]).all(1) & (ctr < gt[0, 2:]).all(1)
    assert not (matched[~inside] >= 0).any()


def test_anchor_claimed_twice_goes_to_highest_iou():
    levels = [make_anchors([(1, 1)], [8], 8.0, "cpu")[0]]  # one anchor [-28,-28,36,36]
    gts = torch.tensor([[-20.0, -20.0, 30.0, 30.0], [-28.0, -28.0, 36.0, 36.0]])
    assert atss_assign(levels, gts, 9).tolist() == [1]


def test_no_boxes_means_all_background():
    matched = atss_assign(small_levels(), torch.zeros(0, 4), 9)
    assert (matched == -1).all() and matched.numel() == 84


def test_box_coding_round_trip():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    g = torch.Generator().manual_seed(1)
    anchors = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat([anchors, anchors + 10 + torch.rand(50, 2, generator=g) * 60], 1)
    boxes = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(50, 2, generator=g) * 80], 1)
    codes = coder.encode_single(boxes, anchors)
    torch.testing.assert_close(coder.decode_single(codes, anchors), boxes, rtol=0, atol=1e-3)


def test_centerness_target():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0]])  # centres (10,10), (4,4)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 16.0, 8.0]])
    ctr = centerness_target(anchors, boxes)
    assert ctr[0] == pytest.approx(1.0)
    assert ctr[1] == pytest.approx(math.sqrt((4 / 12) * 1.0))


def tiny_model(blocks):
    bb = BackboneWithFPN(BackboneConfig(depths=(1, 1, 1, 1), base_width=8, norm="bn", freeze_at=0, fpn_channels=16))
    dy = DyHead(DyHeadConfig(blocks=blocks, channels=16, gn_groups=8)) if blocks else None
    return ATSS(bb, ATSSConfig(num_classes=3, tower_gn_groups=8), 128, dy)


@pytest.mark.parametrize("blocks", [0, 2])
def test_atss_train_and_eval_forward(blocks):
    torch.manual_seed(0)
    model = tiny_model(blocks)
    images = [torch.rand(3, 100, 120), torch.rand(3, 128, 90)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        assert o["boxes"].shape[1] == 4 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"]) <= 100
        if len(o["boxes"]):  # boxes are clipped to the unpadded image
            assert o["boxes"][:, 2].max() <= im.shape[2] and o["boxes"][:, 3].max() <= im.shape[1]


def test_prior_initialisation_of_classifier():
    model = tiny_model(0)
    assert model.head.cls_logits.bias[0].item() == pytest.approx(-4.595, abs=1e-3)


def test_inference_decodes_a_confident_prediction():
    """A hand-set head output: one location confident for class 1 with zero deltas -> its anchor box."""
    model = tiny_model(0).eval()
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    logits = [torch.full((1, 3, h, w), -10.0) for h, w in sizes]
    deltas = [torch.zeros(1, 4, h, w) for h, w in sizes]
    ctr = [torch.full((1, 1, h, w), 10.0) for h, w in sizes]
    logits[1][0, 1, 3, 2] = 10.0  # level P4 (stride 16), y=3, x=2: centre (40, 56), size 128
    batch = torch.zeros(1, 3, 128, 128)
    (res,) = model.postprocess((logits, deltas, ctr), [(128, 128)], batch)
    assert res["labels"].tolist() == [1]
    torch.testing.assert_close(res["boxes"][0], torch.tensor([0.0, 0.0, 104.0, 120.0]))  # clipped anchor

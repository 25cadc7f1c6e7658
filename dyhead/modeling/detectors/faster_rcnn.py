"""Faster R-CNN with FPN (P2-P6), built from torchvision's RPN and RoI heads, with two DyHead placements.

Built on torchvision's Faster R-CNN parts. Baseline: RPN (3 anchors of
8 strides x ratios 0.5/1/2 per location; 32..512 on COCO), MultiScaleRoIAlign 7x7 on P2-P5, the
2-FC box head (TwoMLPHead, 1024 at 256 channels: 4 x the FPN width) and FastRCNNPredictor.
torchvision's own transform is not used: images arrive resized, and `Detector.preprocess`
normalises and pads them like every other detector here.

DyHead placements (`placement`):

* ``official`` -- microsoft/DynamicHead's configs: all blocks with full attention (L, S, C) on
  P2-P6 before the RPN, which with the RoI heads stays unchanged (2-FC head kept).
* ``paper`` -- Fig. 2c, which no released code implements. Our reading:
  1. the blocks run on P2-P6 with the scale- (pi_L) and spatial-aware (pi_S) attention only (their
     task attention switched off, so each block ends in a ReLU); the RPN and the RoI pooling both
     read this pyramid, as they share the FPN in the baseline.
  2. the RoI box head's two FC layers are replaced by task-aware attention (pi_C): one DyReLU on
     each pooled 7x7 RoI feature, its coefficients computed from that RoI's own average (the
     paper's pooling over L x S, where after RoI pooling L = 1 and S = 7 x 7), followed directly
     by the linear class and box predictors on the flattened 7x7xC feature.
  Why: this mirrors Fig. 2b exactly (attention blocks, then linear predictors at the end), keeps
  the head's only non-linearity input-dependent per RoI as pi_C intends, and costs less than the
  FCs it replaces (about 5 vs 14 GMACs for 1000 RoIs at 256 channels). Stacking several DyReLUs
  with no linear map between them would add little (each is a per-channel piecewise-linear map of
  the same channel), so there is one. The head's `task` switch turns pi_C off (flatten -> predictors).

The DyHead stack arrives built (dyhead.modeling.build decides it once: for ``paper`` with task attention
off); this module decides only the box head that goes with the placement.

`network` is backbone (+DyHead) + RPN head, and in eval mode also the proposal selection and the
RoI head, so it covers the whole two-stage computation. Training runs the RoI head in `losses`,
where proposals are sampled against the targets. FLOPs are counted on the meta device, where no
data-dependent selection can run: there `network` applies the RoI head to a fixed
`rpn_post_nms_top_n_test` = 1000 proposals per image (the RPN's test-time budget), so every
two-stage model is counted on the same number of RoIs. The RPN clips proposals to the padded batch
(`network` and `losses` see no per-image sizes); detections are clipped to each image in `postprocess`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

from dyhead.modeling.detectors.common import Detector
from dyhead.modeling.dyhead import DyReLU, check_placement


@dataclass(frozen=True)
class FasterRCNNConfig:
    num_classes: int = 80
    placement: str = "paper"
    roi_task_attention: bool = True  # paper placement with DyHead: pi_C on the RoI features (the head's `task`)
    anchor_scale: float = 8.0  # one size per level: 8 strides (32 px on P2)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000  # per level
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # per image
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    representation_size: int | None = None  # 2-FC head width; None: 4 x FPN channels (1024 at 256)
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


class RoITaskAttention(nn.Module):
    """pi_C in place of the box head's FC layers: DyReLU on each pooled RoI, then flatten."""

    def __init__(self, channels: int, resolution: int, task: bool = True):
        super().__init__()
        self.attn = DyReLU(channels) if task else None
        self.out_features = channels * resolution * resolution

    def forward(self, x: Tensor) -> Tensor:  # [R, C, S, S] -> [R, C * S * S]
        if self.attn is not None:
            x = self.attn(x)
        return x.flatten(start_dim=1)


class FasterRCNN(Detector):
    def __init__(self, backbone: nn.Module, cfg: FasterRCNNConfig, size_divisible: int,
                 dyhead: nn.Module | None = None):
        super().__init__(size_divisible)
        check_placement(cfg.placement)
        if backbone.levels[0] != 2:
            raise ValueError(f"Faster R-CNN needs pyramid levels P2-P6, got P{backbone.levels[0]}..")
        self.cfg = cfg
        self.backbone = backbone
        channels = backbone.out_channels
        paper = dyhead is not None and cfg.placement == "paper"
        self.dyhead = dyhead

        sizes = tuple((cfg.anchor_scale * s,) for s in backbone.strides)
        anchors = AnchorGenerator(sizes, (cfg.aspect_ratios,) * len(sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
            cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction,
            dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
            dict(training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test),
            cfg.rpn_nms_thresh,
        )

        res = cfg.roi_output_size
        if paper:
            box_head = RoITaskAttention(channels, res, task=cfg.roi_task_attention)
            width = box_head.out_features
        else:
            width = cfg.representation_size or 4 * channels
            box_head = TwoMLPHead(channels * res * res, width)
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign([str(i) for i in range(4)], res, cfg.roi_sampling_ratio),  # P2-P5
            box_head, FastRCNNPredictor(width, cfg.num_classes + 1),  # class 0 is background
            cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, cfg.box_batch_size_per_image, cfg.box_positive_fraction,
            None, cfg.score_thresh, cfg.nms_thresh, cfg.detections_per_img,
        )

    def features(self, batch: Tensor) -> OrderedDict:
        feats = self.backbone(batch)
        if self.dyhead is not None:
            feats = self.dyhead(feats)
        return OrderedDict((str(i), f) for i, f in enumerate(feats))

    def _rpn_decode(self, batch: Tensor, feats: OrderedDict, objectness, deltas):
        """Anchors, flat objectness / deltas, and all decoded boxes [N, A, 4], as torchvision's RPN does."""
        images = ImageList(batch, [tuple(batch.shape[-2:])] * batch.shape[0])
        anchors = self.rpn.anchor_generator(images, list(feats.values()))
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = self.rpn.box_coder.decode(deltas.detach(), anchors).view(batch.shape[0], -1, 4)
        return images, anchors, per_level, objectness, deltas, boxes

    def _propose(self, batch: Tensor, feats: OrderedDict, objectness, deltas) -> list[Tensor]:
        if batch.is_meta:  # FLOP counting: a fixed budget of RoIs (see the module docstring)
            return [batch.new_zeros((self.cfg.rpn_post_nms_top_n_test, 4))] * batch.shape[0]
        images, _, per_level, objectness, _, boxes = self._rpn_decode(batch, feats, objectness, deltas)
        proposals, _ = self.rpn.filter_proposals(boxes, objectness, images.image_sizes, per_level)
        return proposals

    def _box_branch(self, feats: OrderedDict, proposals: list[Tensor], batch: Tensor) -> tuple[Tensor, Tensor]:
        if batch.is_meta:  # RoIAlign has no multiply-adds in the convention; only its output shape matters
            c, s = feats["0"].shape[1], self.cfg.roi_output_size
            pooled = batch.new_empty((sum(len(p) for p in proposals), c, s, s))
        else:
            pooled = self.roi_heads.box_roi_pool(feats, proposals, [tuple(batch.shape[-2:])] * batch.shape[0])
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))

    def network(self, batch: Tensor):
        """Train: (features, objectness, deltas). Eval: (proposals, class logits, box deltas)."""
        feats = self.features(batch)
        objectness, deltas = self.rpn.head(list(feats.values()))
        if self.training:
            return feats, objectness, deltas
        proposals = self._propose(batch, feats, objectness, deltas)
        return (proposals, *self._box_branch(feats, proposals, batch))

    def losses(self, outputs, targets: list[dict], batch: Tensor) -> dict[str, Tensor]:
        feats, objectness, deltas = outputs
        images, anchors, per_level, objectness, deltas, boxes = self._rpn_decode(batch, feats, objectness, deltas)
        proposals, _ = self.rpn.filter_proposals(boxes, objectness, images.image_sizes, per_level)
        # torchvision's heads reserve label 0 for the background
        tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        labels, matched_boxes = self.rpn.assign_targets_to_anchors(anchors, tv_targets)
        regression_targets = self.rpn.box_coder.encode(matched_boxes, anchors)
        loss_objectness, loss_rpn_box = self.rpn.compute_loss(objectness, deltas, labels, regression_targets)
        _, roi_losses = self.roi_heads(feats, proposals, images.image_sizes, tv_targets)
        return {"loss_objectness": loss_objectness, "loss_rpn_box": loss_rpn_box,
                "loss_cls": roi_losses["loss_classifier"], "loss_box": roi_losses["loss_box_reg"]}

    @torch.no_grad()
    def postprocess(self, outputs, sizes: list[tuple[int, int]], batch: Tensor) -> list[dict]:
        proposals, class_logits, box_regression = outputs
        boxes, scores, labels = self.roi_heads.postprocess_detections(class_logits, box_regression, proposals, sizes)
        return [{"boxes": b, "scores": s, "labels": lab - 1} for b, s, lab in zip(boxes, scores, labels)]

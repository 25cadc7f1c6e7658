"""Build a detector from a resolved experiment (config in, nn.Module out).

The DyHead stack is decided here, once: `dyhead_module` builds it (or None for a baseline head) and
each builder hands it to its detector, which puts it where its placement says. `DETECTORS` maps the
experiment's `detector` name to a builder. Adding a detector: a module under detectors/ built on
detectors/common.py, one builder and one entry here, its name in the experiments schema's enum
(docs/architecture.md walks through it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from dyhead.config import PLACED, RECIPES, RunConfig
from dyhead.errors import DyheadError
from dyhead.modeling.backbone import BackboneConfig, BackboneWithFPN, load_backbone_weights
from dyhead.modeling.detectors.atss import ATSS, ATSSConfig
from dyhead.modeling.detectors.common import Detector
from dyhead.modeling.detectors.faster_rcnn import FasterRCNN, FasterRCNNConfig
from dyhead.modeling.detectors.fcos import FCOS, FCOSConfig
from dyhead.modeling.detectors.reppoints import RepPoints, RepPointsConfig
from dyhead.modeling.detectors.retinanet import RetinaNet, RetinaNetConfig
from dyhead.modeling.dyhead import DyHead, DyHeadConfig

ONE_STAGE_LEVELS = (3, 4, 5, 6, 7)  # P6/P7 from P5
TWO_STAGE_LEVELS = (2, 3, 4, 5, 6)  # max-pooled P6


@dataclass(frozen=True)
class Parts:
    """What every detector is made of, resolved from the experiment and the profile."""

    backbone_cfg: BackboneConfig
    weights: str | None
    dyhead: DyHeadConfig | None
    num_classes: int
    size_divisible: int
    tower_gn_groups: int
    dcn_backend: str
    plain_head_init: str
    roi_batch_size_per_image: int
    spec: dict

    @property
    def placement(self) -> str:
        return self.spec.get("placement", "paper")

    def backbone(self, levels: tuple[int, ...]) -> BackboneWithFPN:
        model = BackboneWithFPN(replace(self.backbone_cfg, levels=levels))
        if self.weights:
            load_backbone_weights(model.body, self.weights)
        return model

    def dyhead_module(self, **overrides) -> nn.Module | None:
        """The DyHead stack (built after the backbone, so the weights' random start is fixed by the seed)."""
        return DyHead(replace(self.dyhead, **overrides)) if self.dyhead is not None else None


def build_atss(p: Parts) -> Detector:
    head, recipe = p.spec["head"], RECIPES[p.spec.get("recipe", "paper")]
    cfg = ATSSConfig(num_classes=p.num_classes, tower_gn_groups=p.tower_gn_groups,
                     tower_convs=head.get("tower_convs", 4), tower_shared=head.get("tower_shared", False),
                     pred_kernel=recipe.pred_kernel)  # the official recipe's 1x1 predictors
    backbone = p.backbone(ONE_STAGE_LEVELS)
    return ATSS(backbone, cfg, p.size_divisible, p.dyhead_module())


def build_retinanet(p: Parts) -> Detector:
    cfg = RetinaNetConfig(num_classes=p.num_classes, tower_init=p.plain_head_init, placement=p.placement)
    backbone = p.backbone(ONE_STAGE_LEVELS)
    return RetinaNet(backbone, cfg, p.size_divisible, p.dyhead_module())


def build_fcos(p: Parts) -> Detector:
    cfg = FCOSConfig(num_classes=p.num_classes, tower_gn_groups=p.tower_gn_groups)
    backbone = p.backbone(ONE_STAGE_LEVELS)
    return FCOS(backbone, cfg, p.size_divisible, p.dyhead_module())


def build_reppoints(p: Parts) -> Detector:
    cfg = RepPointsConfig(num_classes=p.num_classes, tower_gn_groups=p.tower_gn_groups)
    backbone = p.backbone(ONE_STAGE_LEVELS)
    return RepPoints(backbone, cfg, p.size_divisible, p.dcn_backend, p.dyhead_module())


def build_faster_rcnn(p: Parts) -> Detector:
    # Fig. 2c: the blocks before the RoI pooling keep scale and spatial attention; the task attention
    # moves to the RoI features (FasterRCNNConfig.roi_task_attention). The official placement keeps all three.
    paper = p.placement == "paper"
    task = p.dyhead.task if p.dyhead is not None else True
    cfg = FasterRCNNConfig(num_classes=p.num_classes, placement=p.placement, roi_task_attention=task,
                           box_batch_size_per_image=p.roi_batch_size_per_image)
    backbone = p.backbone(TWO_STAGE_LEVELS)
    return FasterRCNN(backbone, cfg, p.size_divisible, p.dyhead_module(**({"task": False} if paper else {})))


DETECTORS = {
    "atss": build_atss,
    "retinanet": build_retinanet,
    "fcos": build_fcos,
    "reppoints": build_reppoints,
    "faster_rcnn": build_faster_rcnn,
}


def backbone_config(bb: dict, fpn_channels: int, dcn_backend: str) -> BackboneConfig:
    """A profile's `model.backbones.<name>` entry as the body's config (detectors and `dyhead pretrain`)."""
    return BackboneConfig(
        name=bb["name"],
        depths=tuple(bb["depths"]) if bb.get("depths") else None,
        base_width=bb.get("base_width", 64),
        norm=bb["norm"],
        freeze_at=bb["freeze_at"],
        fpn_channels=fpn_channels,
        groups=bb.get("groups"),
        width_per_group=bb.get("width_per_group"),
        dcn_stages=tuple(bb.get("dcn_stages", ())),
        dcn_backend=dcn_backend,
    )


def build_detector(run: RunConfig, num_classes: int, dcn_backend: str, load_weights: bool = True) -> Detector:
    """`dcn_backend` must be resolved already ('native' or 'torchvision')."""
    name = run.spec["detector"]
    if name not in DETECTORS:
        raise DyheadError(f"detector: unknown {name!r}; expected one of {', '.join(DETECTORS)}")
    if "placement" in run.spec and name not in PLACED:
        raise DyheadError(f"experiment {run.experiment}: placement applies to {' and '.join(PLACED)} only, not {name!r}")
    model_cfg, head = run.profile["model"], run.head
    backbone_cfg = backbone_config(run.backbone, model_cfg["fpn_channels"], dcn_backend)
    dyhead_cfg = None
    if head["blocks"] > 0:
        dyhead_cfg = DyHeadConfig(
            blocks=head["blocks"],
            channels=model_cfg["fpn_channels"],
            scale=head["scale"],
            spatial=head["spatial"],
            task=head["task"],
            high_offsets=head["high_offsets"],
            gn_groups=model_cfg["dyhead_gn_groups"],
            dcn_backend=dcn_backend,
        )
    parts = Parts(
        backbone_cfg=backbone_cfg,
        weights=run.weights if load_weights else None,
        dyhead=dyhead_cfg,
        num_classes=num_classes,
        size_divisible=run.profile["input"]["size_divisible"],
        tower_gn_groups=model_cfg["tower_gn_groups"],
        dcn_backend=dcn_backend,
        plain_head_init=model_cfg.get("plain_head_init", "paper"),
        roi_batch_size_per_image=model_cfg.get("roi_batch_size_per_image", 512),
        spec=run.spec,
    )
    model = DETECTORS[name](parts)
    if run.memory_format == "channels_last":
        # NHWC weights make every conv after them produce NHWC, which oneDNN runs without reordering its
        # inputs and outputs on each call; state dicts load either way (copy_ keeps the parameter's layout)
        model = model.to(memory_format=torch.channels_last)
    return model

"""Build a detector from a resolved experiment (config in, nn.Module out)."""
from __future__ import annotations

from dyhead.config import RunConfig
from dyhead.errors import DyheadError
from dyhead.modeling.backbone import BackboneConfig, BackboneWithFPN, load_backbone_weights
from dyhead.modeling.detectors.atss import ATSS, ATSSConfig
from dyhead.modeling.dyhead import DyHeadConfig


def build_detector(run: RunConfig, num_classes: int, dcn_backend: str, load_weights: bool = True):
    """`dcn_backend` must be resolved already ('native' or 'torchvision')."""
    model_cfg = run.profile["model"]
    bb = run.backbone
    backbone_cfg = BackboneConfig(
        name=bb["name"],
        depths=tuple(bb["depths"]) if bb.get("depths") else None,
        base_width=bb.get("base_width", 64),
        norm=bb["norm"],
        freeze_at=bb["freeze_at"],
        fpn_channels=model_cfg["fpn_channels"],
    )
    backbone = BackboneWithFPN(backbone_cfg)
    if load_weights and bb.get("weights"):
        load_backbone_weights(backbone.body, bb["weights"])
    head = run.head
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
    detector = run.spec["detector"]
    if detector == "atss":
        cfg = ATSSConfig(num_classes=num_classes, tower_gn_groups=model_cfg["tower_gn_groups"])
        return ATSS(backbone, cfg, dyhead_cfg, run.profile["input"]["size_divisible"])
    raise DyheadError(f"detector: unknown {detector!r}")

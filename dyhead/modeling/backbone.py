"""ResNet / ResNeXt bodies and the FPN, assembled from torchvision parts.

The body is torchvision's `Bottleneck` stacked with a configurable base width and depth, so the
paper's backbones (width 64: R-50 = [3, 4, 6, 3]) keep torchvision's state-dict names and load
ImageNet weights unchanged, while the mini profile uses a narrow stand-in of the same family.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from dyhead.errors import DyheadError

# name -> (blocks per stage, groups, width per group); width 64 / groups 1 is a plain ResNet.
ARCHS = {
    "r50": ((3, 4, 6, 3), 1, 64),
    "r101": ((3, 4, 23, 3), 1, 64),
    "x101": ((3, 4, 23, 3), 64, 4),  # ResNeXt-101 64x4d
}
NORMS = ("frozen_bn", "bn", "sync_bn", "gn")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "r50"
    depths: tuple[int, ...] | None = None  # overrides the architecture's stage depths (mini stand-ins)
    base_width: int = 64  # channels of the stem; stage planes are base_width * (1, 2, 4, 8)
    norm: str = "frozen_bn"
    freeze_at: int = 1  # 0: train everything; 1: freeze the stem; k: freeze stem + stages < k
    fpn_channels: int = 256
    levels: tuple[int, ...] = (3, 4, 5, 6, 7)  # pyramid levels returned (P3-P7 one-stage, P2-P6 two-stage)


def _norm_layer(kind: str):
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind in ("bn", "sync_bn"):  # SyncBN is converted by the trainer under DDP
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(32 if c % 32 == 0 else 8, c)
    raise DyheadError(f"backbone.norm: unknown value {kind!r}; expected one of {', '.join(NORMS)}")


class ResNet(nn.Module):
    """Stem + four bottleneck stages; returns C2..C5 (strides 4..32)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.name not in ARCHS:
            raise DyheadError(f"backbone: unknown name {cfg.name!r}; expected one of {', '.join(ARCHS)}")
        depths, groups, width_per_group = ARCHS[cfg.name]
        depths = tuple(cfg.depths) if cfg.depths else depths
        norm = _norm_layer(cfg.norm)
        self._norm, self._groups, self._base_width = norm, groups, width_per_group
        self.inplanes = cfg.base_width
        self.conv1 = nn.Conv2d(3, cfg.base_width, 7, 2, 3, bias=False)
        self.bn1 = norm(cfg.base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = [cfg.base_width * m for m in (1, 2, 4, 8)]
        self.layer1 = self._stage(planes[0], depths[0], 1)
        self.layer2 = self._stage(planes[1], depths[1], 2)
        self.layer3 = self._stage(planes[2], depths[2], 2)
        self.layer4 = self._stage(planes[3], depths[3], 2)
        self.out_channels = [p * Bottleneck.expansion for p in planes]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.freeze(cfg.freeze_at)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                self._norm(planes * Bottleneck.expansion),
            )
        # torchvision's Bottleneck puts the stride on the 3x3 conv (pytorch style).
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self._groups, self._base_width, 1, self._norm)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [
            Bottleneck(self.inplanes, planes, 1, None, self._groups, self._base_width, 1, self._norm)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def freeze(self, freeze_at: int) -> None:
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class BackboneWithFPN(nn.Module):
    """ResNet + FPN. P3-P7 uses P6/P7 from P5 (as ATSS and the official DyHead); P2-P6 max-pools P6."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.body = ResNet(cfg)
        self.levels = tuple(cfg.levels)
        first = self.levels[0]
        if first not in (2, 3) or self.levels != tuple(range(first, first + 5)):
            raise DyheadError(f"backbone.levels: {list(self.levels)} unsupported; use [3..7] or [2..6]")
        used = self.body.out_channels[first - 2 :]
        extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels) if first == 3 else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(used, cfg.fpn_channels, extra_blocks=extra)
        self.out_channels = cfg.fpn_channels
        self.strides = [2**lvl for lvl in self.levels]

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)[self.levels[0] - 2 :]
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())


def load_backbone_weights(model: ResNet, path: str) -> None:
    """Load an ImageNet state dict saved by torchvision into the body; refuse a wrong-shaped file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DyheadError(f"backbone weights: file not found: {path}") from None
    except Exception as exc:  # a corrupt or non-torch file
        raise DyheadError(f"backbone weights: cannot read {path}: {exc}") from None
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key in own and own[key].shape != value.shape:
            raise DyheadError(
                f"backbone weights {path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise DyheadError(f"backbone weights {path}: missing {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)

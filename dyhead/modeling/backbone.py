"""ResNet / ResNeXt bodies and the FPN, assembled from torchvision parts.

The body is torchvision's `Bottleneck` stacked with a configurable base width and depth, so the
paper's backbones (width 64: R-50 = [3, 4, 6, 3]) keep torchvision's state-dict names and load
ImageNet weights unchanged, while the mini profile uses a narrow stand-in of the same family.
The DCN variants swap the 3x3 conv of every bottleneck in the chosen stages for a modulated
deformable conv under the same name (`conv2.weight`), so they load the same ImageNet file; only
the offset/mask convs are new, and they start at zero (a regular grid, every mask 0.5).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from dyhead.errors import DyheadError
from dyhead.ops import deform_conv2d

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
    groups: int | None = None  # override the architecture's (mini ResNeXt stand-ins use fewer groups)
    width_per_group: int | None = None
    dcn_stages: tuple[int, ...] = ()  # stages (2..5 = layer1..layer4) whose 3x3 convs are deformable
    dcn_backend: str = "torchvision"  # resolved backend for those convs ('native' or 'torchvision')


def _norm_layer(kind: str):
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind in ("bn", "sync_bn"):  # SyncBN is converted by the trainer under DDP
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(32 if c % 32 == 0 else 8, c)
    raise DyheadError(f"backbone.norm: unknown value {kind!r}; expected one of {', '.join(NORMS)}")


class DeformConv3x3(nn.Module):
    """Modulated deformable 3x3 conv (DCNv2) in place of a bottleneck's `conv2`, same weight shape.

    Offsets and masks come from a 3x3 conv on the block's input with the conv's stride, so they
    are laid out on the output grid: 18 offset channels as (dy, dx) per tap, then 9 mask logits.
    """

    def __init__(self, channels: int, stride: int, groups: int, dilation: int, backend: str):
        super().__init__()
        self.stride, self.dilation, self.backend = stride, dilation, backend
        self.weight = nn.Parameter(torch.empty(channels, channels // groups, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.offset = nn.Conv2d(channels, 27, 3, stride, dilation, dilation)
        self.reset_offset()

    def reset_offset(self) -> None:
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        om = self.offset(x)
        return deform_conv2d(x, om[:, :18], om[:, 18:].sigmoid(), self.weight, None, self.stride,
                             self.dilation, self.dilation, backend=self.backend)


class ResNet(nn.Module):
    """Stem + four bottleneck stages; returns C2..C5 (strides 4..32)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.name not in ARCHS:
            raise DyheadError(f"backbone: unknown name {cfg.name!r}; expected one of {', '.join(ARCHS)}")
        depths, groups, width_per_group = ARCHS[cfg.name]
        depths = tuple(cfg.depths) if cfg.depths else depths
        groups = cfg.groups or groups
        width_per_group = cfg.width_per_group or width_per_group
        bad = sorted(set(cfg.dcn_stages) - {2, 3, 4, 5})
        if bad:
            raise DyheadError(f"backbone.dcn_stages: {bad} not in 2..5 (res2..res5)")
        norm = _norm_layer(cfg.norm)
        self._norm, self._groups, self._base_width = norm, groups, width_per_group
        self._dcn_stages, self._dcn_backend = set(cfg.dcn_stages), cfg.dcn_backend
        self.inplanes = cfg.base_width
        self.conv1 = nn.Conv2d(3, cfg.base_width, 7, 2, 3, bias=False)
        self.bn1 = norm(cfg.base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = [cfg.base_width * m for m in (1, 2, 4, 8)]
        self.layer1 = self._stage(planes[0], depths[0], 1, stage=2)
        self.layer2 = self._stage(planes[1], depths[1], 2, stage=3)
        self.layer3 = self._stage(planes[2], depths[2], 2, stage=4)
        self.layer4 = self._stage(planes[3], depths[3], 2, stage=5)
        self.out_channels = [p * Bottleneck.expansion for p in planes]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # the loop above also caught the offset convs: back to zero
            if isinstance(m, DeformConv3x3):
                m.reset_offset()
        self.freeze(cfg.freeze_at)

    def _stage(self, planes: int, blocks: int, stride: int, stage: int) -> nn.Sequential:
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
        if stage in self._dcn_stages:
            for block in layers:
                conv = block.conv2
                block.conv2 = DeformConv3x3(conv.in_channels, conv.stride[0], conv.groups, conv.dilation[0],
                                            self._dcn_backend)
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


def new_in_dcn(key: str) -> bool:
    """Tensors an ImageNet file cannot hold: the DCN variant's offset/mask convs (kept at zero)."""
    return ".conv2.offset." in key


def load_backbone_weights(model: ResNet, path: str) -> None:
    """Load an ImageNet state dict saved by torchvision into the body; refuse a wrong-shaped file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DyheadError(f"backbone weights: file not found: {path} (`dyhead fetch-weights` downloads "
                          "the ImageNet files into data/weights/)") from None
    except Exception as exc:  # a corrupt or non-torch file
        raise DyheadError(f"backbone weights: cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DyheadError(f"backbone weights {path}: not a state dict of tensors")
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key in own and own[key].shape != value.shape:
            raise DyheadError(
                f"backbone weights {path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and not new_in_dcn(k)]
    if missing:
        raise DyheadError(f"backbone weights {path}: missing {len(missing)} tensors, e.g. {missing[0]} "
                          "(a file for another architecture?)")
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)

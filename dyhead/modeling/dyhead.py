"""The DyHead block: scale-, spatial- and task-aware attention over a feature pyramid.

Follows the official code (microsoft/DynamicHead `dyhead/dyhead.py`, `dyrelu.py`) where it is
right and the paper where the code is silent. Per level l of the pyramid (finest first):

    offsets, mask = split(conv3x3(X_l))                      # 18 (dy, dx) + 9 mask logits
    mid  = GN(DCN(X_l))            stride 1                   # spatial attention pi_S
    low  = GN(DCN(X_{l-1}))        stride 2      (l > 0)
    high = up(GN(DCN(X_{l+1})))    stride 1, then bilinear upsample (l < L-1)
    Y_l  = mean_b hsig(relu(conv1x1(GAP(b)))) * b            # scale attention pi_L
    out  = DyReLU(Y_l)                                        # task attention pi_C

The high branch runs at level l+1's resolution, but the offsets come from level l. The official
CUDA op silently misreads them (microsoft/DynamicHead#25); `high_offsets` chooses what to do:
`resample` (default) pools them to the coarse grid and halves them, `crop` takes the top-left
corner (mmdetection 3.x), `official` reproduces the flat-prefix reading so official weights load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyhead.ops import deform_conv2d

HIGH_OFFSET_MODES = ("resample", "crop", "official")
# Where a detector puts the blocks: "paper" (Fig. 2) or "official" (microsoft/DynamicHead's configs);
# each detector that offers both says what they mean for it.
PLACEMENTS = ("paper", "official")


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement: unknown value {placement!r}; expected one of {', '.join(PLACEMENTS)}")


@dataclass(frozen=True)
class DyHeadConfig:
    blocks: int = 6
    channels: int = 256
    scale: bool = True  # pi_L
    spatial: bool = True  # pi_S (off: plain 3x3 conv, as GLIP's USE_DFCONV switch)
    task: bool = True  # pi_C (off: ReLU)
    high_offsets: str = "resample"
    gn_groups: int = 16
    dcn_backend: str = "torchvision"  # already resolved: 'native' or 'torchvision'


def h_sigmoid(x: Tensor) -> Tensor:
    # relu6(x + 3) / 6, the official code's hard sigmoid (not the paper's (x+1)/2).
    return F.hardsigmoid(x)


class ModulatedDeformConv(nn.Module):
    """3x3 DCNv2 whose offsets and mask are supplied by the caller (one offset conv feeds three)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, backend: str = "torchvision"):
        super().__init__()
        self.stride = stride
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        # The official DCN keeps its own uniform(+-1/sqrt(fan_in)) init, bias zero.
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, 1, 1, backend=self.backend)


class SpatialConv(nn.Module):
    """One branch's conv + GroupNorm: deformable when spatial attention is on, plain otherwise."""

    def __init__(self, cfg: DyHeadConfig, stride: int):
        super().__init__()
        self.deformable = cfg.spatial
        if cfg.spatial:
            self.conv = ModulatedDeformConv(cfg.channels, cfg.channels, stride, cfg.dcn_backend)
        else:
            self.conv = nn.Conv2d(cfg.channels, cfg.channels, 3, stride, 1)
            nn.init.normal_(self.conv.weight, std=0.01)
            nn.init.zeros_(self.conv.bias)
        self.norm = nn.GroupNorm(cfg.gn_groups, cfg.channels)

    def forward(self, x: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        y = self.conv(x, offset, mask) if self.deformable else self.conv(x)
        return self.norm(y)


class DyReLU(nn.Module):
    """Task-aware attention: max(a1*x + b1, a2*x + b2) with per-(sample, channel) coefficients.

    theta = hsig(FC(relu(FC(GAP(x))))) in [0, 1]^{4C}, split as a1, b1, a2, b2 and mapped to
    a1 in [0, 2], a2 in [-1, 1], b1, b2 in [-0.5, 0.5]; theta = 0.5 gives exactly ReLU.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, 4 * channels)
        # Zero-init the last FC so theta = 0.5 and the block starts as a plain ReLU (the official code
        # keeps nn.Linear's default init, which starts as a random piecewise-linear function).
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        theta = h_sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))).view(n, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(theta, c, dim=1)
        a1 = 2.0 * (a1 - 0.5) + 1.0
        a2 = 2.0 * (a2 - 0.5)
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.maximum(x * a1 + b1, x * a2 + b2)


def high_branch_offsets(offset: Tensor, mask: Tensor, size: tuple[int, int], mode: str) -> tuple[Tensor, Tensor]:
    """Offsets and mask for the l+1 branch, whose output is `size` (about half of level l)."""
    h, w = size
    if mode == "resample":
        # Average the fine offsets over each 2x2 cell and halve them: one coarse pixel spans two fine ones.
        off = F.adaptive_avg_pool2d(offset, (h, w)) * 0.5 if offset.shape[-2:] != (h, w) else offset
        msk = F.adaptive_avg_pool2d(mask, (h, w)) if mask.shape[-2:] != (h, w) else mask
        return off, msk
    if mode == "crop":
        return offset[:, :, :h, :w], mask[:, :, :h, :w]
    if mode == "official":
        # The official CUDA kernel reads the first 18*h*w values of each sample's flat offset block.
        n = offset.shape[0]
        off = offset.reshape(n, -1)[:, : offset.shape[1] * h * w].reshape(n, offset.shape[1], h, w)
        msk = mask.reshape(n, -1)[:, : mask.shape[1] * h * w].reshape(n, mask.shape[1], h, w)
        return off, msk
    raise ValueError(f"high_offsets: unknown mode {mode!r}; expected one of {', '.join(HIGH_OFFSET_MODES)}")


class DyHeadBlock(nn.Module):
    """One DyHead block applied to every level of the pyramid (weights shared across levels)."""

    def __init__(self, cfg: DyHeadConfig):
        super().__init__()
        if cfg.high_offsets not in HIGH_OFFSET_MODES:
            raise ValueError(f"high_offsets: unknown mode {cfg.high_offsets!r}; expected one of {', '.join(HIGH_OFFSET_MODES)}")
        self.cfg = cfg
        # Names follow the official DyConv order: [0] high (l+1), [1] mid (l), [2] low (l-1, stride 2).
        self.high = SpatialConv(cfg, stride=1)
        self.mid = SpatialConv(cfg, stride=1)
        self.low = SpatialConv(cfg, stride=2)
        if cfg.spatial:
            # Official init keeps PyTorch's default for the offset conv; 27 = 18 offsets + 9 mask logits.
            self.offset = nn.Conv2d(cfg.channels, 27, 3, 1, 1)
        if cfg.scale:
            self.scale_attn = nn.Conv2d(cfg.channels, 1, 1)
            nn.init.normal_(self.scale_attn.weight, std=0.01)
            nn.init.zeros_(self.scale_attn.bias)
        self.task_attn = DyReLU(cfg.channels) if cfg.task else None

    def scale_weight(self, x: Tensor) -> Tensor:
        """pi_L for one branch: a scalar in [0.5, 1] per sample (ReLU before the hard sigmoid)."""
        return h_sigmoid(F.relu(self.scale_attn(F.adaptive_avg_pool2d(x, 1))))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        outputs = []
        for level, x in enumerate(features):
            offset = mask = None
            if self.cfg.spatial:
                om = self.offset(x)
                offset, mask = om[:, :18], om[:, 18:].sigmoid()
            branches = [self.mid(x, offset, mask)]
            if level > 0:
                branches.append(self.low(features[level - 1], offset, mask))
            if level < len(features) - 1:
                nxt = features[level + 1]
                if self.cfg.spatial:
                    high_off, high_mask = high_branch_offsets(offset, mask, tuple(nxt.shape[-2:]), self.cfg.high_offsets)
                    high = self.high(nxt, high_off, high_mask)
                else:
                    high = self.high(nxt)
                branches.append(F.interpolate(high, size=x.shape[-2:], mode="bilinear", align_corners=True))
            if self.cfg.scale:
                fused = torch.stack([self.scale_weight(b) * b for b in branches]).mean(dim=0)
            else:
                fused = torch.stack(branches).mean(dim=0)
            outputs.append(self.task_attn(fused) if self.task_attn is not None else F.relu(fused))
        return outputs


class DyHead(nn.Module):
    """A stack of `cfg.blocks` DyHead blocks; input and output are lists of same-shaped maps."""

    def __init__(self, cfg: DyHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(DyHeadBlock(cfg) for _ in range(cfg.blocks))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        for block in self.blocks:
            features = block(features)
        return features

"""Multiply-add counts of a detector's network (backbone, neck, head; no assignment or NMS).

Counted with torch's FlopCounterMode on the meta device (shapes only, so an 800x1344 R-50 costs
nothing to "run"), in the multiply-add convention the paper's Table 2 uses (FlopCounterMode
counts 2 FLOPs per MAC; we halve). FLOP counters silently count deformable convs as zero, so the
deformable op gets an explicit formula: the same MACs as a dense conv of its shape (the sampling
and the mask product are ignored, as convention ignores the adds of bias and norm layers).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dyhead.config import RunConfig

# The paper counted an 800x1333 image padded to a multiple of 32 (P3-P7 = 100x168 ... 7x11).
PAPER_INPUT = (800, 1344)


def _deform_conv_flops(input_shape, weight_shape, offset_shape) -> int:
    # 2 * (N * Ho * Wo) * Cout * (Cin / groups * kh * kw), as torch counts a dense conv.
    n = input_shape[0]
    ho, wo = offset_shape[-2:]
    cout, cin_per_group, kh, kw = weight_shape
    return 2 * n * ho * wo * cout * cin_per_group * kh * kw


def _torchvision_dcn(input_shape, weight_shape, offset_shape, *args, out_shape=None, **kwargs) -> int:
    return _deform_conv_flops(input_shape, weight_shape, offset_shape)


def _native_dcn(input_shape, offset_shape, mask_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _deform_conv_flops(input_shape, weight_shape, offset_shape)


def _custom_mapping() -> dict:
    mapping = {torch.ops.torchvision.deform_conv2d: _torchvision_dcn}
    try:  # our native op, when the extension is loaded
        mapping[torch.ops.dyhead.deform_conv2d] = _native_dcn
    except (AttributeError, RuntimeError):
        pass
    return mapping


def count_gmacs(model: torch.nn.Module, input_hw: tuple[int, int]) -> dict:
    """GMACs of `model.network` on one image of `input_hw`, by top-level part."""
    device = next(model.parameters()).device
    batch = torch.zeros((1, 3, *input_hw), device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter, torch.no_grad():
        model.network(batch)
    per_module = counter.get_flop_counts()
    total = counter.get_total_flops()
    # FlopCounterMode names a module by the class of the outermost module called, then its path. network()
    # may call a part's submodules directly (Faster R-CNN calls rpn.head, roi_heads.box_head), so each
    # outermost name is credited to the part that holds a module of that class.
    roots = {k: sum(v.values()) for k, v in per_module.items() if "." not in k and k != "Global"}
    parts = {}
    for name, child in model.named_children():
        classes = {type(m).__name__ for m in child.modules()}
        parts[name] = sum(f for k, f in roots.items() if k in classes) / 2e9
    return {"gmacs": total / 2e9, "parts_gmacs": parts, "input_hw": list(input_hw)}


def count_run(run: RunConfig, input_hw: tuple[int, int], num_classes: int) -> dict:
    """Build the experiment's model on the meta device and count it."""
    from dyhead.modeling.build import build_detector

    with torch.device("meta"):
        # The meta device runs no kernel, so the torchvision op's fake kernel stands for any backend.
        model = build_detector(run, num_classes, "torchvision", load_weights=False)
    model.eval()
    return count_gmacs(model, input_hw)

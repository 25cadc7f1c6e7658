"""Multiply-add counts of a detector's network (backbone, neck, head; no assignment or NMS).

Counted with torch's FlopCounterMode on the meta device (shapes only, so an 800x1344 R-50 costs
nothing to "run"), in the multiply-add convention the paper's Table 2 uses (FlopCounterMode
counts 2 FLOPs per MAC; we halve). FLOP counters silently count deformable convs as zero, so a
deformable conv counts as a dense conv of its shape (the sampling and the mask product are ignored, as
convention ignores the adds of bias and norm layers): on the meta device dyhead.ops.deform_conv2d runs
exactly that conv, which also keeps the count fast; on real tensors the ops get the same formula below.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dyhead.config import RunConfig, resolve
from dyhead.engine.tracking import log_run_outputs
from dyhead.files import save_json
from dyhead.modeling.build import build_detector

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
    with torch.device("meta"):
        # The meta device runs no kernel, so the torchvision op's fake kernel stands for any backend.
        model = build_detector(run, num_classes, "torchvision", load_weights=False)
    model.eval()
    return count_gmacs(model, input_hw)


def profile_input(run: RunConfig) -> tuple[int, int]:
    """The profile's square test input, padded as its batches are (mini: 128x128)."""
    size, div = run.profile["input"]["min_size_test"], run.profile["input"]["size_divisible"]
    return ((size + div - 1) // div * div,) * 2


def flops(run: RunConfig, out: Path | None = None, log=print) -> dict:
    """`dyhead flops`: the coco-profile model at the paper's input and the profile's own model, to flops.json
    and to the experiment's MLflow run (the one its training created)."""
    log(f"[{run.experiment}] counting multiply-adds on the meta device (coco model at "
        f"{PAPER_INPUT[0]}x{PAPER_INPUT[1]}, then the {run.profile_name} model)")
    paper = count_run(resolve(run.experiment, "coco"), PAPER_INPUT, num_classes=80)
    padded = profile_input(run)
    classes = run.profile["data"].get("synthetic", {}).get("num_classes", 80)
    own = count_run(run, padded, num_classes=classes)
    record = {"experiment": run.experiment, "convention": "multiply-adds (GMACs), deformable convs counted",
              "coco": paper, run.profile_name: own}
    out = Path(out) if out else run.run_dir / "flops.json"
    save_json(out, record)
    log_run_outputs(run, "flops", [out], {"gmacs_coco": paper["gmacs"], f"gmacs_{run.profile_name}": own["gmacs"]}, 0)
    log(f"[{run.experiment}] {paper['gmacs']:.2f} GMACs at {PAPER_INPUT[0]}x{PAPER_INPUT[1]} (coco profile); "
        f"{own['gmacs']:.3f} GMACs at {padded[0]}x{padded[1]} ({run.profile_name}) -> {out}")
    return record

"""Pieces of the report text that tables and grids share: numbers, markdown tables, the training sentence."""
from __future__ import annotations

from dyhead.config import PRETRAINED, RECIPES, Matrix
from dyhead.modeling.pretrained import arch_of_standin
from dyhead.report.results import Runs

PAPER = "Dai et al., *Dynamic Head*, CVPR 2021"


def coco_gflops(backbone: str = "") -> str:
    """What a GFLOPs number here counts."""
    return (f"multiply-adds of the **coco-profile** model ({backbone}256-channel FPN and head) on one 800×1333 image "
            "padded to 800×1344, deformable convs counted, from `dyhead flops`")


def fmt(v, signed: bool = False, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def diff(a, b):
    return None if a is None or b is None else a - b


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def heading(name: str, spec: dict, kind: str | None = None) -> list[str]:
    """'# Table N: title' for the paper's tables, '# Control (name): title' for ours, '# Grid (name): ...'
    for grids; then the note."""
    number = name.removeprefix("table")
    if kind:
        title = f"# {kind} ({name}): {spec['title']}"
    elif number.isdigit():
        title = f"# Table {number}: {spec['title']}"
    else:
        title = f"# Control ({name}): {spec['title']}"
    lines = [title, ""]
    if spec.get("note"):
        lines += [spec["note"].strip(), ""]
    return lines


def backbone_start(profile: dict) -> str:
    """Where the profile's backbones start: it changes every number, so each report says it."""
    starts = {bb.get("weights") for bb in profile["model"]["backbones"].values()}
    if starts == {PRETRAINED}:
        return "backbones from `dyhead pretrain` (object-crop classification on the training split)"
    if starts == {None}:
        return "backbones from random weights"
    if starts and all(w and arch_of_standin(w) for w in starts):
        return ("backbones from seeded random weights in ImageNet's file format (`dyhead standin-weights`), "
                "not ImageNet's")
    if None not in starts and PRETRAINED not in starts:
        return "backbones from ImageNet weights"
    return "backbones from the weights named in the profile"


def lr_exceptions(exps: list[str], base_lr: float, runs: Runs) -> str:
    """' Base lr X for ...' and ' Gradient norm clipped at Y for ...': per-experiment solver settings
    (overrides, recipes) as the runs trained."""
    other, clipped = {}, {}
    for exp in dict.fromkeys(exps):  # a TTA row repeats its experiment
        lr = runs.get(exp, "base_lr")
        if round(lr, 12) != round(base_lr, 12):
            other.setdefault(round(lr, 12), []).append(f"`{exp}`")
        clip = runs.get(exp, "clip_grad_norm", None)
        if clip is not None:
            clipped.setdefault(clip, []).append(f"`{exp}`")
    return ("".join(f" Base lr {lr:g} for {', '.join(e)}." for lr, e in other.items())
            + "".join(f" Gradient norm clipped at {c:g} for {', '.join(e)}." for c, e in clipped.items()))


def machines_note(exps: list[str], runs: Runs) -> str:
    """' Trained on <machine>.', or which rows came from which machine when they differ: another machine type's
    kernels round differently, so its runs differ from these by about the run-to-run noise (runtime.machine).
    Runs from before train.json recorded it add nothing."""
    by_machine: dict = {}
    for exp in dict.fromkeys(exps):
        machine = runs.get(exp, "machines", None)
        if machine:
            by_machine.setdefault(machine, []).append(f"`{exp}`")
    if len(by_machine) <= 1:
        return "".join(f" Trained on {m}." for m in by_machine)
    return (" Trained on more than one machine type, so rows differ also by their rounding (rerun them on one "
            "machine for a like-for-like table): " + "; ".join(f"{', '.join(e)} on {m}" for m, e in by_machine.items())
            + ".")


def recipe_note(exps: list[str], matrix: Matrix) -> str:
    """' `<exp>` trains the official recipe: ...' for experiments trained to a recipe other than the paper's."""
    by_recipe: dict = {}
    for exp in dict.fromkeys(exps):
        name = matrix.experiments[exp].get("recipe", "paper") if exp in matrix.experiments else "paper"
        if name != "paper":
            by_recipe.setdefault(name, []).append(f"`{exp}`")
    return "".join(f" {', '.join(e)} {'train' if len(e) > 1 else 'trains'} the {name} recipe: "
                   f"{RECIPES[name].summary}." for name, e in by_recipe.items())


def evaluated_on(runs: Runs, exp: str) -> str:
    """Which annotation file and how many images an experiment was evaluated on (a count, never `1000.0`:
    the results frame holds counts as floats where some run lacks one)."""
    images = runs.get(exp, "images")
    if isinstance(images, float) and images.is_integer():
        images = int(images)
    return f"evaluated on `{runs.get(exp, 'annotations')}` ({images} images)"

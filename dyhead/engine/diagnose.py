"""`dyhead diagnose <exp>`: what a trained (or freshly initialised) head learns from, stage by stage.

Written for the question Table 3 raises on short schedules: why does a DyHead head learn the boxes but
not the class? For the pyramid that enters the head (the FPN output) and the output of every DyHead
block, over a few batches of training images:

* **gradient per loss**: the norm of d(loss term)/d(features), one loss term at a time. In a head whose
  branch is shared by classification and regression, this says which loss shapes that branch; in the
  baselines' separate towers (measured too, at their outputs) the two never meet.
* **class probe**: how well a linear classifier reads each object's class from the feature vector at the
  object's centre, on the pyramid level whose scale fits the object (a multinomial logistic regression
  fitted on 70% of the objects, scored on the rest). It drops where a stage loses class information.

No library computes either for a detection head; both are a few dozen lines on torch's autograd and a
torch logistic regression (no scikit-learn dependency for one probe). Writes
runs/<profile>/<exp>/diagnose.json (diagnose_init.json with --init).
"""
from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from dyhead.config import RunConfig
from dyhead.data.coco import collate
from dyhead.engine import runtime
from dyhead.engine.inference import final_weights, load_final
from dyhead.errors import DyheadError
from dyhead.files import save_json
from dyhead.modeling.build import build_detector


TOWERS = (("cls_tower", "cls tower"), ("reg_tower", "box tower"), ("pts_tower", "points tower"))


def dyhead_of(model) -> torch.nn.Module | None:
    """The DyHead stack of a detector: `head.dyhead` (one-stage) or `dyhead` (Faster R-CNN)."""
    head = getattr(model, "head", None)
    return getattr(head, "dyhead", None) or getattr(model, "dyhead", None)


def object_level(box: Tensor, strides: list[int]) -> int:
    """The pyramid level whose anchor scale (8 strides, as ATSS's) is nearest the box's size in log space."""
    size = math.sqrt(max(float((box[2] - box[0]) * (box[3] - box[1])), 1.0))
    return min(range(len(strides)), key=lambda i: abs(math.log2(size / (8 * strides[i]))))


def object_cells(targets: list[dict], strides: list[int]) -> list[tuple[int, int, float, float, int]]:
    """(image, level, centre x, centre y in pixels, label) of every object, at the level that fits its size."""
    return [(i, object_level(box, strides), float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2, int(label))
            for i, t in enumerate(targets) for box, label in zip(t["boxes"], t["labels"])]


def centre_features(stage: list[Tensor], cells: list[tuple], strides: list[int]) -> list[Tensor]:
    """The feature vector of `stage` at each object's centre cell."""
    feats = []
    for i, lvl, cx, cy, _ in cells:
        fmap = stage[lvl][i]
        x = min(max(int(cx / strides[lvl]), 0), fmap.shape[-1] - 1)
        y = min(max(int(cy / strides[lvl]), 0), fmap.shape[-2] - 1)
        feats.append(fmap[:, y, x].detach())
    return feats


def linear_probe(x: Tensor, y: Tensor, num_classes: int, seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, light L2)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    cut = int(0.7 * len(y))
    tr, te = order[:cut], order[cut:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs[tr] @ w + b, y[tr]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xs[te] @ w + b).argmax(1) == y[te]).float().mean())


def diagnose(run: RunConfig, *, init: bool = False, images: int = 256, batch_size: int = 8, threads: int | None = None,
             backend: str | None = None, log=print) -> dict:
    rt = runtime.start(run, threads, backend, log)
    device = rt.device
    dataset = runtime.make_dataset(run, train=True)
    torch.manual_seed(run.seed)
    model = build_detector(run, len(dataset.category_ids), rt.backend, load_weights=init).to(device)
    source = "initialisation (backbone from its start weights)" if init else str(run.run_dir / "model_final.pth")
    if not init:
        if not final_weights(run).exists():
            raise DyheadError(f"{final_weights(run)}: not found; train {run.experiment} first, or pass --init")
        model.load_state_dict(load_final(run)["model"])
    model.train()  # the losses need training mode; BatchNorm then sees the batch, as in training
    strides = list(model.backbone.strides)

    stages: dict[str, list[Tensor]] = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, out: stages.__setitem__("fpn", list(out)))]
    head = dyhead_of(model)
    for k, block in enumerate(head.blocks if head is not None else [], 1):
        hooks.append(block.register_forward_hook(lambda m, i, out, k=k: stages.__setitem__(f"block {k}", list(out))))
    # separate towers (the baselines; RetinaNet's official placement keeps them after the blocks): one call per level
    seen = set()
    for attr, name in TOWERS:
        tower = getattr(getattr(model, "head", None), attr, None)
        if tower is None or id(tower) in seen or not any(True for _ in tower.parameters()):
            continue
        seen.add(id(tower))
        hooks.append(tower.register_forward_hook(lambda m, i, out, name=name: stages.setdefault(name, []).append(out)))

    grad_sq: dict[tuple[str, str], float] = {}
    feats: dict[str, list[Tensor]] = {}
    labels: list[int] = []
    n = min(images, len(dataset)) // batch_size * batch_size
    if n == 0:
        raise DyheadError(f"--images {images}: fewer than one batch of {batch_size}")
    t0 = time.perf_counter()
    try:
        for start in range(0, n, batch_size):
            imgs, targets = collate([dataset[i] for i in range(start, start + batch_size)])
            imgs, targets = runtime.to_device(imgs, targets, device)
            stages.clear()
            losses = model(imgs, targets)
            names = list(stages)
            flat = [t for name in names for t in stages[name]]
            for loss_name, loss in losses.items():
                grads = iter(torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True))
                for name in names:  # each stage's tensors, in the order `flat` holds them
                    sq = sum(float(g.pow(2).sum()) for g in itertools.islice(grads, len(stages[name])) if g is not None)
                    grad_sq[(name, loss_name)] = grad_sq.get((name, loss_name), 0.0) + sq
            cells = object_cells(targets, strides)
            for name in names:
                feats.setdefault(name, []).extend(centre_features(stages[name], cells, strides))
            labels.extend(cell[-1] for cell in cells)
    finally:
        for h in hooks:
            h.remove()

    y = torch.tensor(labels)
    chance = float(torch.bincount(y).max()) / len(y)
    num_classes = len(dataset.category_ids)
    batches = n // batch_size
    loss_names = list(losses)
    rows = []
    for name in names:
        x = torch.stack(feats[name]).float().cpu()
        rows.append({
            "stage": name,
            "grad_norm": {ln: math.sqrt(grad_sq[(name, ln)] / batches) for ln in loss_names},
            "class_probe_accuracy": linear_probe(x, y, num_classes, run.seed),
            "rms": float(x.pow(2).mean().sqrt()),
        })
    record = {"experiment": run.experiment, "profile": run.profile_name, "weights": source, "images": n,
              "objects": len(labels), "chance_accuracy": chance, "losses": loss_names, "stages": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = run.run_dir / ("diagnose_init.json" if init else "diagnose.json")
    save_json(out, record)
    log(format_record(record))
    log(f"-> {out}")
    return record


def format_record(rec: dict) -> str:
    head = ["stage", "class probe", "rms"] + [f"|grad {ln.removeprefix('loss_')}|" for ln in rec["losses"]]
    lines = [f"[{rec['experiment']}] {rec['weights']}; {rec['images']} training images, {rec['objects']} objects; "
             f"class probe chance (largest class) {rec['chance_accuracy']:.3f}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rec["stages"]:
        cells = [r["stage"], f"{r['class_probe_accuracy']:.3f}", f"{r['rms']:.3f}"]
        cells += [f"{r['grad_norm'][ln]:.4f}" for ln in rec["losses"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

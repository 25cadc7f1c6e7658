"""`dyhead figure fig3|fig4|detections <exp>`: what one trained model does, drawn (matplotlib, PNG).

    fig3        Figure 3 of the paper: per pyramid level, the histogram over the val images of the scale
                attention's ratio (weight of the higher-resolution input / weight of the lower-resolution one)
    fig4        Figure 4: channel-mean |feature| at the finest level before the head and after blocks 2, 4, 6
    detections  ground truth beside the predictions (predictions.json) on a few val images, and the per-class
                AP table from COCOeval's precision array: reports/perclass_<exp>.md (and .html)

The attention weights and feature maps are read with forward hooks on the trained model; nothing in the
model changes. Each figure is also logged to the experiment's MLflow run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dyhead import plots
from dyhead.config import RunConfig
from dyhead.data.coco import collate
from dyhead.engine import runtime
from dyhead.engine.inference import load_trained, per_class_ap, profile_area_ranges
from dyhead.engine.tracking import log_run_outputs
from dyhead.errors import DyheadError
from dyhead.files import load_json, save_text
from dyhead.modeling.dyhead import DyHead, h_sigmoid

FIGURES = Path("reports/figures")


def _model(run: RunConfig, threads, backend, log):
    """The trained model (eval mode), its DyHead stack and the val split."""
    rt = runtime.start(run, threads, backend, log)
    val = runtime.make_dataset(run, train=False)
    model = load_trained(run, val.category_ids, rt.device, rt.backend, run.profile["data"]["val_annotations"])
    stacks = [m for m in model.modules() if isinstance(m, DyHead)]
    if not stacks:
        raise DyheadError(f"{run.experiment}: has no DyHead blocks (head {run.spec['head']}); the figure needs a "
                          "DyHead model such as atss-r50-dyh6-LSC-1x")
    return rt, val, model, stacks[0]


@torch.no_grad()
def _forward(model, val, indices: list[int], rt, batch_size: int):
    """Run the model over val[indices] in batches; the hooks do the reading."""
    for start in range(0, len(indices), batch_size):
        images, _ = collate([val[i] for i in indices[start:start + batch_size]])
        with rt.autocast():
            model([im.to(rt.device) for im in images])


def _log(run: RunConfig, paths: list[Path], log) -> None:
    log_run_outputs(run, "figures", paths, {}, run.max_iter)
    log(f"[{run.experiment}] wrote {', '.join(map(str, paths))}")


# -- Figure 3: scale-attention ratios -------------------------------------------------------------------

def level_ratio(weights: dict[str, torch.Tensor], level: int, levels: int) -> torch.Tensor:
    """Weight of the higher-resolution input / weight of the lower-resolution one at `level` (0 = finest):
    the l-1 branch over the l+1 branch inside the pyramid; at the finest level its own over the l+1 branch,
    at the coarsest the l-1 branch over its own."""
    finer = weights["low"] if level > 0 else weights["mid"]
    coarser = weights["high"] if level < levels - 1 else weights["mid"]
    return (finer / coarser).flatten()


def scale_ratios(model, stack: DyHead, val, rt, images: int | None, batch_size: int) -> list[np.ndarray]:
    """Per level (finest first), the ratio for every (image, block): hooks on each block's scale-attention
    conv, which every branch of every level calls in the block's order (mid, then l-1, then l+1)."""
    if not stack.cfg.scale:
        raise DyheadError("figure fig3: the model's DyHead blocks have scale attention off (switch L)")
    calls: list[list[torch.Tensor]] = [[] for _ in stack.blocks]
    levels: list[int] = []
    handles = []
    for i, block in enumerate(stack.blocks):
        handles.append(block.scale_attn.register_forward_hook(
            lambda mod, args, out, i=i: calls[i].append(h_sigmoid(F.relu(out.float())).cpu())))
    handles.append(stack.register_forward_pre_hook(lambda mod, args: levels.append(len(args[0]))))
    per_level: list[list[torch.Tensor]] = []
    try:
        n = len(val) if images is None else min(images, len(val))
        for start in range(0, n, batch_size):
            for c in calls:
                c.clear()
            _forward(model, val, list(range(start, min(start + batch_size, n))), rt, batch_size)
            num = levels[-1]
            per_level = per_level or [[] for _ in range(num)]
            for block_calls in calls:
                it = iter(block_calls)
                for level in range(num):
                    weights = {"mid": next(it)}
                    if level > 0:
                        weights["low"] = next(it)
                    if level < num - 1:
                        weights["high"] = next(it)
                    per_level[level].append(level_ratio(weights, level, num))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(r).numpy() for r in per_level]


def figure3(run: RunConfig, out: Path | None = None, images: int | None = None, threads=None, backend=None,
            log=print) -> Path:
    rt, val, model, stack = _model(run, threads, backend, log)
    ratios = scale_ratios(model, stack, val, rt, images, run.profile["eval"]["batch_size"])
    fig, ax = plots.figure(1, 1, size=(6.0, 3.6))
    ax = ax[0, 0]
    # each weight is in [0.5, 1] (hard sigmoid after ReLU), so ratios lie in [0.5, 2]; the bins span what occurs
    lo, hi = min(float(r.min()) for r in ratios), max(float(r.max()) for r in ratios)
    lo, hi = min(lo, 0.99), max(hi, 1.01)
    bins = np.linspace(lo, hi, 61)
    for level, r in enumerate(ratios):
        ax.hist(r, bins=bins, alpha=0.55, label=f"level {level + 1}" + (" (finest)" if level == 0 else ""),
                density=True)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("scale ratio: weight(higher resolution) / weight(lower resolution)")
    ax.set_ylabel("density")
    n = len(ratios[0]) // len(stack.blocks)
    ax.set_title(f"{run.experiment} ({run.profile_name}): {n} val images × {len(stack.blocks)} blocks", fontsize=9)
    ax.legend(fontsize=8)
    path = plots.save(fig, out or FIGURES / f"fig3_{run.experiment}.png")
    _log(run, [path], log)
    return path


# -- Figure 4: feature maps before and after blocks -----------------------------------------------------

def shown_blocks(blocks: int) -> list[int]:
    """The blocks (1-based) after which Figure 4 shows the maps: 2, 4, 6 of six; evenly spaced otherwise."""
    return sorted({max(1, round(blocks * k / 3)) for k in (1, 2, 3)})


def feature_maps(model, stack: DyHead, val, rt, indices: list[int]) -> tuple[list[int], list[list[np.ndarray]]]:
    """Per image: the finest level's channel-mean |x| before the stack, then after each shown block."""
    keep = shown_blocks(len(stack.blocks))
    seen: dict[int, torch.Tensor] = {}
    handles = [stack.register_forward_pre_hook(lambda mod, args: seen.__setitem__(0, args[0][0].float().cpu()))]
    for b in keep:
        handles.append(stack.blocks[b - 1].register_forward_hook(
            lambda mod, args, out, b=b: seen.__setitem__(b, out[0].float().cpu())))
    maps = []
    try:
        for i in indices:
            seen.clear()
            _forward(model, val, [i], rt, 1)
            maps.append([seen[b].abs().mean(dim=1)[0].numpy() for b in [0] + keep])
    finally:
        for h in handles:
            h.remove()
    return keep, maps


def figure4(run: RunConfig, out: Path | None = None, images: int = 4, threads=None, backend=None, log=print) -> Path:
    rt, val, model, stack = _model(run, threads, backend, log)
    indices = list(range(min(images, len(val))))
    keep, maps = feature_maps(model, stack, val, rt, indices)
    titles = ["image", "before the head"] + [f"after block {b}" for b in keep]
    fig, axes = plots.figure(len(indices), len(titles), size=(2.0 * len(titles), 2.0 * len(indices)))
    for row, (i, per_image) in enumerate(zip(indices, maps)):
        image, _ = val[i]
        axes[row, 0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        for col, m in enumerate(per_image, 1):
            axes[row, col].imshow(m, cmap="viridis")  # each map on its own scale: where, not how much
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
    fig.suptitle(f"{run.experiment} ({run.profile_name}): channel-mean |feature|, finest level", fontsize=9)
    path = plots.save(fig, out or FIGURES / f"fig4_{run.experiment}.png")
    _log(run, [path], log)
    return path


# -- detections beside the ground truth, and per-class AP ------------------------------------------------

def _boxes(ax, boxes_xywh, labels, color) -> None:
    import matplotlib.patches as patches

    for (x, y, w, h), text in zip(boxes_xywh, labels):
        ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.2))
        ax.text(x, y, text, color="white", fontsize=6, va="bottom", bbox={"facecolor": color, "pad": 0.5, "lw": 0})


def perclass_markdown(run: RunConfig, rows: list[dict]) -> str:
    lines = [f"# Per-class AP: `{run.experiment}` (profile {run.profile_name})", "",
             "From COCOeval's precision array (IoU 0.50:0.95 and 0.50, all areas, 100 detections), "
             f"over the val split of `{run.profile['data']['val_annotations']}`; from predictions.json.", "",
             "| category | AP | AP50 | instances |", "|---|---|---|---|"]
    for r in rows:
        ap = "–" if r["AP"] is None else f"{r['AP']:.1f}"
        ap50 = "–" if r["AP50"] is None else f"{r['AP50']:.1f}"
        lines.append(f"| {r['name']} | {ap} | {ap50} | {r['instances']} |")
    return "\n".join(lines) + "\n"


def detections(run: RunConfig, out: Path | None = None, images: int = 4, min_score: float = 0.3,
               perclass_out: Path | None = None, log=print) -> tuple[Path, Path]:
    """reports/figures/detections_<exp>.png and reports/perclass_<exp>.md from predictions.json."""
    data = run.profile["data"]
    pred_path = run.run_dir / "predictions.json"
    if not pred_path.exists():
        raise DyheadError(f"{pred_path}: not found; evaluate first (`dyhead evaluate {run.experiment} "
                          f"--profile {run.profile_name}`)")
    results = load_json(pred_path, list)
    val = runtime.make_dataset(run, train=False, transforms=False)
    coco = val.coco
    rows = per_class_ap(coco, results, val.image_ids, profile_area_ranges(run))
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    shown = val.image_ids[:images]
    fig, axes = plots.figure(len(shown), 2, size=(6.0, 3.0 * len(shown)))
    for row, image_id in enumerate(shown):
        info = coco.imgs[image_id]
        with Image.open(Path(data["val_images"]) / info["file_name"]) as im:
            pixels = np.asarray(im.convert("RGB"))
        gt = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        dt = [r for r in results if r["image_id"] == image_id and r["score"] >= min_score]
        for col, (what, boxes, labels, color) in enumerate((
                ("ground truth", [a["bbox"] for a in gt], [names[a["category_id"]] for a in gt], "tab:green"),
                (f"predictions (score ≥ {min_score})", [r["bbox"] for r in dt],
                 [f"{names[r['category_id']]} {r['score']:.2f}" for r in dt], "tab:red"))):
            ax = axes[row, col]
            ax.imshow(pixels)
            _boxes(ax, boxes, labels, color)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"image {image_id}: {what}", fontsize=8)
    fig.suptitle(f"{run.experiment} ({run.profile_name})", fontsize=9)
    path = plots.save(fig, out or FIGURES / f"detections_{run.experiment}.png")
    table = Path(perclass_out or f"reports/perclass_{run.experiment}.md")
    text = perclass_markdown(run, [{**r, "name": names[r["category_id"]]} for r in rows])
    save_text(table, text)
    save_text(table.with_suffix(".html"), plots.html_page(text, f"per-class AP {run.experiment}"))
    _log(run, [path, table], log)
    return path, table

"""The ImageNet stand-in for synthetic profiles: pretrain a backbone by classifying object crops.

The paper's backbones start from ImageNet classification weights; the mini stand-ins cannot (no
ImageNet here, and their widths differ). `dyhead pretrain <backbone>` gives them the same kind of
start: the body plus a linear classifier learns the category of every annotated object, cropped with
some context from the profile's *training* images and resized to a square, then the body's state dict
is saved where the profile's `weights: pretrained` points. Nothing of the validation split is used.
Written by hand because no library trains a classifier on COCO-format box crops; the crops come from
pycocotools' index and PIL.

    profile.pretrain: {crop_size, context, min_box, iterations, batch_size, base_lr, weight_decay}
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

from dyhead.config import pretrain_entry, repo_root
from dyhead.engine.runtime import set_threads
from dyhead.errors import DyheadError
from dyhead.files import save_json, save_torch
from dyhead.modeling.backbone import ResNet
from dyhead.modeling.build import backbone_config
from dyhead.modeling.detectors.common import IMAGENET_MEAN, IMAGENET_STD
from dyhead.ops import resolve_backend

HELD_OUT = 0.1  # fraction of the crops kept aside to report accuracy (from the training images)


def object_crops(images_dir: str, annotations: str, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every non-crowd box of at least `min_box` px, grown by `context` on each side, as normalised
    [N, 3, S, S] crops with contiguous labels (category ids in sorted order)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(annotations)
    cat_ids = sorted(coco.getCatIds())
    label_of = {c: i for i, c in enumerate(cat_ids)}
    size, ctx = cfg["crop_size"], cfg["context"]
    crops, labels = [], []
    for img_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
                if min(a["bbox"][2], a["bbox"][3]) >= cfg["min_box"]]
        if not anns:
            continue
        path = Path(images_dir) / coco.loadImgs(img_id)[0]["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise DyheadError(f"{path}: cannot read image ({exc})") from None
        for a in anns:
            x, y, w, h = a["bbox"]
            pad = ctx * max(w, h)
            crop = image.crop((x - pad, y - pad, x + w + pad, y + h + pad)).resize((size, size), Image.BILINEAR)
            crops.append(np.asarray(crop))
            labels.append(label_of[a["category_id"]])
    if not crops:
        raise DyheadError(f"{annotations}: no box of at least {cfg['min_box']} px to pretrain on")
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels), cat_ids


def pretrain_backbone(body: ResNet, crops: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: dict, *,
                      seed: int = 0, log=print) -> dict:
    """SGD with a cosine lr on random crop batches (horizontal flips); returns the summary."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    n_held = max(1, int(HELD_OUT * len(labels))) if len(labels) > 1 else 0
    held, train = order[:n_held], order[n_held:]
    fc = torch.nn.Linear(body.out_channels[-1], num_classes)
    params = [p for p in body.parameters() if p.requires_grad] + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=cfg["base_lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    iters, start = cfg["iterations"], time.time()
    body.train()
    for it in range(iters):
        lr = cfg["base_lr"] * 0.5 * (1 + math.cos(math.pi * it / iters))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = train[torch.randint(len(train), (cfg["batch_size"],), generator=gen)]
        xb = crops[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        loss = F.cross_entropy(fc(body(xb)[-1].mean(dim=(2, 3))), labels[idx])
        value = loss.item()
        if not math.isfinite(value):
            raise DyheadError(f"pretrain: loss is {value} at iteration {it}; lower pretrain.base_lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % max(1, iters // 10) == 0 or it + 1 == iters:
            elapsed = time.time() - start
            log(f"[pretrain] it {it + 1}/{iters} loss {value:.4f} lr {lr:.4f} "
                f"eta {elapsed / (it + 1) * (iters - it - 1):.0f}s")
    body.eval()
    with torch.no_grad():
        accuracy = float((fc(body(crops[held])[-1].mean(dim=(2, 3))).argmax(1) == labels[held]).float().mean()) \
            if n_held else None
    return {"iterations": iters, "crops": len(labels), "held_out": n_held, "held_out_accuracy": accuracy,
            "seconds": round(time.time() - start, 1)}


def run_pretrain(profile_name: str, profile: dict, backbone: str, out: Path, *, threads: int | None = None,
                 log=print) -> dict:
    """`dyhead pretrain`: crops from the profile's training split, the backbone's body, weights to `out`."""
    if "pretrain" not in profile:
        raise DyheadError(f"params/profiles/{profile_name}.yaml: no `pretrain` section (needed to pretrain {backbone!r})")
    if backbone not in profile["model"]["backbones"]:
        raise DyheadError(f"params/profiles/{profile_name}.yaml: model.backbones: no entry for {backbone!r}")
    set_threads(threads, profile["runtime"]["threads"])
    torch.manual_seed(profile["runtime"]["seed"])
    cfg, data = profile["pretrain"], profile["data"]
    root = repo_root()
    crops, labels, cat_ids = object_crops(str(root / data["train_images"]), str(root / data["train_annotations"]), cfg)
    log(f"[pretrain] {backbone} ({profile_name}): {len(labels)} crops of {len(cat_ids)} categories, "
        f"{cfg['crop_size']} px, {cfg['iterations']} iterations at batch {cfg['batch_size']}")
    backend = resolve_backend(profile["runtime"]["dcn_backend"])
    bb_cfg = backbone_config(pretrain_entry(profile["model"]["backbones"][backbone]), profile["model"]["fpn_channels"],
                             backend)
    body = ResNet(bb_cfg)
    summary = pretrain_backbone(body, crops, labels, len(cat_ids), cfg, seed=profile["runtime"]["seed"], log=log)
    summary.update(backbone=backbone, profile=profile_name, settings=cfg, file=str(out))
    save_torch(out, body.state_dict())
    save_json(out.with_suffix(".json"), summary)
    acc = summary["held_out_accuracy"]
    log(f"[pretrain] held-out crop accuracy {'–' if acc is None else f'{acc:.3f}'} in {summary['seconds']:.0f}s -> {out}")
    return summary

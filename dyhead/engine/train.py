"""Iteration-based SGD training with warmup, step decay, atomic checkpoints and automatic resume.

The data order is a pure function of (seed, iteration) (see dyhead.data.sampler), the learning
rate a pure function of the iteration, and the checkpoint holds weights and optimizer state, so
a killed run resumed from its last checkpoint ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import resource
import time
from pathlib import Path

import torch

from dyhead.config import PRETRAINED, RunConfig
from dyhead.data.coco import CocoDetection, collate
from dyhead.data.sampler import GroupedBatchSchedule, ResumableBatchSampler
from dyhead.data.transforms import build_transforms
from dyhead.engine import distributed
from dyhead.engine.checkpoint import load_checkpoint, save_json, save_torch
from dyhead.engine.tracking import NullTracker, Tracker, flat_params
from dyhead.errors import DyheadError
from dyhead.modeling.build import build_detector
from dyhead.ops import resolve_backend

CHECKPOINT = "checkpoints/last.pth"


def make_dataset(run: RunConfig, train: bool) -> CocoDetection:
    data, inp = run.profile["data"], run.profile["input"]
    split = "train" if train else "val"
    transforms = build_transforms(
        train,
        min_size=inp["min_size_train"] if train else inp["min_size_test"],
        max_size=inp["max_size"],
        flip_prob=inp["flip_prob"],
    )
    return CocoDetection(data[f"{split}_images"], data[f"{split}_annotations"], train=train, transforms=transforms)


def setup_runtime(run: RunConfig, threads: int | None = None, backend: str | None = None) -> tuple[torch.device, str]:
    rt = run.profile["runtime"]
    torch.set_num_threads(threads or rt["threads"])
    device = torch.device(rt["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DyheadError(f"profile {run.profile_name}: runtime.device is cuda but no CUDA device is visible")
    return device, resolve_backend(backend or rt["dcn_backend"])


def lr_at(iteration: int, solver: dict, max_iter: int) -> float:
    """Linear warmup from warmup_factor, then x0.1 at each step (fractions of the schedule)."""
    lr = solver["base_lr"] * 0.1 ** sum(iteration >= int(f * max_iter) for f in solver["steps"])
    if iteration < solver["warmup_iters"]:
        alpha = iteration / solver["warmup_iters"]
        lr *= solver["warmup_factor"] * (1 - alpha) + alpha
    return lr


def settings_digest(run: RunConfig) -> str:
    """What a checkpoint must agree with to be resumed (logging and checkpoint periods excluded)."""
    solver = {k: v for k, v in run.profile["solver"].items() if k not in ("checkpoint_period", "log_period")}
    keep = {"spec": run.spec, "model": run.profile["model"], "input": run.profile["input"], "solver": solver,
            "data": run.profile["data"], "seed": run.seed, "max_iter": run.max_iter}
    if run.backbone.get("weights") == PRETRAINED:  # the stand-in's recipe is part of the start point
        keep["pretrain"] = run.profile["pretrain"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def train(run: RunConfig, *, threads: int | None = None, backend: str | None = None, stop_at: int | None = None,
          log=print) -> dict:
    """Train `run` into run.run_dir; resumes from the last checkpoint there. Returns the summary."""
    out = run.run_dir
    device, backend = setup_runtime(run, threads, backend)
    ctx = distributed.init(device)  # under torchrun: join the process group, one GPU per rank
    device, log = ctx.device, (log if ctx.is_main else lambda *args, **kwargs: None)
    solver, max_iter = run.profile["solver"], run.max_iter
    dataset = make_dataset(run, train=True)
    if len(dataset) == 0:
        raise DyheadError(f"{run.profile['data']['train_annotations']}: no training image has a usable box")

    torch.manual_seed(run.seed)
    model = build_detector(run, len(dataset.category_ids), backend).to(device)
    net = distributed.wrap_model(model, ctx, sync_bn=run.backbone["norm"] == "sync_bn")  # DDP under torchrun
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=solver["base_lr"], momentum=solver["momentum"],
                                weight_decay=solver["weight_decay"])

    digest, start, elapsed_before = settings_digest(run), 0, 0.0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("digest") != digest:
            raise DyheadError(f"{ckpt_path}: written with other settings than {run.experiment} now has; "
                              "delete it to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, elapsed_before = ckpt["iteration"], ckpt.get("elapsed", 0.0)
        log(f"[{run.experiment}] resuming from {ckpt_path} at iteration {start}/{max_iter}")
    tracker = NullTracker()
    if ctx.is_main:  # rank 0 alone writes files and talks to MLflow
        _trim_log(out / "log.jsonl", start)
        tracker = Tracker.for_run(run, stage="train", digest=digest, resumed=start > 0,
                                  tags={"dcn_backend": backend, "world_size": ctx.world_size})
        tracker.log_params(flat_params(run.to_dict()))

    # each rank takes its slice of every global batch
    schedule = GroupedBatchSchedule(dataset.aspect_ratios(), solver["batch_size"], seed=run.seed,
                                    rank=ctx.rank, world_size=ctx.world_size)
    end = min(max_iter, stop_at) if stop_at is not None else max_iter
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=ResumableBatchSampler(schedule, start, end), collate_fn=collate,
        num_workers=run.profile["runtime"]["num_workers"],
    )
    log(f"[{run.experiment}] profile {run.profile_name}: {len(dataset)} train images, {max_iter} iterations "
        f"at batch {solver['batch_size']} over {ctx.world_size} process(es), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, dcn backend {backend}, "
        f"{torch.get_num_threads()} threads")

    model.train()
    t0 = time.perf_counter()
    window: dict[str, float] = {}
    window_n, window_grad, last_losses = 0, 0.0, {}
    iteration = start
    for iteration, (images, targets) in enumerate(loader, start):
        lr = lr_at(iteration, solver, max_iter)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = to_device(images, targets, device)
        losses = net(images, targets)
        total = sum(losses.values())
        seen = distributed.mean_over_ranks(losses)  # the global batch's losses, the same on every rank
        seen_total = sum(seen.values())
        if not torch.isfinite(seen_total):
            kept = f"last good checkpoint kept at {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
            raise DyheadError(f"[{run.experiment}] loss is {seen_total.item()} at iteration {iteration + 1} "
                              f"({', '.join(f'{k}={v.item():.4g}' for k, v in seen.items())}); stopped, {kept}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        # the total gradient norm is logged always (a diagnostic of head training); clipped only if the profile says
        grad_norm = torch.nn.utils.clip_grad_norm_(params, solver.get("clip_grad_norm", math.inf))
        optimizer.step()

        done = iteration + 1
        for k, v in seen.items():
            window[k] = window.get(k, 0.0) + v.item()
        window_grad = max(window_grad, grad_norm.item())
        window_n += 1
        if done % solver["log_period"] == 0 or done == max_iter:
            last_losses = {k: v / window_n for k, v in window.items()}
            last_losses["loss"] = sum(last_losses.values())
            spent = time.perf_counter() - t0
            per_it = spent / (done - start)
            record = {"iteration": done, "lr": lr, **{k: round(v, 6) for k, v in last_losses.items()},
                      "max_grad_norm": round(window_grad, 4), "sec_per_iter": round(per_it, 4)}
            if ctx.is_main:
                with open(out / "log.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=done)
            parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in last_losses.items() if k != "loss")
            log(f"[{run.experiment}] it {done}/{max_iter} loss {last_losses['loss']:.4f} ({parts}) lr {lr:.5f} "
                f"{per_it:.2f}s/it eta {_fmt_eta(per_it * (max_iter - done))}")
            window, window_n, window_grad = {}, 0, 0.0
        if done % solver["checkpoint_period"] == 0 and done < max_iter:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise DyheadError(f"[{run.experiment}] weights became non-finite at iteration {done}; stopped, "
                                  f"last good checkpoint kept at {ckpt_path}")
            if ctx.is_main:
                save_torch(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "iteration": done, "digest": digest,
                                       "elapsed": elapsed_before + time.perf_counter() - t0})
        iteration = done
    if stop_at is not None and iteration < max_iter:
        tracker.finish("KILLED")
        return {"stopped_at": iteration}
    if not ctx.is_main:  # the other ranks are done; rank 0 writes the outputs
        return {}

    elapsed = elapsed_before + time.perf_counter() - t0
    save_torch(out / "model_final.pth", {
        "model": model.state_dict(), "experiment": run.experiment, "profile": run.profile_name,
        "category_ids": dataset.category_ids, "config": run.to_dict(), "dcn_backend": backend,
    })
    summary = {
        "experiment": run.experiment, "profile": run.profile_name, "iterations": max_iter,
        "resumed_from": start, "train_seconds": round(elapsed, 1),
        "final_losses": {k: round(v, 5) for k, v in last_losses.items()},
        "parameters": sum(p.numel() for p in model.parameters()), "peak_rss_mb": round(peak_rss_mb(), 1),
        "dcn_backend": backend, "threads": torch.get_num_threads(), "device": str(device),
        "world_size": ctx.world_size,
        "torch": torch.__version__, "python": platform.python_version(), "config": run.to_dict(),
    }
    save_json(out / "train.json", summary)
    ckpt_path.unlink(missing_ok=True)
    tracker.log_artifact(out / "train.json")
    tracker.finish("FINISHED")
    log(f"[{run.experiment}] done in {_fmt_eta(elapsed)}, peak memory {summary['peak_rss_mb']:.0f} MB -> {out}/model_final.pth")
    return summary


def _trim_log(path: Path, iteration: int) -> None:
    """Drop log lines past the iteration we resume from (they will be written again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(line + "\n" for line in keep))

"""`dyhead train`: iteration-based SGD with warmup and step decay, atomic checkpoints and automatic resume.

The data order is a pure function of (seed, iteration) (dyhead.data.sampler), the learning rate a
pure function of the iteration, and the checkpoint holds weights and optimizer state, so a killed
run resumed from its last checkpoint ends with the same weights as an uninterrupted one.

    runs/<profile>/<exp>/checkpoints/last.pth   every solver.checkpoint_period iterations (deleted at the end)
    runs/<profile>/<exp>/log.jsonl              a line per log period: losses, lr, max gradient norm, s/it,
                                                s/it spent waiting for data; a line per curve point: curve_ap,
                                                curve_ap50, ... (profile `curve`)
    runs/<profile>/<exp>/model_final.pth        weights, categories and the settings they were trained with
    runs/<profile>/<exp>/train.json             the summary (time, memory, versions, settings)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dyhead.config import RunConfig
from dyhead.data.coco import collate
from dyhead.data.sampler import GroupedBatchSchedule, ResumableBatchSampler
from dyhead.engine import distributed, runtime
from dyhead.engine.inference import coco_metrics, final_weights, predict_sharded, profile_area_ranges
from dyhead.engine.tracking import NullTracker, Tracker, flat_params
from dyhead.errors import DyheadError
from dyhead.files import clean_leftovers, load_json, load_torch, save_json, save_text, save_torch
from dyhead.modeling.build import build_detector

CHECKPOINT = "checkpoints/last.pth"
LOG = "log.jsonl"
LOCK = ".train.lock"
# made from model_final.pth: stale once the experiment trains again
RESULTS = ("metrics.json", "predictions.json", "metrics_tta.json", "predictions_tta.json", "diagnose.json")


def lr_at(iteration: int, solver: dict, max_iter: int) -> float:
    """Linear warmup from warmup_factor, then x0.1 at each step (fractions of the schedule)."""
    lr = solver["base_lr"] * 0.1 ** sum(iteration >= int(f * max_iter) for f in solver["steps"])
    if iteration < solver["warmup_iters"]:
        alpha = iteration / solver["warmup_iters"]
        lr *= solver["warmup_factor"] * (1 - alpha) + alpha
    return lr


@dataclass
class LossWindow:
    """The losses of one log period, averaged, and the largest gradient norm in it."""

    sums: dict = field(default_factory=dict)
    steps: int = 0
    max_grad: float = 0.0
    data_seconds: float = 0.0  # time the steps waited for their batch (loader workers, or loading in-process)

    def add(self, losses: dict, grad_norm: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.item()
        self.max_grad = max(self.max_grad, grad_norm)
        self.steps += 1

    def close(self) -> dict:
        means = {k: v / self.steps for k, v in self.sums.items()}
        means["loss"] = sum(means.values())
        return means


def resume(ckpt_path: Path, run: RunConfig, model, optimizer, log, scaler=None) -> tuple[int, float, list[str]]:
    """Load the last checkpoint if there is one: (iteration to start from, seconds already spent, the
    machines the iterations before it ran on)."""
    if not ckpt_path.exists():
        return 0, 0.0, []
    ckpt = load_torch(ckpt_path, "training checkpoint",
                      fix="delete it to restart the training from iteration 0, or restore an intact copy")
    if not isinstance(ckpt, dict) or ckpt.get("digest") != run.digest:
        raise DyheadError(f"{ckpt_path}: written with other settings than {run.experiment} now has; "
                          "delete it to start over")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "scaler" in ckpt:  # the loss scale a resumed fp16 run continues from
        scaler.load_state_dict(ckpt["scaler"])
    log(f"[{run.experiment}] resuming from {ckpt_path} at iteration {ckpt['iteration']}/{run.max_iter}")
    return ckpt["iteration"], ckpt.get("elapsed", 0.0), list(ckpt.get("machines", []))


def trim_log(path: Path, iteration: int) -> None:
    """Keep the log lines up to the iteration we resume from (the rest are written again). A torn last
    line (a kill mid-write) is dropped; a bad line elsewhere is an error naming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the kill came while this line was written
                break
            raise DyheadError(f"{path}: line {n} is not valid JSON; fix or delete the file to resume") from None
        if record.get("iteration", 0) <= iteration:
            keep.append(line)
    save_text(path, "".join(line + "\n" for line in keep))


def open_tracker(run: RunConfig, ctx, start: int, backend: str, precision: str = "fp32", machine: str = ""):
    """Rank 0 alone writes files and talks to MLflow. A training that starts from iteration 0 opens a new
    MLflow run: the FLOPs counted before it (flops.json; they depend on the settings, not the weights) are
    logged into it again, so no run loses them."""
    if not ctx.is_main:
        return NullTracker()
    trim_log(run.run_dir / LOG, start)
    tracker = Tracker.for_run(run, stage="train", resumed=start > 0,
                              tags={"dcn_backend": backend, "world_size": ctx.world_size, "precision": precision,
                                    "machine": machine})
    tracker.log_params(flat_params(run.to_dict()))
    flops = run.run_dir / "flops.json"
    if start == 0 and flops.exists():
        record = load_json(flops, dict)
        tracker.log_metrics({f"gmacs_{k}": v["gmacs"] for k, v in record.items()
                             if isinstance(v, dict) and "gmacs" in v}, step=0)
        tracker.log_artifact(flops)
    return tracker


@contextlib.contextmanager
def training_lock(run: RunConfig, ctx, log):
    """One process trains an experiment at a time (a rerun after a killed Snakemake may find the killed run's
    orphaned training still going): a second waits for the first, then finds its result. Rank 0 holds it."""
    if not ctx.is_main:
        yield
        return
    path = run.run_dir / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            log(f"[{run.experiment}] {holder} is training this experiment ({path}); waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


def trained_already(run: RunConfig, force: bool) -> dict | None:
    """The summary of a finished training with the same settings (nothing to do), None to train. A finished
    training with other settings is refused unless `force`; training again removes the old results."""
    final, summary = final_weights(run), run.run_dir / "train.json"
    if final.exists() and not force:
        digest = load_torch(final, "model").get("digest")
        if digest == run.digest and summary.exists():
            return load_json(summary, dict)
        raise DyheadError(f"{final}: trained {'with other settings' if digest else 'by an older version'} than "
                          f"{run.experiment} now has; `dyhead train {run.experiment} --profile {run.profile_name} "
                          "--force` trains it again and removes its results")
    return None


def remove_stale(run: RunConfig, log) -> None:
    """A new model is on its way (a training from iteration 0, or --force): what was made from the old one goes."""
    stale = [run.run_dir / name for name in ("model_final.pth", "train.json") + RESULTS]
    stale = [p for p in stale if p.exists()]
    for p in stale:
        p.unlink()
    if stale:
        log(f"[{run.experiment}] removed the previous model's {', '.join(p.name for p in stale)}")


@dataclass
class Training:
    """Everything one training holds while it runs."""

    run: RunConfig
    rt: runtime.Runtime
    dataset: object
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or DDP around it under torchrun
    params: list
    optimizer: torch.optim.Optimizer
    start: int  # the iteration this process starts at (resumed or 0)
    elapsed_before: float  # seconds spent before a resume
    tracker: object
    scaler: torch.amp.GradScaler | None = None  # fp16 only: bf16 has fp32's range and needs none
    curve_data: object = None  # the val split the AP curve reads (profile `curve`), None when it is off
    machines: list = field(default_factory=list)  # every machine the run trained on, first first (runtime.machine)

    @property
    def ckpt_path(self) -> Path:
        return self.run.run_dir / CHECKPOINT


def setup(run: RunConfig, rt: runtime.Runtime) -> Training:
    """Data, model, optimizer; the last checkpoint loaded if there is one (stale results removed if not);
    the MLflow run opened."""
    solver = run.profile["solver"]
    dataset = runtime.make_dataset(run, train=True)
    if len(dataset) == 0:
        raise DyheadError(f"{run.profile['data']['train_annotations']}: no training image has a usable box")
    torch.manual_seed(run.seed)
    model = build_detector(run, len(dataset.category_ids), rt.backend).to(rt.device)
    runtime.compile_blocks(model, run)
    net = distributed.wrap_model(model, rt.ctx, sync_bn=run.backbone["norm"] == "sync_bn")  # DDP under torchrun
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=solver["base_lr"], momentum=solver["momentum"],
                                weight_decay=solver["weight_decay"])
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    start, elapsed_before, machines = resume(run.run_dir / CHECKPOINT, run, model, optimizer, rt.log, scaler)
    here = runtime.machine(rt.device)
    if here not in machines:  # a run resumed on another machine type mixes their roundings: train.json says so
        machines.append(here)
    if start == 0 and rt.ctx.is_main:
        remove_stale(run, rt.log)
    tracker = open_tracker(run, rt.ctx, start, rt.backend, rt.precision, here)
    curve_data = runtime.make_dataset(run, train=False) if curve_settings(run)[0] else None
    return Training(run, rt, dataset, model, net, params, optimizer, start, elapsed_before, tracker, scaler,
                    curve_data, machines)


def loader_for(t: Training, end: int) -> torch.utils.data.DataLoader:
    """Batches start..end-1 of the run's deterministic stream; each rank takes its slice of every global batch."""
    run, ctx = t.run, t.rt.ctx
    schedule = GroupedBatchSchedule(t.dataset.aspect_ratios(), run.profile["solver"]["batch_size"], seed=run.seed,
                                    rank=ctx.rank, world_size=ctx.world_size)
    return torch.utils.data.DataLoader(t.dataset, batch_sampler=ResumableBatchSampler(schedule, t.start, end),
                                       collate_fn=collate, num_workers=run.profile["runtime"]["num_workers"])


def step(t: Training, images, targets, iteration: int) -> tuple[dict, float]:
    """One SGD step; returns the global batch's losses (equal on every rank) and the gradient norm."""
    solver = t.run.profile["solver"]
    lr = lr_at(iteration, solver, t.run.max_iter)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    images, targets = runtime.to_device(images, targets, t.rt.device)
    with t.rt.autocast():
        losses = t.net(images, targets)
    seen = distributed.mean_over_ranks(losses)
    seen_total = sum(seen.values())
    if not torch.isfinite(seen_total):
        kept = f"last good checkpoint kept at {t.ckpt_path}" if t.ckpt_path.exists() else "no checkpoint was written yet"
        raise DyheadError(f"[{t.run.experiment}] loss is {seen_total.item()} at iteration {iteration + 1} "
                          f"({', '.join(f'{k}={v.item():.4g}' for k, v in seen.items())}); stopped, {kept}")
    t.optimizer.zero_grad(set_to_none=True)
    total = sum(losses.values())
    if t.scaler is None:
        total.backward()
    else:  # fp16: the loss scaled up so small gradients survive, unscaled before clipping and the update
        t.scaler.scale(total).backward()
        t.scaler.unscale_(t.optimizer)
    # the total gradient norm is logged always (a diagnostic of head training); clipped only if the profile says
    grad_norm = torch.nn.utils.clip_grad_norm_(t.params, solver.get("clip_grad_norm", math.inf)).item()
    if t.scaler is None:
        t.optimizer.step()
    else:
        t.scaler.step(t.optimizer)  # skipped when the scaled gradients overflowed; the scale then shrinks
        t.scaler.update()
        grad_norm = grad_norm if math.isfinite(grad_norm) else 0.0
    return seen, grad_norm


def log_window(t: Training, window: LossWindow, done: int, seconds: float) -> dict:
    """Close a log period: a line in log.jsonl, the metrics in MLflow, a progress line."""
    run, max_iter = t.run, t.run.max_iter
    losses = window.close()
    lr = lr_at(done - 1, run.profile["solver"], max_iter)
    per_it = seconds / (done - t.start)
    record = {"iteration": done, "lr": lr, **{k: round(v, 6) for k, v in losses.items()},
              "max_grad_norm": round(window.max_grad, 4), "sec_per_iter": round(per_it, 4),
              "data_sec_per_iter": round(window.data_seconds / window.steps, 4)}
    if t.rt.ctx.is_main:
        with open(run.run_dir / LOG, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    t.tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=done)
    parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items() if k != "loss")
    t.rt.log(f"[{run.experiment}] it {done}/{max_iter} loss {losses['loss']:.4f} ({parts}) lr {lr:.5f} "
             f"{per_it:.2f}s/it eta {runtime.fmt_duration(per_it * (max_iter - done))}")
    return losses


def curve_settings(run: RunConfig) -> tuple[int, int]:
    """(period in iterations, val images) of the AP curve; (0, 0) when the profile has it off. A profile
    section of its own: outside the settings digest (it does not change the weights) and outside the keys
    DVC's evaluate stages track (`eval`), so turning it on invalidates nothing."""
    curve = run.profile.get("curve", {})
    period, images = curve.get("period", 0), curve.get("images", 0)
    return (period, images) if period and images else (0, 0)


def _quiet(*args, **kwargs) -> None:
    pass


def curve_point(t: Training, done: int) -> dict | None:
    """COCO AP of the model at iteration `done` on the first `curve.images` val images: a line in log.jsonl
    and MLflow metrics. Eval mode (BN statistics read, not updated), no gradients and a forked RNG (the val
    DataLoader draws a seed from the global generator), so the training continues bit-identically to a run
    without the curve. Under torchrun every rank predicts a shard of the images and rank 0 scores them."""
    run, rt, val = t.run, t.rt, t.curve_data
    images = min(curve_settings(run)[1], len(val))
    t0 = time.perf_counter()
    devices = [rt.device] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), rt.autocast():
        results = predict_sharded(t.model, val, run.profile["eval"]["batch_size"], rt.ctx, _quiet, run.experiment,
                                  limit=images)
    t.model.train()
    if not rt.ctx.is_main:
        return None
    metrics = coco_metrics(val.coco, results, val.image_ids[:images], profile_area_ranges(run))
    record = {"iteration": done, **{f"curve_{k.lower()}": v for k, v in metrics.items()},
              "curve_images": images, "curve_seconds": round(time.perf_counter() - t0, 3)}
    with open(run.run_dir / LOG, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    t.tracker.log_metrics({k: v for k, v in record.items() if k.startswith("curve_ap") and v is not None}, step=done)
    rt.log(f"[{run.experiment}] it {done} curve AP {metrics['AP']} AP50 {metrics['AP50']} on {images} val images "
           f"({record['curve_seconds']:.1f}s)")
    return record


def save_checkpoint(t: Training, done: int, elapsed: float) -> None:
    if not all(torch.isfinite(p).all() for p in t.model.parameters()):
        raise DyheadError(f"[{t.run.experiment}] weights became non-finite at iteration {done}; stopped, "
                          f"last good checkpoint kept at {t.ckpt_path}")
    if t.rt.ctx.is_main:
        state = {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                 "iteration": done, "digest": t.run.digest, "elapsed": elapsed, "machines": t.machines}
        if t.scaler is not None:
            state["scaler"] = t.scaler.state_dict()
        save_torch(t.ckpt_path, state)


def train(run: RunConfig, *, threads: int | None = None, backend: str | None = None, stop_at: int | None = None,
          force: bool = False, log=print) -> dict:
    """Train `run` into run.run_dir; resumes from the last checkpoint there. Returns the summary."""
    if stop_at is not None and stop_at < 1:
        raise DyheadError(f"--stop-at {stop_at}: must be an iteration >= 1")
    rt = runtime.start(run, threads, backend, log)  # under torchrun: join the process group, one GPU per rank
    with training_lock(run, rt.ctx, rt.log):
        done = distributed.broadcast(trained_already(run, force) if rt.ctx.is_main else None, rt.ctx)
        if done is not None:
            rt.log(f"[{run.experiment}] already trained with these settings ({final_weights(run)}); nothing to do "
                   "(--force trains it again)")
            return done
        if force and rt.ctx.is_main:
            remove_stale(run, rt.log)
        return _train(run, rt, stop_at)


def _train(run: RunConfig, rt: runtime.Runtime, stop_at: int | None) -> dict:
    t = setup(run, rt)
    solver, max_iter = run.profile["solver"], run.max_iter
    curve_period = curve_settings(run)[0]  # read once, not per iteration
    end = min(max_iter, stop_at) if stop_at is not None else max_iter
    loader = loader_for(t, end)
    rt.log(f"[{run.experiment}] profile {run.profile_name}: {len(t.dataset)} train images, {max_iter} iterations "
           f"at batch {solver['batch_size']} over {rt.ctx.world_size} process(es), "
           f"{sum(p.numel() for p in t.model.parameters()):,} parameters, dcn backend {rt.backend}, "
           f"{rt.precision}, {torch.get_num_threads()} threads")

    t.model.train()
    t0 = time.perf_counter()
    window, last_losses = LossWindow(), {}
    iteration = t.start
    waited_from = time.perf_counter()
    for iteration, (images, targets) in enumerate(loader, t.start):
        window.data_seconds += time.perf_counter() - waited_from
        seen, grad_norm = step(t, images, targets, iteration)
        done = iteration + 1
        window.add(seen, grad_norm)
        if done % solver["log_period"] == 0 or done == max_iter:
            last_losses = log_window(t, window, done, time.perf_counter() - t0)
            window = LossWindow()
        # before the checkpoint: a checkpoint at `done` implies its curve point is logged (resume adds none twice)
        if t.curve_data is not None and (done % curve_period == 0 or done == max_iter):
            curve_point(t, done)
        if done % solver["checkpoint_period"] == 0 and done < max_iter:
            save_checkpoint(t, done, t.elapsed_before + time.perf_counter() - t0)
        iteration = done
        waited_from = time.perf_counter()
    if stop_at is not None and iteration < max_iter:
        t.tracker.finish("KILLED")
        return {"stopped_at": iteration}
    if not rt.ctx.is_main:  # the other ranks are done; rank 0 writes the outputs
        return {}
    return finish(t, t.elapsed_before + time.perf_counter() - t0, last_losses)


def finish(t: Training, elapsed: float, last_losses: dict) -> dict:
    """model_final.pth and train.json; the checkpoint goes, the MLflow run is closed."""
    run, rt, out = t.run, t.rt, t.run.run_dir
    save_torch(final_weights(run), {
        "model": t.model.state_dict(), "experiment": run.experiment, "profile": run.profile_name,
        "category_ids": t.dataset.category_ids, "config": run.to_dict(), "dcn_backend": rt.backend,
        "digest": run.digest,
    })
    summary = {
        "experiment": run.experiment, "profile": run.profile_name, "iterations": run.max_iter,
        "resumed_from": t.start, "train_seconds": round(elapsed, 1),
        "final_losses": {k: round(v, 5) for k, v in last_losses.items()},
        "parameters": sum(p.numel() for p in t.model.parameters()), "peak_rss_mb": round(runtime.peak_rss_mb(), 1),
        "dcn_backend": rt.backend, "precision": rt.precision, "threads": torch.get_num_threads(),
        "device": str(rt.device), "machines": t.machines,
        "world_size": rt.ctx.world_size,
        "torch": torch.__version__, "python": platform.python_version(), "config": run.to_dict(),
    }
    save_json(out / "train.json", summary)
    t.ckpt_path.unlink(missing_ok=True)
    clean_leftovers(t.ckpt_path)  # a kill while a checkpoint was written leaves its temporary file
    t.tracker.log_artifact(out / "train.json")
    t.tracker.finish("FINISHED")
    rt.log(f"[{run.experiment}] done in {runtime.fmt_duration(elapsed)}, peak memory {summary['peak_rss_mb']:.0f} MB "
           f"-> {final_weights(run)}")
    return summary

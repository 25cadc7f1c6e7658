"""Run setup every stage shares: threads, device, deformable-conv backend, process group, datasets.

    rt = runtime.start(run, threads, backend, log)   # train, evaluate, TTA, test-dev, diagnose
    rt.device, rt.backend, rt.ctx (rank, world size), rt.log (silent on ranks other than 0)

Stages import this floor and `inference`, never each other.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Callable

import torch

from dyhead.config import RunConfig
from dyhead.data.coco import CocoDetection
from dyhead.data.transforms import build_transforms
from dyhead.engine import distributed
from dyhead.errors import DyheadError
from dyhead.ops import resolve_backend


def _silent(*args, **kwargs) -> None:
    pass


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage runs, resolved once from the profile and the command line."""

    ctx: distributed.Dist
    backend: str  # 'native' or 'torchvision'
    log: Callable

    @property
    def device(self) -> torch.device:
        return self.ctx.device


def set_threads(threads: int | None, default: int) -> int:
    n = default if threads is None else threads
    if n < 1:
        raise DyheadError(f"--threads {n}: must be at least 1")
    torch.set_num_threads(n)
    return n


def start(run: RunConfig, threads: int | None = None, backend: str | None = None, log=print) -> Runtime:
    """Threads and device from the profile (or the command line), the backend resolved, and under torchrun
    the process group joined (one GPU per rank); only rank 0 logs."""
    rt = run.profile["runtime"]
    set_threads(threads, rt["threads"])
    device = torch.device(rt["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DyheadError(f"profile {run.profile_name}: runtime.device is cuda but no CUDA device is visible")
    try:
        resolved = resolve_backend(backend or rt["dcn_backend"])
    except (ValueError, RuntimeError) as exc:
        raise DyheadError(str(exc)) from None
    ctx = distributed.init(device)
    return Runtime(ctx, resolved, log if ctx.is_main else _silent)


def make_dataset(run: RunConfig, train: bool, transforms: bool = True) -> CocoDetection:
    """The profile's train or val split; `transforms=False` yields original images (TTA resizes them itself)."""
    data, inp = run.profile["data"], run.profile["input"]
    split = "train" if train else "val"
    tf = None
    if transforms:
        tf = build_transforms(train, min_size=inp["min_size_train"] if train else inp["min_size_test"],
                              max_size=inp["max_size"], flip_prob=inp["flip_prob"])
    return CocoDetection(data[f"{split}_images"], data[f"{split}_annotations"], train=train, transforms=tf)


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

"""Run setup every stage shares: threads, device, deformable-conv backend, process group, datasets.

    rt = runtime.start(run, threads, backend, log)   # train, evaluate, TTA, test-dev, diagnose
    rt.device, rt.backend, rt.ctx (rank, world size), rt.log (silent on ranks other than 0)

Stages import this floor and `inference`, never each other.
"""
from __future__ import annotations

import platform
import resource
from dataclasses import dataclass
from pathlib import Path
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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage runs, resolved once from the profile and the command line."""

    ctx: distributed.Dist
    backend: str  # 'native' or 'torchvision'
    log: Callable
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def autocast(self):
        """The network's forward in the profile's precision. Detectors run their losses, assignment, box
        decoding and NMS outside it on fp32 copies of the outputs (Detector.forward): sums over thousands of
        anchors and IoU thresholds are where half precision goes wrong."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 where the GPU has it (Ampere and newer), else fp32; the others as they are."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


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
    if device.type == "cuda":  # TF32 tensor cores for the fp32 matmuls and convs (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = rt.get("tf32", True)
    ctx = distributed.init(device)
    precision = resolve_precision(rt.get("precision", "fp32"), device)
    return Runtime(ctx, resolved, log if ctx.is_main else _silent, precision)


def compile_blocks(model: torch.nn.Module, run: RunConfig) -> int:
    """torch.compile each DyHead block in place when the profile says `runtime.compile: blocks`; returns how many.

    Every block runs the same code on the same shapes, so one compiled graph (forward and backward) serves all
    blocks of a model, and the on-disk cache (TORCHINDUCTOR_CACHE_DIR) serves every later job whose level
    shapes match. The DCN is an opaque custom op inside the graph; what compiles is the chain around it
    (GroupNorm, scale attention, DyReLU, resampling). Weights and state dicts are unchanged."""
    if run.profile["runtime"].get("compile", "none") != "blocks":
        return 0
    from dyhead.modeling.dyhead import DyHeadBlock

    blocks = [m for m in model.modules() if isinstance(m, DyHeadBlock)]
    for block in blocks:
        block.compile()
    return len(blocks)


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


def machine(device: torch.device) -> str:
    """The hardware a run's numbers come from, as train.json and the reports name it. Float rounding depends on
    the kernels torch picks, so runs repeat bit for bit on one machine type and differ across types by about the
    run-to-run noise: the GPU's name, or the CPU's model with the ATen kernel family (AVX512, AVX2, ...) and AMX,
    which oneDNN uses where it is."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux
        pass
    extras = ", AMX" if "amx_tile" in flags else ""
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}{extras})"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

"""torch.distributed plumbing for `torchrun ... -m dyhead.cli train|evaluate`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every worker (and the rendezvous address), so a
process started by it joins the process group: NCCL when the profile runs on CUDA, gloo on CPU.
A plain `dyhead train` has none of these variables and runs as one process without a group; all
helpers here are then no-ops, so the single-process code path stays exactly what it was.

What the trainer and the evaluator need from it:
  * `init` (device -> Dist): join the group, pick cuda:LOCAL_RANK;
  * `wrap_model`: SyncBN where the profile asks for it, then DDP (gradients averaged over ranks);
  * `mean_over_ranks`: the global batch's losses, equal on every rank (logging, the NaN stop);
  * `shard_batches` + `gather_predictions`: evaluation split by whole batches (each image sees
    the same batch-mates, hence the same padding, as in a single process) and merged on rank 0.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dyhead.errors import DyheadError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; world_size 1 and no group for a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, writes files and talks to MLflow."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (idempotent); else a single-process Dist."""
    if not launched_by_torchrun():
        return Dist(device=device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DyheadError(f"torchrun local rank {local} has no GPU: {torch.cuda.device_count()} visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(shutdown)
    return Dist(rank, world, local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Dist, sync_bn: bool) -> nn.Module:
    """DDP around `model` (whose state_dict stays unprefixed for checkpoints); `model` itself alone."""
    if not ctx.enabled:
        return model
    if sync_bn:
        if ctx.device.type == "cuda":
            # in place: the BN modules are swapped, their parameters kept, so optimizers stay valid
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:
            warnings.warn("norm: sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                          "BatchNorm statistics stay per rank on CPU", stacklevel=2)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached averages over ranks. With losses normalised by positives averaged over ranks
    (reduce_mean in the detectors), the rank mean is the loss of the global batch."""
    out = {k: v.detach() for k, v in values.items()}
    if not (dist.is_available() and dist.is_initialized()) or not out:
        return out
    stacked = torch.stack([v.float() for v in out.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(out, stacked.cpu()))


def shard_batches(num_items: int, batch_size: int, ctx: Dist) -> list[list[int]]:
    """Every world_size-th batch of the in-order batching, starting at this rank: disjoint shards
    whose union is every index once."""
    batches = [list(range(i, min(i + batch_size, num_items))) for i in range(0, num_items, batch_size)]
    return batches[ctx.rank::ctx.world_size]


def merge_shards(results: list[list[dict]], shard_ids: list[list[int]], all_ids: list[int]) -> list[dict]:
    """Rank 0's merge: check the shards cover `all_ids` exactly once, then order the detections by
    image as a single process would (stable, so each image keeps its own order)."""
    seen = [i for ids in shard_ids for i in ids]
    if len(seen) != len(set(seen)) or sorted(seen) != sorted(all_ids):
        dup = len(seen) - len(set(seen))
        missing = len(set(all_ids) - set(seen))
        raise DyheadError(f"distributed evaluation covered {len(set(seen))} of {len(all_ids)} images "
                          f"({dup} duplicated, {missing} missing); nothing written")
    position = {image_id: i for i, image_id in enumerate(all_ids)}
    return sorted((r for part in results for r in part), key=lambda r: position[r["image_id"]])


def gather_predictions(results: list[dict], shard_image_ids: list[int], all_ids: list[int],
                       ctx: Dist) -> list[dict] | None:
    """All ranks' detections merged on rank 0 (None on the others); the plain list when single."""
    if not ctx.enabled:
        return merge_shards([results], [shard_image_ids], all_ids)
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object((results, shard_image_ids), gathered, dst=0)
    if not ctx.is_main:
        return None
    return merge_shards([g[0] for g in gathered], [g[1] for g in gathered], all_ids)


def broadcast(obj, ctx: Dist):
    """Rank 0's `obj` on every rank (a decision all ranks must share); `obj` itself in a single process."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gpu_report(expected: int) -> tuple[str, int]:
    """What a job sees (device count, CUDA_VISIBLE_DEVICES, `nvidia-smi -L`) as text, and the count."""
    count = torch.cuda.device_count()
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        smi = f"(nvidia-smi not available: {exc})"
    text = (f"requested_gpus: {expected}\n"
            f"torch.cuda.device_count: {count}\n"
            f"CUDA_VISIBLE_DEVICES: {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}\n"
            f"SLURM_JOB_ID: {os.environ.get('SLURM_JOB_ID', 'unset')}\n"
            f"host: {os.uname().nodename}\n"
            f"nvidia-smi -L:\n{smi}\n")
    return text, count

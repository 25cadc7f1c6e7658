"""One launcher for `dyhead train|evaluate`: this process alone, torchrun over a node, or over several nodes.

Snakemake's rules and dvc.yaml call the same command, and it decides how many processes run:

    dyhead train <exp> --processes auto  # dvc.yaml, local Snakemake: every GPU the node shows (CUDA
                                         # profiles), one process on CPU; $DYHEAD_PROCESSES sets the count
    dyhead train <exp> --processes 8     # the slurm profile: the job's 8 GPUs
    dyhead train <exp> --processes 8 --nnodes 2 --rdzv-endpoint HOST:PORT --rdzv-id ID
                                         # one launcher per node (srun), joined by torchrun's c10d rendezvous

With more than one process in all, the command re-executes itself under torch's own launcher
(`python -m torch.distributed.run ... -m dyhead.cli <the same arguments>`); the workers see torchrun's
RANK/WORLD_SIZE and run the stage (engine/distributed.py). `solver.batch_size` stays the global batch and
`solver.base_lr` its learning rate whatever the number of processes: each rank takes batch / world of every
batch, so N processes on any number of nodes follow one process.

Imports no torch until it counts GPUs: the CLI builds its parser from here.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

from dyhead.errors import DyheadError

PROCESSES_ENV = "DYHEAD_PROCESSES"  # the count `--processes auto` takes, e.g. 2 gloo processes on a CPU machine


@dataclass(frozen=True)
class Launch:
    """How many processes run one stage: `nproc` on each of `nnodes` nodes."""

    nproc: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d store, on the first node (nnodes > 1)
    rdzv_id: str = "dyhead"

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def processes_arg(value: str) -> str:
    """argparse type of --processes: `auto` or a whole number >= 1."""
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"must be auto or a whole number >= 1, got {value!r}")
    return value


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES (and SLURM's binding)


def processes_on_node(value: str, device: str) -> int:
    """--processes as a count: `auto` is $DYHEAD_PROCESSES if set, else the visible GPUs on a CUDA profile,
    else 1. On CUDA, one GPU per process."""
    env = os.environ.get(PROCESSES_ENV)
    if value != "auto":
        n, source = int(value), f"--processes {value}"
    elif env is not None:
        if not (env.isdigit() and int(env) >= 1):
            raise DyheadError(f"{PROCESSES_ENV}={env!r}: must be a whole number >= 1")
        n, source = int(env), f"{PROCESSES_ENV}={env}"
    else:
        return max(1, visible_gpus()) if device == "cuda" else 1
    if device == "cuda" and n > (seen := visible_gpus()):
        raise DyheadError(f"{source}: this machine shows {seen} GPU(s), one per process "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return n


def plan(processes: str, device: str, nnodes: int = 1, rdzv_endpoint: str | None = None,
         rdzv_id: str | None = None) -> Launch:
    """The launch the command line asks for, checked before anything starts."""
    if nnodes < 1:
        raise DyheadError(f"--nnodes {nnodes}: must be at least 1")
    if nnodes > 1:
        host, _, port = (rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise DyheadError(f"--nnodes {nnodes}: --rdzv-endpoint must be HOST:PORT on the first node, "
                              f"got {rdzv_endpoint!r}")
    return Launch(processes_on_node(processes, device), nnodes, rdzv_endpoint,
                  rdzv_id or os.environ.get("SLURM_JOB_ID") or "dyhead")


def check_batch(batch_size: int, launch: Launch, where: str) -> None:
    """The global batch splits evenly over the ranks."""
    if batch_size % launch.world_size:
        raise DyheadError(f"{where}: solver.batch_size {batch_size} does not split over {launch.world_size} "
                          f"processes ({launch.nnodes} node(s) x {launch.nproc}); it is the global batch, "
                          "each process takes an equal share")


def torchrun_args(launch: Launch) -> list[str]:
    """torch.distributed.run's options: a standalone rendezvous on one node, c10d across nodes."""
    if launch.nnodes == 1:
        return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(launch.nproc)]
    return ["--nnodes", str(launch.nnodes), "--nproc-per-node", str(launch.nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", launch.rdzv_endpoint, "--rdzv-id", launch.rdzv_id]


def relaunch(launch: Launch, argv: list[str]) -> None:
    """Replace this process by torchrun running `dyhead <argv>` in each worker when the stage wants more than
    one process; return otherwise, and in the workers. exec, not a child: the signals SLURM, Snakemake or
    DVC send reach torchrun, which passes them on to the workers."""
    from dyhead.engine.distributed import launched_by_torchrun

    if launch.world_size == 1 or launched_by_torchrun():
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(launch), "-m", "dyhead.cli", *argv]
    print(f"dyhead: {launch.nproc} process(es) on each of {launch.nnodes} node(s): {shlex.join(cmd)}", flush=True)
    sys.stderr.flush()
    os.execv(sys.executable, cmd)

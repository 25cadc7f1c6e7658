# Reads the experiment matrix and the profile once, at parse time, so a bad key fails before
# any job starts. Helper functions only; no rule logic here.
import sys
from pathlib import Path

from dyhead.config import load_matrix, load_profile, pretrained_path, weights_file
from dyhead.costs import train_priority as train_priority_of
from dyhead.errors import DyheadError

PROFILE = config["profile"]
try:
    MATRIX = load_matrix(Path.cwd(), PROFILE, seeds=config.get("seeds"))
    PROFILE_CFG = load_profile(PROFILE, Path.cwd())
except DyheadError as exc:
    sys.exit(f"dyhead: error: {exc}")

DATA = PROFILE_CFG["data"]
# reports and figures read each row's seed runs: say how many when --config seeds=N overrides the profile
SEEDS_FLAG = f" --seeds {config['seeds']}" if "seeds" in config else ""
RUNS = f"runs/{PROFILE}"


# The order in which ready jobs start (Snakemake runs the highest first): the inputs every training waits
# for, then the trainings, longest first (dyhead/costs.py), then evaluations, then FLOP counts and reports,
# which fill the cores while the last trainings run.
PRIORITY = {"inputs": 10000, "evaluate": 50, "flops": 10}


def train_priority(wildcards):
    spec = MATRIX.experiments[wildcards.exp]
    schedules = PROFILE_CFG["solver"]["schedules"]
    return train_priority_of(spec, schedules[spec["schedule"]], schedules.get("1x", min(schedules.values())))


def data_ready():
    """The file that proves the profile's data is in place."""
    if DATA["source"] in ("synthetic", "cocolike"):
        return f"{DATA['root']}/synth.json"
    return DATA["val_annotations"]


def table_runs(table, filename):
    """`filename` of every experiment a table (or grid_<name>) reads."""
    return [f"{RUNS}/{exp}/{filename}" for exp in MATRIX.table_experiments(table)]


# How `dyhead train|evaluate` starts its processes (dyhead/engine/launch.py); dvc.yaml says
# `--processes auto` too, so both orchestrators run the same command: every GPU the machine shows on a
# CUDA profile, one process on CPU. A job with GPUs (the slurm profile: gpu=8) names their count; a
# training whose `nodes` resource is N > 1 runs one launcher per node under srun, joined by torchrun's
# c10d rendezvous on the node the job's shell runs on (the first one). `gpu` counts the job's GPUs on all
# its nodes, as SLURM's --gpus does.
RDZV_PORT = 29500


def profile_resource(rule, name, default=0):
    """The value --set-resources (a workflow profile) gives `rule`'s resource `name`, read at parse time."""
    resources = workflow.resource_settings.overwrite_resources.get(rule) or {}
    value = resources[name] if name in resources else default
    return int(getattr(value, "value", value) or 0)  # a snakemake Resource, or a plain number


def multinode(rule):
    """What a training over several nodes adds to its SLURM resources: `mpi` (the jobstep plugin runs the
    shell as it is, and the shell calls srun itself), one task per node, and tasks_per_gpu 0 (else the
    plugin would read `tasks` as tasks per GPU)."""
    nodes = profile_resource(rule, "nodes", 1)
    return {"mpi": "srun", "tasks": nodes, "tasks_per_gpu": 0} if nodes > 1 else {}


for _rule in workflow.resource_settings.overwrite_resources:
    _nodes, _gpus = profile_resource(_rule, "nodes", 1), profile_resource(_rule, "gpu")
    if _nodes > 1 and (_rule != "train" or _gpus < _nodes or _gpus % _nodes):
        sys.exit(f"dyhead: error: set-resources {_rule}: nodes {_nodes} is for the train rule, with a gpu count "
                 f"(the job's GPUs on all nodes, here {_gpus}) that splits evenly over its nodes")


def launch_flags(wildcards, resources):
    """The launcher's options for this job: auto, the job's GPUs, or its share of them on each node."""
    nodes = resources.get("nodes", 1)
    if not resources.gpu:
        return "--processes auto"
    if nodes <= 1:
        return f"--processes {resources.gpu}"
    return (f"--processes {resources.gpu // nodes} --nnodes {nodes} --rdzv-endpoint $(hostname):{RDZV_PORT} "
            "--rdzv-id $SLURM_JOB_ID")


def srun_nodes(wildcards, resources):
    """One launcher per node: the srun step of a training over several nodes ('' on one node)."""
    nodes = resources.get("nodes", 1)
    if nodes <= 1:
        return ""
    return (f"srun --nodes {nodes} --ntasks-per-node 1 --cpus-per-task {resources.cpus_per_task} "
            f"--gpus-per-node {resources.gpu // nodes} --kill-on-bad-exit=1 ")


wildcard_constraints:
    exp="|".join(sorted(MATRIX.experiments, key=len, reverse=True)),
    table="|".join(MATRIX.reports),  # the tables, and grid_<name> per grid

# Reads the experiment matrix and the profile once, at parse time, so a bad key fails before
# any job starts. Helper functions only; no rule logic here.
import sys
from pathlib import Path

from dyhead.config import load_matrix, load_profile, pretrained_path, weights_file
from dyhead.errors import DyheadError

PROFILE = config["profile"]
try:
    MATRIX = load_matrix(Path.cwd(), PROFILE)
    PROFILE_CFG = load_profile(PROFILE, Path.cwd())
except DyheadError as exc:
    sys.exit(f"dyhead: error: {exc}")

DATA = PROFILE_CFG["data"]
RUNS = f"runs/{PROFILE}"


def data_ready():
    """The file that proves the profile's data is in place."""
    if DATA["source"] == "synthetic":
        return f"{DATA['root']}/synth.json"
    return DATA["val_annotations"]


def table_runs(table, filename):
    """`filename` of every experiment a table (or grid_<name>) reads."""
    return [f"{RUNS}/{exp}/{filename}" for exp in MATRIX.table_experiments(table)]


def dyhead_launcher(wildcards, resources):
    """`dyhead`, or one torchrun over all of the job's GPUs when it has some (slurm profile: gpu=8)."""
    if resources.gpu > 0:
        return f"torchrun --standalone --nproc_per_node {resources.gpu} -m dyhead.cli"
    return "dyhead"


wildcard_constraints:
    exp="|".join(sorted(MATRIX.experiments, key=len, reverse=True)),
    table="|".join(MATRIX.reports),  # the tables, and grid_<name> per grid

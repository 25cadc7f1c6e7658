"""Profiles, the experiment matrix and the tables: loaded from params/, checked against schemas.

Everything that decides what runs lives in three places under params/:
  profiles/<name>.yaml  scale of the run (data, input size, widths, schedule lengths, runtime)
  experiments.yaml      the experiments (detector, backbone, head switches, schedule, seed)
  tables.yaml           tables -> rows -> experiment id + the paper's numbers
A bad key or value fails here, before any job starts, with one line naming file and key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from dyhead.errors import DyheadError

DEFAULT_PROFILE = "mini"
SCHEMAS = Path(__file__).resolve().parent / "schemas"  # shipped with the package: validation works outside a checkout
# Switches not given in an experiment's head default to the full DyHead block.
HEAD_DEFAULTS = {"scale": True, "spatial": True, "task": True, "high_offsets": "resample"}


def repo_root() -> Path:
    """Where params/ and workflow/ live: $DYHEAD_ROOT, else the current directory."""
    return Path(os.environ.get("DYHEAD_ROOT", ".")).resolve()


def load_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise DyheadError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DyheadError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise DyheadError(f"{path}: expected a mapping at the top level")
    return data


@lru_cache(maxsize=None)
def _validator(schema_path: str) -> Draft202012Validator:
    return Draft202012Validator(load_yaml(Path(schema_path)))


def validate(data: dict, schema: str, path: Path) -> None:
    """Check `data` against dyhead/schemas/<schema>.schema.yaml; raise on the first error."""
    validator = _validator(str(SCHEMAS / f"{schema}.schema.yaml"))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise DyheadError(f"{path}: {key}: {err.message}")


def canonical_id(spec: dict) -> str:
    """detector-backbone-head-schedule[-ms][-seedN]; head is 'base', 'tower<N>[shared]' (baseline towers
    of another depth, or one tower for cls and reg) or 'dyh<N>-<LSC switches>[-<placement>]'.

    '-' separates the fields, so a backbone like 'x101-dcn' is written 'x101dcn'; '-ms' marks
    multi-scale training.
    """
    head = spec["head"]
    if head["blocks"] == 0:  # 'base' = the paper's two 4-conv towers; 'tower<N>[shared]' otherwise
        convs, shared = head.get("tower_convs", 4), head.get("tower_shared", False)
        head_name = "base" if (convs, shared) == (4, False) else f"tower{convs}" + ("shared" if shared else "")
    else:
        h = {**HEAD_DEFAULTS, **head}
        switches = "".join(c for c, on in (("L", h["scale"]), ("S", h["spatial"]), ("C", h["task"])) if on) or "none"
        head_name = f"dyh{head['blocks']}-{switches}"
        if h["high_offsets"] != "resample":
            head_name += f"-{h['high_offsets']}"
        if spec.get("placement", "paper") != "paper":  # the official code's placement (Faster R-CNN, RetinaNet)
            head_name += f"-{spec['placement']}"
    name = f"{spec['detector']}-{spec['backbone'].replace('-', '')}-{head_name}-{spec['schedule']}"
    if spec.get("multiscale"):
        name += "-ms"
    if spec.get("seed"):
        name += f"-seed{spec['seed']}"
    return name


@dataclass(frozen=True)
class Matrix:
    """The experiments and tables, cross-checked; for one profile when loaded with one.

    Under a profile, a table with `profile_schedule: {<profile>: <schedule>}` names, in each row, the
    experiment at that schedule instead (its own experiment with the schedule field changed; added to
    `experiments`), and the row keeps the paper's experiment as `paper_experiment`.
    """

    experiments: dict
    tables: dict
    profile: str | None = None

    def table_experiments(self, table: str) -> list[str]:
        if table not in self.tables:
            raise DyheadError(f"unknown table {table!r}; params/tables.yaml defines {', '.join(sorted(self.tables))}")
        t = self.tables[table]
        ids = [row["experiment"] for row in t["rows"]] + list(t.get("noise", []))
        return list(dict.fromkeys(ids))

    def tables_of(self, exp_id: str) -> list[str]:
        return [name for name in sorted(self.tables) if exp_id in self.table_experiments(name)]


def at_schedule(exp_id: str, spec: dict, schedule: str) -> tuple[str, dict]:
    """The experiment `exp_id` trained at another schedule: its id and spec."""
    if spec["schedule"] == schedule:
        return exp_id, spec
    other = {**spec, "schedule": schedule}
    return canonical_id(other), other


def _apply_profile_schedules(experiments: dict, tables: dict, profile: str | None, tab_path: Path,
                             known_profiles: list[str]) -> tuple[dict, dict]:
    """Add the experiments every `profile_schedule` asks for (they exist under any profile, e.g. for FLOPs
    on coco), and under `profile` point the rows of its tables at them."""
    experiments, out = dict(experiments), {}
    for name, table in tables.items():
        renamed = {}
        for prof, schedule in table.get("profile_schedule", {}).items():
            if prof not in known_profiles:
                raise DyheadError(f"{tab_path}: {name}.profile_schedule.{prof}: no params/profiles/{prof}.yaml "
                                  f"(profiles: {', '.join(known_profiles)})")
            for exp in [row["experiment"] for row in table["rows"]] + list(table.get("noise", [])):
                exp_id, spec = at_schedule(exp, experiments[exp], schedule)
                if experiments.setdefault(exp_id, spec) != spec:
                    raise DyheadError(f"{tab_path}: {name}.profile_schedule.{prof}: {exp} at {schedule} is {exp_id}, "
                                      "which params/experiments.yaml defines with other fields")
                if prof == profile:
                    renamed[exp] = exp_id
        if not renamed:
            out[name] = table
            continue
        rows = [{**row, "experiment": renamed[row["experiment"]], "paper_experiment": row["experiment"]}
                for row in table["rows"]]
        out[name] = {**table, "rows": rows, **({"noise": [renamed[e] for e in table["noise"]]} if "noise" in table else {})}
    return experiments, out


def load_matrix(root: Path | None = None, profile: str | None = None) -> Matrix:
    """The experiments and tables of params/; under `profile`, with its table schedules applied."""
    root = root or repo_root()
    exp_path, tab_path = root / "params" / "experiments.yaml", root / "params" / "tables.yaml"
    experiments = load_yaml(exp_path)
    validate(experiments, "experiments", exp_path)
    experiments = experiments["experiments"]
    for exp_id, spec in experiments.items():
        expected = canonical_id(spec)
        if exp_id != expected:
            raise DyheadError(f"{exp_path}: experiments.{exp_id}: id does not match its fields (expected {expected!r})")
        tower_keys = sorted({"tower_convs", "tower_shared"} & set(spec["head"]))
        if tower_keys and (spec["detector"] != "atss" or spec["head"]["blocks"] > 0):
            raise DyheadError(f"{exp_path}: experiments.{exp_id}.head.{tower_keys[0]}: applies to the ATSS baseline "
                              "head (detector atss, blocks 0) only")
    tables = load_yaml(tab_path)
    validate(tables, "tables", tab_path)
    for name, table in tables.items():
        for i, row in enumerate(table["rows"]):
            if row["experiment"] not in experiments:
                raise DyheadError(f"{tab_path}: {name}.rows.{i}.experiment: unknown experiment {row['experiment']!r}")
            missing = set(table["labels"]) - set(row["label"])
            if missing:
                raise DyheadError(f"{tab_path}: {name}.rows.{i}.label: missing {sorted(missing)}")
        for exp_id in table.get("noise", []):
            if exp_id not in experiments:
                raise DyheadError(f"{tab_path}: {name}.noise: unknown experiment {exp_id!r}")
    experiments, tables = _apply_profile_schedules(experiments, tables, profile, tab_path, profile_names(root))
    return Matrix(experiments, tables, profile)


def profile_names(root: Path | None = None) -> list[str]:
    root = root or repo_root()
    return sorted(p.stem for p in (root / "params" / "profiles").glob("*.yaml"))


def load_profile(name: str, root: Path | None = None) -> dict:
    root = root or repo_root()
    path = root / "params" / "profiles" / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path.exists():
        raise DyheadError(f"unknown profile {name!r}; params/profiles/ has {', '.join(profile_names(root))}")
    profile = load_yaml(path)
    validate(profile, "profile", path)
    pretrained = [k for k, bb in profile["model"]["backbones"].items() if bb.get("weights") == PRETRAINED]
    if pretrained and "pretrain" not in profile:
        raise DyheadError(f"{path}: model.backbones.{pretrained[0]}.weights: 'pretrained' needs a `pretrain` section")
    if profile["data"]["source"] == "synthetic" and "synthetic" not in profile["data"]:
        raise DyheadError(f"{path}: data.synthetic: required when data.source is synthetic")
    for key, frac in enumerate(profile["solver"]["steps"]):
        if key and frac <= profile["solver"]["steps"][key - 1]:
            raise DyheadError(f"{path}: solver.steps: must increase, got {profile['solver']['steps']}")
    return profile


@dataclass(frozen=True)
class RunConfig:
    """One experiment resolved under one profile: everything a training or evaluation needs."""

    experiment: str
    profile_name: str
    spec: dict
    profile: dict = field(repr=False)
    tables: tuple[str, ...] = ()  # the tables of params/tables.yaml that report this experiment

    @property
    def run_dir(self) -> Path:
        return Path("runs") / self.profile_name / self.experiment

    @property
    def max_iter(self) -> int:
        return self.profile["solver"]["schedules"][self.spec["schedule"]]

    @property
    def seed(self) -> int:
        return self.profile["runtime"]["seed"] + self.spec.get("seed", 0)

    @property
    def head(self) -> dict:
        return {**HEAD_DEFAULTS, **self.spec["head"]}

    @property
    def backbone(self) -> dict:
        return self.profile["model"]["backbones"][self.spec["backbone"]]

    @property
    def weights(self) -> str | None:
        return weights_file(self.profile_name, self.profile, self.spec["backbone"])

    @property
    def digest(self) -> str:
        """What a checkpoint must agree with to be resumed: every setting that changes the weights
        (logging and checkpoint periods excluded)."""
        solver = {k: v for k, v in self.profile["solver"].items() if k not in ("checkpoint_period", "log_period")}
        keep = {"spec": self.spec, "model": self.profile["model"], "input": self.profile["input"], "solver": solver,
                "data": self.profile["data"], "seed": self.seed, "max_iter": self.max_iter}
        if self.backbone.get("weights") == PRETRAINED:  # the stand-in's recipe is part of the start point
            keep["pretrain"] = self.profile["pretrain"]
        if self.profile["runtime"].get("precision", "fp32") != "fp32":  # fp32 runs keep their earlier digests
            keep["precision"] = self.profile["runtime"]["precision"]
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """Flat-ish record of every setting, stored with each run."""
        return {
            "experiment": self.experiment,
            "profile": self.profile_name,
            "spec": {**self.spec, "head": self.head},
            "max_iter": self.max_iter,
            "seed": self.seed,
            "profile_settings": self.profile,
        }


PRETRAINED = "pretrained"  # `weights: pretrained`: the file `dyhead pretrain` makes (synthetic profiles)


def pretrained_path(profile_name: str, backbone: str) -> str:
    """Where `dyhead pretrain` writes a backbone's stand-in weights (a `.json` summary beside it)."""
    return f"data/weights/{profile_name}/{backbone}.pth"


def weights_file(profile_name: str, profile: dict, backbone: str) -> str | None:
    """The file a profile's backbone starts from: an ImageNet file, the pretrained stand-in, or none."""
    weights = profile["model"]["backbones"][backbone].get("weights")
    return pretrained_path(profile_name, backbone) if weights == PRETRAINED else weights


def resolve(exp_id: str, profile_name: str = DEFAULT_PROFILE, root: Path | None = None,
            matrix: Matrix | None = None) -> RunConfig:
    """`exp_id` under `profile_name`; pass `matrix` (loaded for that profile) to resolve many without re-reading params/."""
    root = root or repo_root()
    matrix = matrix or load_matrix(root, profile_name)
    if matrix.profile != profile_name:
        raise ValueError(f"resolve: matrix loaded for profile {matrix.profile!r}, not {profile_name!r}")
    if exp_id not in matrix.experiments:
        close = [e for e in matrix.experiments if e.split("-")[:2] == exp_id.split("-")[:2]][:3]
        hint = f"; did you mean {', '.join(close)}?" if close else "; `dyhead list` shows them"
        raise DyheadError(f"unknown experiment {exp_id!r}{hint}")
    profile = load_profile(profile_name, root)
    spec = matrix.experiments[exp_id]
    if spec["backbone"] not in profile["model"]["backbones"]:
        raise DyheadError(
            f"params/profiles/{profile_name}.yaml: model.backbones: no entry for {spec['backbone']!r} (needed by {exp_id})"
        )
    if spec["schedule"] not in profile["solver"]["schedules"]:
        raise DyheadError(
            f"params/profiles/{profile_name}.yaml: solver.schedules: no entry for {spec['schedule']!r} (needed by {exp_id})"
        )
    if spec.get("multiscale"):  # the run trains on the profile's range in place of the fixed size
        if "min_size_train_multiscale" not in profile["input"]:
            raise DyheadError(f"params/profiles/{profile_name}.yaml: input.min_size_train_multiscale: "
                              f"required by {exp_id} (multiscale: true)")
        profile = {**profile, "input": {**profile["input"],
                                        "min_size_train": list(profile["input"]["min_size_train_multiscale"])}}
    if "solver" in spec:  # per-experiment override, relative so it holds under every profile
        solver, over = profile["solver"], spec["solver"]
        scale = over.get("lr_scale", 1.0) * over.get("profile_lr_scale", {}).get(profile_name, 1.0)
        solver = {**solver, "base_lr": solver["base_lr"] * scale}
        if profile_name in over.get("profile_clip_grad_norm", {}):
            solver["clip_grad_norm"] = over["profile_clip_grad_norm"][profile_name]
        profile = {**profile, "solver": solver}
    return RunConfig(exp_id, profile_name, spec, profile, tuple(matrix.tables_of(exp_id)))


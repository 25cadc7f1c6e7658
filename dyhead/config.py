"""Profiles, the experiment matrix and the tables: loaded from params/, checked against schemas.

Everything that decides what runs lives in four places under params/:
  profiles/<name>.yaml  scale of the run (data, input size, widths, schedule lengths, runtime)
  experiments.yaml      the experiments (detector, backbone, head switches, schedule, seed, recipe)
  tables.yaml           tables -> rows -> experiment id + the paper's numbers
  grids.yaml            grids: axes whose cross product names experiments (dyhead/grids.py expands them)
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
PLACED = ("faster_rcnn", "retinanet")
PAPER_SCHEDULES = ("1x", "2x", "3x")  # detectors with a second DyHead placement (the official code's)


@dataclass(frozen=True)
class Recipe:
    """How an experiment trains where the paper's text and a released config disagree (`recipe:` in
    params/experiments.yaml; the id says it unless it is the paper's)."""

    summary: str  # one sentence for the reports
    detectors: tuple[str, ...] | None = None  # the detectors it is defined for; None: every one
    lr_scale: float = 1.0  # times the profile's base lr
    steps: tuple[float, ...] | None = None  # lr steps as fractions of the schedule; None: the profile's
    pred_kernel: int = 3  # ATSS: kernel of the cls, box and centerness predictor convs


RECIPES = {
    "paper": Recipe("the paper's text: the profile's base lr and lr steps, 3×3 predictor convs"),
    # microsoft/DynamicHead configs/dyhead_r50_atss_fpn_1x.yaml and extra/atss.py. Its other differences
    # from the paper need no switch here: a DyHead head has no towers in both recipes, and our ATSS already
    # centres its anchors at (i + 0.5) * stride, the official ANCHOR_GENERATOR.OFFSET 0.5.
    "official": Recipe(
        "microsoft/DynamicHead's ATSS config: base lr 0.01 at batch 16 (half the paper's 0.02), lr steps at "
        "60k and 80k of 90k iterations (2/3 and 8/9 of any schedule), 1×1 cls, box and centerness predictor "
        "convs; no towers and anchors at offset 0.5 as in the paper recipe",
        detectors=("atss",), lr_scale=0.5, steps=(2 / 3, 8 / 9), pred_kernel=1),
}


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


def attention_letters(head: dict) -> str:
    """'LSC' for a DyHead head with scale (L), spatial (S) and task (C) attention on; 'none' with all off."""
    h = {**HEAD_DEFAULTS, **head}
    return "".join(c for c, on in (("L", h["scale"]), ("S", h["spatial"]), ("C", h["task"])) if on) or "none"


def head_name(spec: dict) -> str:
    """The head field of an id: 'base', 'tower<N>[shared]' or 'dyh<N>-<LSC>[-<high_offsets>][-<placement>]'."""
    head = spec["head"]
    if head["blocks"] == 0:  # 'base' = the paper's two 4-conv towers; 'tower<N>[shared]' otherwise
        convs, shared = head.get("tower_convs", 4), head.get("tower_shared", False)
        return "base" if (convs, shared) == (4, False) else f"tower{convs}" + ("shared" if shared else "")
    name = f"dyh{head['blocks']}-{attention_letters(head)}"
    if head.get("high_offsets", "resample") != "resample":
        name += f"-{head['high_offsets']}"
    if spec.get("placement", "paper") != "paper":  # the official code's placement (Faster R-CNN, RetinaNet)
        name += f"-{spec['placement']}"
    return name


def canonical_id(spec: dict) -> str:
    """detector-backbone-head-schedule[-ms][-recipe_<name>][-seedN]; head is 'base', 'tower<N>[shared]'
    (baseline towers of another depth, or one tower for cls and reg) or 'dyh<N>-<LSC switches>[-<placement>]'.

    '-' separates the fields, so a backbone like 'x101-dcn' is written 'x101dcn'; '-ms' marks
    multi-scale training; '-recipe_official' a recipe other than the paper's.
    """
    name = f"{spec['detector']}-{spec['backbone'].replace('-', '')}-{head_name(spec)}-{spec['schedule']}"
    if spec.get("multiscale"):
        name += "-ms"
    if spec.get("recipe", "paper") != "paper":
        name += f"-recipe_{spec['recipe']}"
    if spec.get("seed"):
        name += f"-seed{spec['seed']}"
    return name


def spec_axes(spec: dict) -> dict:
    """What an experiment is, axis by axis (grids, MLflow tags, reports/results.csv); '-' where an axis
    does not apply (a baseline head has no attentions, placement or offsets)."""
    head = {**HEAD_DEFAULTS, **spec["head"]}
    dyh = head["blocks"] > 0
    return {"detector": spec["detector"], "backbone": spec["backbone"], "head": head_name(spec),
            "blocks": head["blocks"], "attentions": attention_letters(head) if dyh else "-",
            "placement": spec.get("placement", "paper") if dyh else "-",
            "high_offsets": head["high_offsets"] if dyh else "-", "schedule": spec["schedule"],
            "multiscale": bool(spec.get("multiscale", False)), "seed": spec.get("seed", 0),
            "recipe": spec.get("recipe", "paper")}


def spec_problem(spec: dict) -> tuple[str, str] | None:
    """(key, why) when fields that each validate make no experiment together; None when they do."""
    head = spec["head"]
    tower_keys = sorted({"tower_convs", "tower_shared"} & set(head))
    if tower_keys and (spec["detector"] != "atss" or head["blocks"] > 0):
        return f"head.{tower_keys[0]}", "applies to the ATSS baseline head (detector atss, blocks 0) only"
    if "placement" in spec and spec["detector"] not in PLACED:
        return "placement", f"applies to {' and '.join(PLACED)} only, not {spec['detector']!r}"
    if spec.get("placement", "paper") != "paper" and head["blocks"] == 0:
        return "placement", "places a DyHead head (blocks > 0); a baseline head has none"
    recipe = RECIPES[spec.get("recipe", "paper")]
    if recipe.detectors and spec["detector"] not in recipe.detectors:
        return "recipe", f"{spec['recipe']!r} is defined for {', '.join(recipe.detectors)} only, not {spec['detector']!r}"
    return None


GRID_PREFIX = "grid_"  # reports/grid_<name>.md: a grid's report, named beside the tables'


@dataclass(frozen=True)
class Matrix:
    """The experiments, tables and grids, cross-checked; for one profile when loaded with one.

    Under a profile, a table with `profile_schedule: {<profile>: <schedule>}` names, in each row, the
    experiment at that schedule instead (its own experiment with the schedule field changed; added to
    `experiments`), and the row keeps the paper's experiment as `paper_experiment`; rows with
    `profiles: [...]` that do not name the profile are left out. A report name is a table's, or
    `grid_<name>` for a grid (dyhead/grids.py).
    """

    experiments: dict
    tables: dict
    profile: str | None = None
    grids: dict = field(default_factory=dict)  # name -> expanded grid (dyhead.grids.expand_grid)
    # experiment -> the key of params/experiments.yaml that defines it (DVC tracks that key per experiment)
    param_keys: dict = field(default_factory=dict)
    seeds: int = 1  # each table row trained with this many seeds (`seeds` of the profile, or --config seeds=N)

    def seed_runs(self, exp_id: str) -> list[str]:
        """The experiment and its derived seed runs (`<id>-seed1` ...), `seeds` in all."""
        return [exp_id] + [seed_variant_id(exp_id, self.experiments[exp_id], k) for k in range(1, self.seeds)]

    @property
    def reports(self) -> list[str]:
        """Every report name: the tables, then grid_<name> per grid."""
        return sorted(self.tables) + [GRID_PREFIX + g for g in self.grids]

    def table_experiments(self, table: str) -> list[str]:
        """The experiments a table (or a grid's report, `grid_<name>`) reads, each once."""
        if table.startswith(GRID_PREFIX) and table.removeprefix(GRID_PREFIX) in self.grids:
            return list(dict.fromkeys(c["experiment"] for c in self.grids[table.removeprefix(GRID_PREFIX)]["cells"]))
        if table not in self.tables:
            raise DyheadError(f"unknown table {table!r}; params/ defines {', '.join(self.reports)}")
        t = self.tables[table]
        ids = [e for row in t["rows"] for e in self.seed_runs(row["experiment"])] + list(t.get("noise", []))
        return list(dict.fromkeys(ids))

    @property
    def default_tables(self) -> list[str]:
        """The tables `snakemake all` and dvc.yaml build: all but those marked `on_demand`."""
        return [name for name in sorted(self.tables) if not self.tables[name].get("on_demand")]

    def figure_tables(self) -> list[str]:
        """The tables with baselines to draw curves and gains of (the default ones but the literature comparisons)."""
        return [name for name in self.default_tables if "literature" not in self.tables[name]]

    def figure_experiments(self) -> list[str]:
        """The models Figures 3 and 4 (and the detections) are drawn for: the tables' 6-block ATSS R-50 DyHeads
        (scale, spatial and task attention, the paper's recipe and placement, the first seed)."""
        exps = dict.fromkeys(row["experiment"] for t in self.default_tables for row in self.tables[t]["rows"])
        return [e for e in exps if (s := self.experiments[e])["detector"] == "atss" and s["backbone"] == "r50"
                and s["head"]["blocks"] == 6
                and attention_letters(s["head"]) == "LSC" and not s.get("seed") and s.get("recipe", "paper") == "paper"
                and s["head"].get("high_offsets", "resample") == "resample"]

    def tables_of(self, exp_id: str) -> list[str]:
        return [name for name in sorted(self.tables) if exp_id in self.table_experiments(name)]

    def grids_of(self, exp_id: str) -> list[str]:
        return [name for name, grid in self.grids.items() if any(c["experiment"] == exp_id for c in grid["cells"])]


def at_schedule(exp_id: str, spec: dict, schedule: str) -> tuple[str, dict]:
    """The experiment `exp_id` trained at another schedule: its id and spec."""
    if spec["schedule"] == schedule:
        return exp_id, spec
    other = {**spec, "schedule": schedule}
    return canonical_id(other), other


def _apply_profile_schedules(experiments: dict, tables: dict, profile: str | None, tab_path: Path,
                             known_profiles: list[str], param_keys: dict) -> tuple[dict, dict]:
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
                param_keys.setdefault(exp_id, param_keys[exp])  # defined by the paper's experiment
                if prof == profile:
                    renamed[exp] = exp_id
        if not renamed:
            out[name] = table
            continue
        rows = [{**row, "experiment": renamed[row["experiment"]], "paper_experiment": row["experiment"]}
                for row in table["rows"]]
        out[name] = {**table, "rows": rows, **({"noise": [renamed[e] for e in table["noise"]]} if "noise" in table else {})}
    return experiments, out


def _rows_for_profile(tables: dict, profile: str | None, tab_path: Path, known_profiles: list[str]) -> dict:
    """Each table with the rows of `profile` only (a row's `profiles`, when given, names where it runs);
    without a profile, every row."""
    out = {}
    for name, table in tables.items():
        for i, row in enumerate(table["rows"]):
            for prof in row.get("profiles", []):
                if prof not in known_profiles:
                    raise DyheadError(f"{tab_path}: {name}.rows.{i}.profiles: no params/profiles/{prof}.yaml "
                                      f"(profiles: {', '.join(known_profiles)})")
        rows = [row for row in table["rows"] if profile is None or profile in row.get("profiles", [profile])]
        out[name] = {**table, "rows": rows}
    return out


def seed_variant_id(exp_id: str, spec: dict, k: int) -> str:
    """The id of `exp_id` trained with its seed + k (the naming rule's `-seedN`)."""
    return canonical_id({**spec, "seed": spec.get("seed", 0) + k})


def derived_seed_spec(exp_id: str, experiments: dict) -> dict | None:
    """The spec of `<id>-seedN` for an experiment `<id>` without a seed (a derived seed run), else None."""
    m = re.fullmatch(r"(.+)-seed([1-9][0-9]*)", exp_id)
    if not m or m.group(1) not in experiments or experiments[m.group(1)].get("seed"):
        return None
    return {**experiments[m.group(1)], "seed": int(m.group(2))}


def load_matrix(root: Path | None = None, profile: str | None = None, seeds: int | None = None) -> Matrix:
    """The experiments, tables and grids of params/; under `profile`, with its table schedules and rows applied.
    `seeds` (default: the profile's `seeds`, else 1) > 1 adds each table row's derived seed runs."""
    from dyhead.grids import load_grids  # grids.py builds on this module's naming rule

    root = root or repo_root()
    exp_path, tab_path = root / "params" / "experiments.yaml", root / "params" / "tables.yaml"
    raw = load_yaml(exp_path)
    validate(raw, "experiments", exp_path)
    experiments = raw["experiments"]
    for exp_id, spec in experiments.items():
        expected = canonical_id(spec)
        if exp_id != expected:
            raise DyheadError(f"{exp_path}: experiments.{exp_id}: id does not match its fields (expected {expected!r})")
        problem = spec_problem(spec)
        if problem:
            raise DyheadError(f"{exp_path}: experiments.{exp_id}.{problem[0]}: {problem[1]}")
    param_keys = {exp_id: f"experiments.{exp_id}" for exp_id in experiments}
    tables = load_yaml(tab_path)
    validate(tables, "tables", tab_path)
    for name, table in tables.items():
        if name.startswith(GRID_PREFIX):
            raise DyheadError(f"{tab_path}: {name}: names starting with {GRID_PREFIX!r} are grids' reports; rename the table")
        for i, row in enumerate(table["rows"]):
            if row["experiment"] not in experiments:
                raise DyheadError(f"{tab_path}: {name}.rows.{i}.experiment: unknown experiment {row['experiment']!r}")
            missing = set(table["labels"]) - set(row["label"])
            if missing:
                raise DyheadError(f"{tab_path}: {name}.rows.{i}.label: missing {sorted(missing)}")
        for exp_id in table.get("noise", []):
            if exp_id not in experiments:
                raise DyheadError(f"{tab_path}: {name}.noise: unknown experiment {exp_id!r}")
    known = profile_names(root)
    tables = _rows_for_profile(tables, profile, tab_path, known)
    experiments, tables = _apply_profile_schedules(experiments, tables, profile, tab_path, known, param_keys)
    # experiments only a grid names take their detector's defaults; DVC tracks those (the id says the rest)
    defaults = raw.get("detector_defaults", {})
    grids = load_grids(root, experiments, defaults)
    for grid in grids.values():
        for cell in grid["cells"]:
            if cell["experiment"] not in experiments:
                experiments[cell["experiment"]] = cell["spec"]
                detector = cell["spec"]["detector"]
                param_keys[cell["experiment"]] = (f"detector_defaults.{detector}" if detector in defaults
                                                  else "detector_defaults" if "detector_defaults" in raw
                                                  else "experiments")
    if seeds is None:
        seeds = load_profile(profile, root).get("seeds", 1) if profile else 1
    if seeds < 1:
        raise DyheadError(f"seeds {seeds}: must be at least 1")
    for table in tables.values():  # derived seed runs: tracked by DVC through the key that defines the row
        for row in table["rows"]:
            for k in range(1, seeds):
                exp = row["experiment"]
                derived = seed_variant_id(exp, experiments[exp], k)
                spec = {**experiments[exp], "seed": experiments[exp].get("seed", 0) + k}
                if experiments.setdefault(derived, spec) != spec:
                    raise DyheadError(f"{exp_path}: experiments.{derived}: defined with other fields than seed {k} of {exp}")
                param_keys.setdefault(derived, param_keys[exp])
    return Matrix(experiments, tables, profile, grids, param_keys, seeds)


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
    if profile["data"]["source"] == "cocolike" and "cocolike" not in profile["data"]:
        raise DyheadError(f"{path}: data.cocolike: required when data.source is cocolike")
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
    grids: tuple[str, ...] = ()  # the grids of params/grids.yaml that name it

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
    def recipe(self) -> Recipe:
        return RECIPES[self.spec.get("recipe", "paper")]

    @property
    def backbone(self) -> dict:
        return self.profile["model"]["backbones"][self.spec["backbone"]]

    @property
    def weights(self) -> str | None:
        return weights_file(self.profile_name, self.profile, self.spec["backbone"])

    @property
    def memory_format(self) -> str:
        """`runtime.memory_format`: contiguous (the default) or channels_last."""
        return self.profile["runtime"].get("memory_format", "contiguous")

    @property
    def digest(self) -> str:
        """What a checkpoint must agree with to be resumed: every setting that changes the weights
        (logging and checkpoint periods excluded)."""
        solver = {k: v for k, v in self.profile["solver"].items() if k not in ("checkpoint_period", "log_period")}
        # max_iter holds the run's own length; schedules beyond the paper's three (6x: the convergence control)
        # are left out, so adding one to a profile keeps every earlier run's digest
        solver["schedules"] = {k: v for k, v in solver["schedules"].items() if k in PAPER_SCHEDULES}
        keep = {"spec": self.spec, "model": self.profile["model"], "input": self.profile["input"], "solver": solver,
                "data": self.profile["data"], "seed": self.seed, "max_iter": self.max_iter}
        if self.backbone.get("weights") == PRETRAINED:  # the stand-in's recipe is part of the start point
            keep["pretrain"] = self.profile["pretrain"]
        if self.profile["runtime"].get("precision", "fp32") != "fp32":  # fp32 runs keep their earlier digests
            keep["precision"] = self.profile["runtime"]["precision"]
        if self.memory_format != "contiguous":  # contiguous runs keep their earlier digests
            keep["memory_format"] = self.memory_format
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
    """The file a profile's backbone starts from: an ImageNet file, the pretrained stand-in (the one committed
    under data/standins/ when it was made under exactly these settings, else the one `dyhead pretrain` makes),
    or none. Decided from the repository's files and the settings alone, so Snakemake, DVC and the trainer agree."""
    weights = profile["model"]["backbones"][backbone].get("weights")
    if weights != PRETRAINED:
        return weights
    return embedded_standin(profile_name, profile, backbone) or pretrained_path(profile_name, backbone)


# Pretrained stand-ins committed with the code, so the embedded default's first run need not train one (86 s on
# one core before any detector can start). `dyhead pretrain <backbone> --profile <p> --embed` writes one with
# its manifest; a committed stand-in is used only while its manifest's key equals standin_key() now.
STANDINS_DIR = "data/standins"
STANDIN_SOURCES = ("engine/pretrain.py", "modeling/backbone.py")  # the code that trains one, in this package


def standin_paths(profile_name: str, backbone: str) -> tuple[str, str]:
    """The committed stand-in of a profile's backbone and its manifest (relative to the repository root)."""
    return f"{STANDINS_DIR}/{profile_name}/{backbone}.pth", f"{STANDINS_DIR}/{profile_name}/{backbone}.json"


def pretrain_entry(entry: dict) -> dict:
    """A backbone entry as `dyhead pretrain` builds it. ImageNet weights come from training every layer with batch
    statistics; `freeze_at` and frozen BN are how a detector fine-tunes them, not how they are made (with them, a
    stand-in's frozen stem would stay at its random init)."""
    norm = "bn" if entry["norm"] in ("frozen_bn", "sync_bn") else entry["norm"]
    return {**entry, "freeze_at": 0, "norm": norm}


def standin_key(profile: dict, backbone: str) -> dict:
    """Everything that decides what `dyhead pretrain` makes: its recipe, the backbone, the data settings and the
    generator's format version, the seed, and the digest of the code that trains it."""
    from dyhead.data import cocolike, synthetic  # lazily: numpy and PIL are not needed to read settings

    code = hashlib.sha256()
    for rel in STANDIN_SOURCES:
        code.update((Path(__file__).resolve().parent / rel).read_bytes())
    data = profile["data"]
    versions = {"synthetic": synthetic.FORMAT_VERSION, "cocolike": cocolike.FORMAT_VERSION}
    return {"pretrain": profile.get("pretrain"), "backbone": pretrain_entry(profile["model"]["backbones"][backbone]),
            "data": data, "data_format": versions.get(data["source"]), "seed": profile["runtime"]["seed"],
            "dcn_backend": profile["runtime"]["dcn_backend"], "code": code.hexdigest()[:16]}


def embedded_standin(profile_name: str, profile: dict, backbone: str) -> str | None:
    """The committed stand-in when its manifest was written under the current key, else None. A file that does not
    match its manifest's sha256 is an error, not a silent fallback (it would train from other weights)."""
    from dyhead.data.fetch import file_digest

    root = repo_root()
    weights, manifest = standin_paths(profile_name, backbone)
    if not (root / manifest).is_file():
        return None
    try:
        record = json.loads((root / manifest).read_text())
        key, sha = record["key"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DyheadError(f"{manifest}: not a stand-in manifest ({exc})") from None
    if key != json.loads(json.dumps(standin_key(profile, backbone))):
        return None
    if not (root / weights).is_file():
        raise DyheadError(f"{manifest}: names {weights}, which is missing; restore it or delete the manifest")
    actual = file_digest(root / weights, "sha256")
    if actual != sha:
        raise DyheadError(f"{weights}: sha256 {actual[:12]}... is not the {sha[:12]}... its manifest records")
    return weights


def resolve(exp_id: str, profile_name: str = DEFAULT_PROFILE, root: Path | None = None,
            matrix: Matrix | None = None) -> RunConfig:
    """`exp_id` under `profile_name`; pass `matrix` (loaded for that profile) to resolve many without re-reading params/."""
    root = root or repo_root()
    matrix = matrix or load_matrix(root, profile_name)
    if matrix.profile != profile_name:
        raise ValueError(f"resolve: matrix loaded for profile {matrix.profile!r}, not {profile_name!r}")
    spec = matrix.experiments.get(exp_id) or derived_seed_spec(exp_id, matrix.experiments)
    if spec is None:
        close = [e for e in matrix.experiments if e.split("-")[:2] == exp_id.split("-")[:2]][:3]
        hint = f"; did you mean {', '.join(close)}?" if close else "; `dyhead list` shows them"
        raise DyheadError(f"unknown experiment {exp_id!r}{hint}")
    profile = load_profile(profile_name, root)
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
    recipe = RECIPES[spec.get("recipe", "paper")]
    if recipe.lr_scale != 1.0 or recipe.steps is not None:  # the recipe's solver, under every profile
        solver = {**profile["solver"], "base_lr": profile["solver"]["base_lr"] * recipe.lr_scale}
        if recipe.steps is not None:
            solver["steps"] = list(recipe.steps)
        profile = {**profile, "solver": solver}
    return RunConfig(exp_id, profile_name, spec, profile, tuple(matrix.tables_of(exp_id)),
                     tuple(matrix.grids_of(exp_id)))


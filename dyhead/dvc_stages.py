"""dvc.yaml from the experiment matrix: the experiments and `dyhead` commands of the Snakefile.

The Snakefile and dvc.yaml are two views of one pipeline, both read from params/: Snakemake
schedules it (locally, on SLURM), DVC versions what it makes. Stages, for one profile:
  synth (+ pretrain@<backbone> | standin_weights@<file>) | fetch_coco, fetch_weights@<file>, build_ext
                                                          the inputs every training needs
  train@<id>, evaluate@<id>, flops@<id>, evaluate_tta@<id>  per experiment (foreach over the ids
                                                          of the tables and grids that report them)
  report-<table>, report-grid_<name>                      per table and grid (DVC cannot template dep lists)
The commands are the Snakemake rules' shell commands without their `2>&1 | tee <log>` (a test
compares them job by job). Trainings and evaluations say `--processes auto` (dyhead/engine/launch.py):
on a node with GPUs and a CUDA profile each runs one torchrun over all of them, on CPU one process.
Checkpoints and predictions are cached outs, pushed to the remote; metrics.json and flops.json are
uncached `metrics`; train.json and the reports (.md, .csv) uncached outs. Every report also rewrites
reports/results.csv (every run of the profile), which no stage declares: DVC refuses one output of several
stages.

Each experiment stage tracks the params it reads, and only those, so a changed hyperparameter
re-runs exactly the experiments it touches: the key of params/experiments.yaml that defines it (its own
entry `experiments.<id>`; the paper's entry for a row a `profile_schedule` retrains; `detector_defaults.<detector>`
for an experiment only a grid names, whose id says everything else), and of the profile
`data`, `input`, `runtime`, the shared `model.*` keys, `model.backbones.<its backbone>`, the
solver keys (logging and checkpoint periods excluded) and `solver.schedules.<its schedule>`.
"""
from __future__ import annotations

import yaml

from dyhead.config import (GRID_PREFIX, PRETRAINED, Matrix, load_matrix, load_profile, pretrained_path, repo_root,
                           standin_paths, weights_file)
from dyhead.errors import DyheadError

HEADER = """\
# Generated from params/ by `dyhead dvc-yaml --profile {profile}`: do not edit, regenerate.
# Same experiments and commands as the Snakefile (tests/test_dvc.py checks); `dvc repro` runs them
# one after another on this machine, each training and evaluation on every GPU the machine shows
# (--processes auto); Snakemake runs them in parallel or on SLURM (docs/cluster.md).
"""
CODE = ["dyhead/modeling", "dyhead/data", "dyhead/ops", "dyhead/engine", "dyhead/config.py"]
UNTRACKED_SOLVER_KEYS = ("checkpoint_period", "log_period")  # no effect on the weights
LAUNCH = "--processes auto"  # as the Snakemake rules without GPU resources (workflow/rules/common.smk)


class Inline(dict):
    """A mapping written on one line: foreach items, {cache: false}."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &id001 anchors: a generated file people read
        return True


_Dumper.add_representer(Inline, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True))
UNCACHED = Inline(cache=False)


def experiment_param_keys(profile: dict, stage: str) -> list[str]:
    """Profile keys an experiment stage reads, templated on the foreach item's backbone/schedule."""
    keys = [k for k in ("data", "input", "runtime") if k in profile]
    keys += [f"model.{k}" for k in profile["model"] if k != "backbones"] + ["model.backbones.${item.backbone}"]
    if stage in ("train", "evaluate", "evaluate_tta"):
        keys += [f"solver.{k}" for k in profile["solver"] if k not in UNTRACKED_SOLVER_KEYS + ("schedules",)]
        keys.append("solver.schedules.${item.schedule}")
    if stage in ("evaluate", "evaluate_tta"):
        keys.append("eval")
    if stage == "evaluate_tta" and "tta" in profile:
        keys.append("tta")
    return keys


def _foreach(ids: list[str], matrix: Matrix, stage: dict) -> dict:
    for exp in ids:
        if "." in exp:  # DVC reads `experiments.<id>` as a path of keys
            raise DyheadError(f"params/experiments.yaml: {exp}: a '.' in an id cannot be tracked by DVC")
    items = {exp: Inline(backbone=matrix.experiments[exp]["backbone"], schedule=matrix.experiments[exp]["schedule"],
                         params=matrix.param_keys[exp])
             for exp in ids}
    return {"foreach": items, "do": stage}


def input_stages(profile_name: str, profile: dict, weights: dict[str, str]) -> tuple[dict, list[str]]:
    """Data, backbone start weights and the extension: the stages every training depends on, and the
    files that prove the data is in place."""
    data, threads = profile["data"], profile["runtime"]["threads"]
    pfile = f"params/profiles/{profile_name}.yaml"
    stages: dict = {}
    if data["source"] in ("synthetic", "cocolike"):
        stages["synth"] = {"cmd": f"dyhead synth --profile {profile_name}", "deps": ["dyhead/data"],
                           "params": [{pfile: ["data"]}], "outs": [data["root"]]}
        data_deps = [data["root"]]
    else:
        annotations = [data[k] for k in ("train_annotations", "val_annotations", "test_annotations") if k in data]
        # 26 GB of images are fetched and verified in place, never copied into the DVC cache
        cmd = f"(dyhead fetch-coco --profile {profile_name} && dyhead check-data --profile {profile_name})"
        stages["fetch_coco"] = {"cmd": cmd, "params": [{pfile: ["data"]}],
                                "outs": [{p: Inline(cache=False, persist=True)}
                                         for p in annotations + [f"{data['root']}/fetch.json"]]}
        data_deps = [f"{data['root']}/fetch.json"]
    # a committed stand-in (data/standins/, git-tracked) is a plain dependency of the trainings; no stage makes it
    committed = {b for b, p in weights.items() if p == standin_paths(profile_name, b)[0]}
    pretrained = sorted(b for b in weights
                        if profile["model"]["backbones"][b]["weights"] == PRETRAINED and b not in committed)
    if pretrained:  # the ImageNet stand-in, from the training split's object crops
        stages["pretrain"] = {"foreach": pretrained, "do": {
            "cmd": f"dyhead pretrain ${{item}} --profile {profile_name} --threads {threads}",
            "deps": data_deps + ["build/ext/manifest.json", "dyhead/engine/pretrain.py"],
            "params": [{pfile: ["data", "pretrain", "runtime", "model.backbones.${item}"]}],
            "outs": [pretrained_path(profile_name, "${item}"),
                     {pretrained_path(profile_name, "${item}").removesuffix(".pth") + ".json": UNCACHED}]}}
    from dyhead.modeling.pretrained import arch_of_file, arch_of_standin

    fetched = {b: p for b, p in weights.items() if b not in pretrained and b not in committed}
    standins = sorted({p for p in fetched.values() if arch_of_standin(p)})
    if standins:  # random-init torchvision backbones under the names the profile loads (cocolike)
        files = {path.rsplit("/", 1)[-1]: Inline(arch=arch_of_standin(path), dir=path.rsplit("/", 1)[0], path=path)
                 for path in standins}
        stages["standin_weights"] = {"foreach": files, "do": {
            "cmd": "dyhead standin-weights ${item.arch} --dir ${item.dir}", "outs": ["${item.path}"]}}
    imagenet = sorted({p for p in fetched.values() if p not in standins})
    if imagenet:

        files = {path.rsplit("/", 1)[-1]: Inline(arch=arch_of_file(path), dir=path.rsplit("/", 1)[0], path=path)
                 for path in imagenet}
        stages["fetch_weights"] = {"foreach": files, "do": {
            "cmd": "dyhead fetch-weights ${item.arch} --dir ${item.dir}", "outs": ["${item.path}"]}}
    cuda = "off" if profile["runtime"]["device"] == "cpu" else "auto"  # CUDA kernels only for CUDA profiles
    stages["build_ext"] = {"cmd": f"dyhead build-ext --build-dir build/ext --cuda {cuda} --allow-fallback",
                           "deps": ["dyhead/csrc", "dyhead/ops"],
                           "outs": [{"build/ext/manifest.json": UNCACHED}]}
    return stages, data_deps


def _has_flops(matrix: Matrix, report: str) -> bool:
    """A grid prints GFLOPs in every cell; a table where it says `flops: true`."""
    return report not in matrix.tables or bool(matrix.tables[report].get("flops"))


def experiment_stages(profile_name: str, profile: dict, matrix: Matrix, tables: list[str], data_deps: list[str],
                      weights: dict[str, str]) -> dict:
    """train / evaluate / evaluate_tta / flops per experiment (foreach over the ids of the reports `tables`)."""
    ids = list(dict.fromkeys(e for t in tables for e in matrix.table_experiments(t)))
    flops_ids = list(dict.fromkeys(e for t in tables if _has_flops(matrix, t) for e in matrix.table_experiments(t)))
    tta_ids = list(dict.fromkeys(r["experiment"] for t in tables if t in matrix.tables
                                 for r in matrix.tables[t]["rows"] if r.get("tta")))
    threads, runs = profile["runtime"]["threads"], f"runs/{profile_name}"
    pfile = f"params/profiles/{profile_name}.yaml"

    def exp_params(stage: str) -> list[dict]:
        return [{"params/experiments.yaml": ["${item.params}"]}, {pfile: experiment_param_keys(profile, stage)}]

    stages: dict = {}
    train_deps = data_deps + ["build/ext/manifest.json"] + CODE
    stages["train"] = _foreach(ids, matrix, {
        "cmd": f"dyhead train ${{key}} --profile {profile_name} --threads {threads} {LAUNCH}",
        "deps": train_deps, "params": exp_params("train"),
        "outs": [f"{runs}/${{key}}/model_final.pth", {f"{runs}/${{key}}/train.json": UNCACHED}]})
    if weights:  # the experiments of one foreach share deps: all of the profile's weight files
        stages["train"]["do"]["deps"] = train_deps + sorted(set(weights.values()))
    stages["evaluate"] = _foreach(ids, matrix, {
        "cmd": f"dyhead evaluate ${{key}} --profile {profile_name} --threads {threads} {LAUNCH}",
        "deps": data_deps + [f"{runs}/${{key}}/model_final.pth"] + CODE, "params": exp_params("evaluate"),
        "outs": [f"{runs}/${{key}}/predictions.json"],
        "metrics": [{f"{runs}/${{key}}/metrics.json": UNCACHED}]})
    if tta_ids:
        stages["evaluate_tta"] = _foreach(tta_ids, matrix, {
            "cmd": f"dyhead evaluate ${{key}} --profile {profile_name} --tta --threads {threads} {LAUNCH}",
            "deps": data_deps + [f"{runs}/${{key}}/model_final.pth"] + CODE, "params": exp_params("evaluate_tta"),
            "outs": [f"{runs}/${{key}}/predictions_tta.json"],
            "metrics": [{f"{runs}/${{key}}/metrics_tta.json": UNCACHED}]})
    flops_params = exp_params("flops")
    if profile_name != "coco":  # the flops command also counts the coco-profile model at 800x1344
        flops_params.append({"params/profiles/coco.yaml": experiment_param_keys(load_profile("coco"), "flops")})
    if flops_ids:
        stages["flops"] = _foreach(flops_ids, matrix, {
            "cmd": f"dyhead flops ${{key}} --profile {profile_name}",
            "deps": ["dyhead/modeling", "dyhead/ops", "dyhead/engine/flops.py"], "params": flops_params,
            "metrics": [{f"{runs}/${{key}}/flops.json": UNCACHED}]})
    return stages


def report_stage(table: str, profile_name: str, matrix: Matrix) -> dict:
    """report-<table> (or report-grid_<name>): DVC cannot template dependency lists, so one stage per report."""
    runs = f"runs/{profile_name}"
    exps = matrix.table_experiments(table)
    deps = [f"{runs}/{e}/metrics.json" for e in exps] + [f"{runs}/{e}/train.json" for e in exps]
    if _has_flops(matrix, table):
        deps += [f"{runs}/{e}/flops.json" for e in exps]
    if table in matrix.tables:
        deps += [f"{runs}/{r['experiment']}/metrics_tta.json" for r in matrix.tables[table]["rows"] if r.get("tta")]
        source = {"params/tables.yaml": [table]}
    else:
        source = {"params/grids.yaml": [f"grids.{table.removeprefix(GRID_PREFIX)}"]}
    return {"cmd": f"dyhead report {table} --profile {profile_name} --out reports/{table}.md",
            "deps": deps + ["dyhead/report"],
            "params": [source, {f"params/profiles/{profile_name}.yaml": None}],
            "outs": [{f"reports/{table}.md": UNCACHED}, {f"reports/{table}.csv": UNCACHED},
                     {f"reports/{table}.html": UNCACHED}]}


def build_stages(profile_name: str, tables: list[str] | None = None, grids: list[str] | None = None) -> dict:
    """Every table and grid by default; naming tables alone leaves the grids out."""
    root = repo_root()
    matrix, profile = load_matrix(root, profile_name), load_profile(profile_name, root)
    for grid in grids or []:
        if grid not in matrix.grids:
            raise DyheadError(f"unknown grid {grid!r}; params/grids.yaml defines {', '.join(matrix.grids) or 'none'}")
    if tables is None and grids is None:
        tables, grids = matrix.default_tables, list(matrix.grids)
    reports = list(tables or []) + [GRID_PREFIX + g for g in grids or []]
    ids = list(dict.fromkeys(e for t in reports for e in matrix.table_experiments(t)))
    weights = _weights(matrix, profile_name, profile, ids)
    stages, data_deps = input_stages(profile_name, profile, weights)
    stages.update(experiment_stages(profile_name, profile, matrix, reports, data_deps, weights))
    for report in reports:
        stages[f"report-{report}"] = report_stage(report, profile_name, matrix)
    return {"stages": stages}


def _weights(matrix: Matrix, profile_name: str, profile: dict, ids: list[str]) -> dict[str, str]:
    """backbone -> the file it starts from (ImageNet or the pretrained stand-in), for the backbones of `ids`."""
    used = {matrix.experiments[e]["backbone"] for e in ids}
    return {b: weights_file(profile_name, profile, b) for b in sorted(used)
            if profile["model"]["backbones"].get(b, {}).get("weights")}


def render(profile_name: str, tables: list[str] | None = None, grids: list[str] | None = None) -> str:
    body = yaml.dump(build_stages(profile_name, tables, grids), Dumper=_Dumper, sort_keys=False, width=110,
                     allow_unicode=True)
    return HEADER.format(profile=profile_name) + body

"""Grids (params/grids.yaml): expansion into experiment ids by the naming rule, shared experiments, one-line
errors before any job starts, the pivot from a results CSV, the coco dry run of the paper grid, MLflow tags."""
import pandas as pd
import pytest
import yaml

from dyhead.config import load_matrix, resolve
from dyhead.engine.tracking import run_tags
from dyhead.errors import DyheadError
from dyhead.report.grids import grid_frame, render_grid
from dyhead.report.results import read_results
from tests.helpers import dry_run_jobs, dyhead, snakemake

DETECTORS = ["faster_rcnn", "retinanet", "atss", "fcos", "reppoints"]


def edit_grids(root, fn):
    path = root / "params/grids.yaml"
    data = yaml.safe_load(path.read_text())
    fn(data["grids"])
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_paper_grid_is_every_detector_backbone_and_head(repo_copy):
    matrix = load_matrix(profile="coco")
    grid = matrix.grids["paper"]
    ids = [c["experiment"] for c in grid["cells"]]
    assert len(ids) == len(set(ids)) == 40
    assert ids[:4] == ["faster_rcnn-r50-base-1x", "faster_rcnn-r50-dyh6-LSC-1x", "faster_rcnn-r101-base-1x",
                       "faster_rcnn-r101-dyh6-LSC-1x"]
    assert "reppoints-x101dcn-dyh6-LSC-1x" in ids and "atss-x101-base-1x" in ids
    # the ids it shares with the paper's rows are those experiments (Table 3's ten on coco), trained once
    shared = {e for e in ids if matrix.tables_of(e)}
    assert shared == {f"{d}-r50-{h}-1x" for d in DETECTORS for h in ("base", "dyh6-LSC")}
    assert matrix.experiments["retinanet-r50-base-1x"] is next(c["spec"] for c in grid["cells"]
                                                                if c["experiment"] == "retinanet-r50-base-1x")
    # one only the grid names trains as the paper's rows of its detector: RetinaNet at half the lr
    assert resolve("retinanet-x101-dyh6-LSC-1x", "coco", matrix=matrix).profile["solver"]["base_lr"] == 0.01
    assert resolve("retinanet-x101-dyh6-LSC-1x", "mini").profile["solver"]["clip_grad_norm"] == 10
    assert resolve("fcos-x101-dyh6-LSC-1x", "coco", matrix=matrix).profile["solver"]["base_lr"] == 0.02
    # each cell's gain is against the same detector and backbone with the baseline head
    cell = next(c for c in grid["cells"] if c["experiment"] == "fcos-r101-dyh6-LSC-1x")
    assert cell["baseline"] == "fcos-r101-base-1x" and cell["axes"]["backbone"] == "r101"
    assert (grid["rows"], grid["columns"]) == (["detector"], ["backbone", "blocks"])


def test_the_quick_grid_shares_table_2s_runs_on_mini(repo_copy):
    matrix = load_matrix(profile="mini")
    ids = matrix.table_experiments("grid_quick")
    assert ids == [f"{d}-r50-{h}-1x" for d in DETECTORS for h in ("base", "dyh2-LSC")]
    assert {e for e in ids if "table2" in matrix.tables_of(e)} == {"atss-r50-base-1x", "atss-r50-dyh2-LSC-1x"}
    assert resolve("fcos-r50-dyh2-LSC-1x", "mini", matrix=matrix).grids == ("quick",)
    assert set(resolve("atss-r50-base-1x", "mini", matrix=matrix).grids) == {"paper", "quick"}


def test_list_grid_prints_the_expansion(repo_copy):
    out = dyhead("list", "--grid", "quick", cwd=repo_copy).stdout.splitlines()
    assert out[0].startswith("# grid quick: 10 cells, 10 experiments (profile mini)")
    line = next(line for line in out if "retinanet-r50-dyh2-LSC-1x" in line)
    assert line.startswith("detector=retinanet, blocks=2") and "lr 0.01" in line
    assert "also in table2" in next(line for line in out if "atss-r50-dyh2-LSC-1x" in line)


@pytest.mark.parametrize("edit, message", [
    (lambda g: g["quick"]["axes"].update(detector=["atss", "yolo"]),
     r"grids.yaml: grids.quick.axes.detector.1: 'yolo' is not one of \['atss'"),
    (lambda g: g["quick"]["axes"].update(backbone=["r50", "r152"]),
     r"grids.yaml: grids.quick.axes.backbone.1: 'r152' is not one of"),
    (lambda g: g["quick"]["axes"].update(attentions=["LSC", "CS"]),
     r"grids.yaml: grids.quick.axes.attentions.1: 'CS' does not match"),
    (lambda g: g["quick"]["axes"].update(blocks=[0, 64]), r"grids.quick.axes.blocks.1: 64 is greater than the maximum"),
    (lambda g: g["quick"]["axes"].update(detectors=["atss"]), r"grids.quick.axes: Additional properties .*'detectors'"),
    (lambda g: g["quick"].update(exclude=[{"detector": DETECTORS}]),
     r"grids.yaml: grids.quick.exclude: excludes every combination of the axes; nothing would run"),
    (lambda g: g["quick"].update(exclude=[{"detector": "yolo"}]),
     r"grids.quick.exclude.0.detector: 'yolo' is not a value of the grid's detector axis"),
    (lambda g: g["quick"]["axes"].update(recipe=["paper", "official"]) or g["quick"].update(columns=["blocks", "recipe"]),
     r"grids.quick: detector=faster_rcnn, blocks=0, recipe=official is no experiment \(recipe 'official' is defined "
     r"for atss only, not 'faster_rcnn'\); add it to exclude"),
    (lambda g: g["quick"]["axes"].update(seed=[0, 1]) or g["quick"].update(columns=["seed"]),
     r"grids.quick: axis blocks has 2 values; put it in rows or columns"),
    (lambda g: g["quick"].update(baseline={"blocks": 6}),
     r"grids.quick.baseline.blocks: 6 is not a value of the grid's blocks axis \[0, 2\]"),
    (lambda g: g["quick"].update(exclude=[{"detector": "atss", "blocks": 0}]),
     r"grids.quick.baseline: detector=atss, blocks=0, the baseline of detector=atss, blocks=2, is excluded"),
])
def test_a_bad_grid_is_one_line_naming_axis_and_value(repo_copy, edit, message):
    edit_grids(repo_copy, edit)
    with pytest.raises(DyheadError, match=message):
        load_matrix()
    proc = dyhead("list", "--grid", "quick", cwd=repo_copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("dyhead: error: ")


def test_a_bad_grid_stops_snakemake_before_any_job(repo_copy):
    edit_grids(repo_copy, lambda g: g["quick"]["axes"].update(detector=["atss", "yolo"]))
    proc = snakemake("-n", "--cores", "1", "reports/table2.md", cwd=repo_copy, check=False)
    assert proc.returncode != 0
    assert "grids.quick.axes.detector.1: 'yolo' is not one of" in proc.stderr + proc.stdout
    assert "rule train" not in proc.stdout


def test_exclude_and_recipes_and_averaged_seeds(repo_copy):
    def add(grids):
        grids["recipes"] = {"title": "ATSS and FCOS, both recipes, two seeds",
                            "axes": {"detector": ["atss", "fcos"], "blocks": [0, 6], "seed": [0, 1],
                                     "recipe": ["paper", "official"]},
                            "rows": ["detector", "recipe"], "columns": ["blocks"], "baseline": {"blocks": 0},
                            "exclude": [{"detector": "fcos", "recipe": "official"}]}
    edit_grids(repo_copy, add)
    matrix = load_matrix(profile="mini")
    grid = matrix.grids["recipes"]
    ids = [c["experiment"] for c in grid["cells"]]
    assert len(ids) == 12  # 2 x 2 x 2 x 2 less fcos' 4 official
    assert "atss-r50-dyh6-LSC-1x-recipe_official-seed1" in ids and not any("fcos" in e and "official" in e for e in ids)
    assert "atss-r50-dyh6-LSC-1x-seed1" in ids  # Table 1's noise run: the same experiment
    # the pivot averages the seeds a grid leaves out of its rows and columns
    ap = {e: 10.0 + i for i, e in enumerate(ids)}
    rows = [{"profile": "mini", "experiment": e, "AP": a, **{m: a for m in ("AP50", "AP75", "APs", "APm", "APl")},
             "gmacs_coco": 100.0, "annotations": "val.json", "images": 8, "base_lr": 0.02} for e, a in ap.items()]
    pd.DataFrame(rows).to_csv(repo_copy / "results.csv", index=False)
    text = render_grid("recipes", matrix, "mini", read_results(repo_copy / "results.csv"))
    atss_official = next(line for line in text.splitlines() if line.startswith("| atss | official |"))
    base = (ap["atss-r50-base-1x-recipe_official"] + ap["atss-r50-base-1x-recipe_official-seed1"]) / 2
    dyh = (ap["atss-r50-dyh6-LSC-1x-recipe_official"] + ap["atss-r50-dyh6-LSC-1x-recipe_official-seed1"]) / 2
    assert atss_official == f"| atss | official | {base:.2f} · 100.0 GF | {dyh:.2f} ({dyh - base:+.2f}) · 100.0 GF |"
    assert "| fcos | official |" not in text and "| fcos | paper |" in text  # a row wholly excluded is left out
    assert "Each cell is the mean over seeds [0, 1]." in text and "12 of 16 combinations are in the grid" in text
    assert "train the official recipe: microsoft/DynamicHead's ATSS config" in text


def test_the_pivot_from_a_csv_the_test_writes(repo_copy):
    matrix = load_matrix(profile="mini")
    ids = matrix.table_experiments("grid_quick")
    ap = {"faster_rcnn-r50-base-1x": 47.3, "faster_rcnn-r50-dyh2-LSC-1x": 46.6, "retinanet-r50-base-1x": 26.1,
          "retinanet-r50-dyh2-LSC-1x": 20.05, "atss-r50-base-1x": 24.89, "atss-r50-dyh2-LSC-1x": 20.05,
          "fcos-r50-base-1x": 31.15, "fcos-r50-dyh2-LSC-1x": 31.23, "reppoints-r50-base-1x": 34.17,
          "reppoints-r50-dyh2-LSC-1x": 30.0}
    gflops = {e: 200.0 + i for i, e in enumerate(ids)}
    rows = [{"profile": "mini", "experiment": e, "AP": ap[e], "AP50": ap[e] + 20, "AP75": 1.0, "APs": 1.0, "APm": 1.0,
             "APl": 1.0, "gmacs_coco": gflops[e], "annotations": "val.json", "images": 1000, "train_seconds": 60.0,
             "base_lr": 0.01 if e.startswith("retinanet") else 0.02} for e in ids]
    rows.append({**rows[0], "profile": "coco", "AP": 99.0})  # another profile's row: not read
    pd.DataFrame(rows).to_csv(repo_copy / "results.csv", index=False)
    results = read_results(repo_copy / "results.csv")

    text = render_grid("quick", matrix, "mini", results)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| detector | blocks 0 | blocks 2 |"
    assert table[1] == "| faster_rcnn | 47.30 · 200.0 GF | 46.60 (-0.70) · 201.0 GF |"
    assert table[4] == "| fcos | 31.15 · 206.0 GF | 31.23 (+0.08) · 207.0 GF |"
    assert len(table) == 1 + 5
    assert "Base lr 0.01 for `retinanet-r50-base-1x`, `retinanet-r50-dyh2-LSC-1x`." in text
    assert "of which 2 are rows of coupling, table1, table2 too" in text

    frame = grid_frame("quick", matrix, "mini", results)  # reports/grid_quick.csv: every cell
    cell = frame.set_index("experiment").loc["reppoints-r50-dyh2-LSC-1x"]
    assert (cell["AP"], cell["AP gain"], cell["GFLOPs"], cell["baseline"]) == (30.0, pytest.approx(-4.17), 209.0,
                                                                             "reppoints-r50-base-1x")
    assert (cell["detector"], cell["blocks"], cell["head"], cell["AP50"]) == ("reppoints", 2, "dyh2-LSC", 50.0)


def test_dry_run_of_the_paper_grid_on_coco_lists_40_trainings(repo_copy):
    proc = snakemake("-n", "-p", "--cores", "1024", "reports/grid_paper.md", "--config", "profile=coco", cwd=repo_copy)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    trains = {j["wildcards"].removeprefix("exp="): j for j in jobs if j["rule"] == "train"}
    matrix = load_matrix(profile="coco")
    assert sorted(trains) == sorted(matrix.table_experiments("grid_paper")) and len(trains) == 40
    assert all(j["shell"].startswith(f"dyhead train {e} --profile coco") for e, j in trains.items())
    report = next(j for j in jobs if j["rule"] == "report")
    assert report["wildcards"] == "table=grid_paper" and report["shell"].startswith(
        "dyhead report grid_paper --profile coco --out reports/grid_paper.md")
    assert len([j for j in jobs if j["rule"] == "flops"]) == 40
    lrs = {e: resolve(e, "coco", matrix=matrix).profile["solver"]["base_lr"] for e in trains}
    assert {e for e, lr in lrs.items() if lr == 0.01} == {e for e in trains if e.startswith("retinanet")}


def test_mlflow_tags_carry_the_axes(repo_copy):
    tags = run_tags(resolve("atss-r50-dyh2-LSC-1x", "mini"), repo_copy, {})
    assert {k: tags[k] for k in ("detector", "backbone", "blocks", "attentions", "schedule", "seed", "recipe")} == {
        "detector": "atss", "backbone": "r50", "blocks": "2", "attentions": "LSC", "schedule": "1x", "seed": "0",
        "recipe": "paper"}
    assert tags["grids"] == "quick" and tags["tables"] == "table2"
    tags = run_tags(resolve("atss-r50-dyh6-LSC-1x-recipe_official", "coco"), repo_copy, {})
    assert (tags["recipe"], tags["grids"], tags["tables"]) == ("official", "", "table2")

"""The official code's recipe (`recipe: official`): its settings, its model, its id, and the extra row of
Table 2 on coco with the FLOPs of both predictor sizes."""
import pytest
import yaml

from dyhead.config import canonical_id, load_matrix, resolve
from dyhead.engine.flops import PAPER_INPUT, count_run
from dyhead.engine.train import lr_at
from dyhead.errors import DyheadError
from dyhead.modeling import build
from dyhead.report.results import collect
from dyhead.report.tables import render_table
from tests.helpers import dry_run_jobs, snakemake, write_fake_run

OFFICIAL = "atss-r50-dyh6-LSC-1x-recipe_official"


def test_the_official_recipe_trains_as_microsoft_dynamichead_does(repo_copy):
    spec = {"detector": "atss", "backbone": "r50", "schedule": "1x", "head": {"blocks": 6}, "recipe": "official"}
    assert canonical_id(spec) == OFFICIAL and canonical_id({**spec, "recipe": "paper"}) == "atss-r50-dyh6-LSC-1x"
    assert canonical_id({**spec, "seed": 1}) == OFFICIAL + "-seed1"
    official, paper = resolve(OFFICIAL, "coco"), resolve("atss-r50-dyh6-LSC-1x", "coco")
    solver = official.profile["solver"]
    assert solver["base_lr"] == pytest.approx(0.01) and paper.profile["solver"]["base_lr"] == pytest.approx(0.02)
    # the lr drops at iterations 60000 and 80000 of 90000 (the paper's profile: 60300 and 80100)
    lrs = [lr_at(it, solver, official.max_iter) for it in range(official.max_iter)]
    drops = [it for it in range(1001, official.max_iter) if lrs[it] < lrs[it - 1]]
    assert official.max_iter == 90000 and drops == [60000, 80000]
    assert {k: v for k, v in solver.items() if k not in ("base_lr", "steps")} == \
        {k: v for k, v in paper.profile["solver"].items() if k not in ("base_lr", "steps")}
    assert official.digest != paper.digest  # a checkpoint of one never resumes the other
    assert resolve(OFFICIAL, "mini").profile["solver"]["base_lr"] == pytest.approx(0.01)


def test_the_official_recipe_has_1x1_predictors_and_counts_their_flops(repo_copy):
    model = build.build_detector(resolve(OFFICIAL, "tiny"), 3, "torchvision", load_weights=False)
    head = model.head
    assert [m.kernel_size for m in (head.cls_logits, head.bbox_pred, head.centerness)] == [(1, 1)] * 3
    assert len(head.cls_tower) == 0  # a DyHead head has no towers, in both recipes
    paper_head = build.build_detector(resolve("atss-r50-dyh6-LSC-1x", "tiny"), 3, "torchvision").head
    assert paper_head.cls_logits.kernel_size == (3, 3)
    # the coco models differ by the predictors alone: 80 + 4 + 1 outputs from 256 channels, 9 - 1 taps per location
    gmacs = {e: count_run(resolve(e, "coco"), PAPER_INPUT, 80)["gmacs"] for e in (OFFICIAL, "atss-r50-dyh6-LSC-1x")}
    locations = sum(-(-800 // s) * -(-1344 // s) for s in (8, 16, 32, 64, 128))  # P6 13x21, P7 7x11
    assert gmacs["atss-r50-dyh6-LSC-1x"] - gmacs[OFFICIAL] == pytest.approx(locations * 85 * 256 * 8 / 1e9, rel=1e-9)


def test_the_recipe_is_refused_where_it_is_not_defined(repo_copy):
    path = repo_copy / "params/experiments.yaml"
    data = yaml.safe_load(path.read_text())
    data["experiments"]["fcos-r50-dyh6-LSC-1x-recipe_official"] = {
        "detector": "fcos", "backbone": "r50", "schedule": "1x", "head": {"blocks": 6}, "recipe": "official"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(DyheadError, match=r"experiments.fcos-r50-dyh6-LSC-1x-recipe_official.recipe: 'official' is "
                                          r"defined for atss only, not 'fcos'"):
        load_matrix()
    data["experiments"].pop("fcos-r50-dyh6-LSC-1x-recipe_official")
    data["experiments"]["atss-r50-dyh6-LSC-1x-recipe_official"]["recipe"] = "mine"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(DyheadError, match=r"recipe_official.recipe: 'mine' is not one of \['paper', 'official'\]"):
        load_matrix()


def test_table_2_has_the_official_row_on_coco_only(repo_copy):
    coco, mini = load_matrix(profile="coco"), load_matrix(profile="mini")
    assert [r["experiment"] for r in coco.tables["table2"]["rows"]][-1] == OFFICIAL
    assert OFFICIAL not in mini.table_experiments("table2") and len(mini.tables["table2"]["rows"]) == 7
    assert OFFICIAL in mini.experiments  # it exists everywhere (FLOPs are counted on coco); mini's table lacks the row

    dry = snakemake("-n", "-p", "--cores", "1024", "reports/table2.md", "--config", "profile=coco", cwd=repo_copy)
    jobs = dry_run_jobs(dry.stdout + dry.stderr)
    ours = [j for j in jobs if j["wildcards"] == f"exp={OFFICIAL}"]
    assert sorted(j["rule"] for j in ours) == ["evaluate", "flops", "train"]
    train = next(j for j in ours if j["rule"] == "train")
    assert train["shell"].startswith(f"dyhead train {OFFICIAL} --profile coco")
    assert "data/weights/resnet50-0676ba61.pth" in train["input"]
    report = next(j for j in jobs if j["rule"] == "report")
    assert f"runs/coco/{OFFICIAL}/flops.json" in report["input"]


def test_table_2_on_coco_prints_both_predictor_sizes(repo_copy):
    matrix = load_matrix(profile="coco")
    for i, row in enumerate(matrix.tables["table2"]["rows"]):
        exp = row["experiment"]
        gmacs = 214.73 if i == 0 else 214.73 + 21.58 - (3.9 if exp == OFFICIAL else 0.0)  # blocks: not this test's
        write_fake_run(repo_copy, "coco", exp, 40.0 + i, gmacs=gmacs, base_lr=0.01 if exp == OFFICIAL else 0.02,
                       iterations=90000, min_size=800)
    write_fake_run(repo_copy, "coco", "atss-r50-dyh6-LSC-1x-seed1", 42.0, gmacs=236.31, iterations=90000)
    text = render_table("table2", matrix, "coco", collect("coco", matrix, repo_copy / "runs"))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["6"].startswith("| 6 | +21.58 | +21.50 |")
    assert rows["6, official recipe"].startswith("| 6, official recipe | +17.68 | – | – | 47.00 | – | +7.00 | – |")
    assert f"`{OFFICIAL}` counts its 1×1 predictor convs (the official recipe)" in text
    assert f"Base lr 0.01 for `{OFFICIAL}`." in text
    assert f"`{OFFICIAL}` trains the official recipe: microsoft/DynamicHead's ATSS config" in text

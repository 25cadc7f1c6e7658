"""The cocolike profile: synthetic data in COCO 2017's geometry and layout, through the coco profile's models.

Fast: the generator is deterministic and writes COCO's layout, ids (with their gaps) and names; the COCO
loader and `dyhead check-data` read it; the stand-in weights load into the coco-size backbone by path;
Snakemake and DVC plan the profile's inputs. Slow: Table 2's DAG end to end on a shrunken copy of the
profile (4 train / 2 val images, 1 iteration of batch 1 per training, Table 2 cut to the baseline and the
1-block row): a few minutes on 2 CPU cores, most of it two training steps and two evaluations at 800x1333.
"""
import hashlib
import json
import shutil

import pytest
import torch
import yaml
from PIL import Image

from dyhead.data import cocolike
from dyhead.data.coco import CocoDetection
from dyhead.data.transforms import build_transforms
from tests.helpers import REPO, dyhead, snakemake

# COCO 2017's category ids: 1..90 less these ten
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _shrink_profile(root, num_train=6, num_val=3, iterations=None, batch=None):
    path = root / "params/profiles/cocolike.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["data"]["cocolike"].update(num_train=num_train, num_val=num_val)
    if iterations:
        profile["solver"]["schedules"] = {"1x": iterations, "2x": 2 * iterations, "3x": 3 * iterations}
    if batch:
        profile["solver"]["batch_size"] = profile["eval"]["batch_size"] = batch
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return profile


def test_cocolike_is_deterministic_in_coco_layout(tmp_path):
    a = tmp_path / "a"
    summary = cocolike.make_cocolike(a, num_train=6, num_val=3, seed=0, progress=False)
    cocolike.make_cocolike(tmp_path / "b", num_train=6, num_val=3, seed=0, progress=False)
    assert _digest(a) == _digest(tmp_path / "b")  # byte-identical for a seed
    cocolike.make_cocolike(tmp_path / "c", num_train=6, num_val=3, seed=1, progress=False)
    assert _digest(a) != _digest(tmp_path / "c")

    assert sorted(p.name for p in a.iterdir()) == ["annotations", "synth.json", "train2017", "val2017"]
    ids = {}
    for split in ("train2017", "val2017"):
        data = json.loads((a / "annotations" / f"instances_{split}.json").read_text())
        cats = {c["id"]: c for c in data["categories"]}
        assert len(cats) == 80 and set(cats) == set(range(1, 91)) - COCO_GAPS
        assert cats[1]["name"] == "person" and cats[90]["name"] == "toothbrush" and cats[3]["supercategory"] == "vehicle"
        ids[split] = {im["id"] for im in data["images"]}
        for im in data["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            with Image.open(a / split / im["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (im["width"], im["height"])
            assert max(im["width"], im["height"]) <= 640 and min(im["width"], im["height"]) >= 200
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["category_id"] in cats and w >= 2 and h >= 2 and ann["iscrowd"] in (0, 1)
    assert not ids["train2017"] & ids["val2017"]
    assert summary["train"]["images"] == 6 and summary["val"]["annotations"] > 0


def test_cocolike_statistics_are_coco_like():
    """Over 60 images: ~7 objects per image with a long tail, most images landscape, every size bucket
    used, person the most frequent class."""
    sizes, counts, landscape, classes = {"small": 0, "medium": 0, "large": 0}, [], 0, []
    for i in range(60):
        pixels, anns = cocolike.render_image(0, "train", i)
        landscape += pixels.shape[1] > pixels.shape[0]
        counts.append(len(anns))
        for cls, crowd, _, area in anns:
            classes.append(cls)
            if not crowd:
                sizes["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
    assert 5 <= sum(counts) / len(counts) <= 10 and max(counts) >= 15
    assert landscape > 30
    total = sum(sizes.values())
    assert 0.3 < sizes["small"] / total < 0.6 and sizes["large"] / total > 0.1
    assert max(set(classes), key=classes.count) == 0  # person


def test_synth_cli_and_coco_loader_read_it(repo_copy):
    _shrink_profile(repo_copy)
    out = dyhead("synth", "--profile", "cocolike", cwd=repo_copy)
    assert "open and match their sizes" in out.stdout + out.stderr  # synth runs check-data
    dyhead("check-data", "--profile", "cocolike", cwd=repo_copy)
    root = repo_copy / "data/cocolike"
    ds = CocoDetection(root / "train2017", root / "annotations/instances_train2017.json", train=True,
                       transforms=build_transforms(True, min_size=800, max_size=1333, flip_prob=0.5))
    assert len(ds.category_ids) == 80 and ds.category_ids[-1] == 90
    image, target = ds[0]
    assert image.shape[0] == 3 and (min(image.shape[1:]) == 800 or max(image.shape[1:]) == 1333)
    assert target["labels"].max() < 80 and len(target["boxes"]) > 0


def test_standin_weights_load_into_the_coco_backbone(repo_copy):
    from dyhead.config import load_profile
    from dyhead.modeling.backbone import BackboneConfig, ResNet, load_backbone_weights

    out = dyhead("standin-weights", "--profile", "cocolike", cwd=repo_copy)
    assert "not ImageNet" in out.stdout
    profile = load_profile("cocolike", repo_copy)
    path = repo_copy / profile["model"]["backbones"]["r50"]["weights"]
    assert path.name == "resnet50-random-init-not-imagenet.pth"
    assert (repo_copy / "data/weights/standin/resnet101-random-init-not-imagenet.pth").exists()
    body = ResNet(BackboneConfig(name="r50", norm="frozen_bn", freeze_at=2))
    load_backbone_weights(body, str(path))  # the coco path: by file, torchvision's names
    state = torch.load(path, weights_only=True)
    assert torch.equal(body.state_dict()["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    again = dyhead("standin-weights", "r50", "--dir", "data/weights/standin", cwd=repo_copy)
    assert "already there" in again.stdout


def test_workflow_and_dvc_plan_cocolike_inputs(repo_copy):
    from dyhead.dvc_stages import build_stages

    dry = snakemake("-n", "--cores", "2", "reports/table2.md", "--config", "profile=cocolike", cwd=repo_copy)
    text = dry.stdout + dry.stderr
    for rule in ("synth", "standin_weights", "build_ext", "train", "evaluate", "flops", "report"):
        assert f"rule {rule}:" in text or f"localrule {rule}:" in text, rule
    assert "fetch_weights" not in text and "fetch_coco" not in text
    stages = build_stages("cocolike", tables=["table2"], grids=[])["stages"]
    assert stages["synth"]["cmd"] == "dyhead synth --profile cocolike"
    standin = stages["standin_weights"]["foreach"]
    assert list(standin) == ["resnet50-random-init-not-imagenet.pth"] and "fetch_weights" not in stages


@pytest.mark.slow
def test_cocolike_table2_end_to_end(repo_copy, monkeypatch):
    monkeypatch.delenv("DYHEAD_EXT_DIR", raising=False)
    _shrink_profile(repo_copy, num_train=4, num_val=2, iterations=1, batch=1)
    tables = yaml.safe_load((repo_copy / "params/tables.yaml").read_text())
    keep = ("atss-r50-base-1x", "atss-r50-dyh1-LSC-1x")
    tables["table2"]["rows"] = [r for r in tables["table2"]["rows"] if r["experiment"] in keep]
    tables["table2"].pop("noise", None)
    (repo_copy / "params/tables.yaml").write_text(yaml.safe_dump(tables, sort_keys=False, allow_unicode=True))
    if (REPO / "build/ext/manifest.json").exists():  # reuse a built extension: saves its compile
        shutil.copytree(REPO / "build/ext", repo_copy / "build/ext", ignore=shutil.ignore_patterns("work-*"))

    snakemake("--cores", "2", "reports/table2.md", "--config", "profile=cocolike", cwd=repo_copy)
    table = (repo_copy / "reports/table2.md").read_text()
    assert "profile **cocolike**" in table and "| 0 | 214.73 |" in table
    for exp in keep:
        run = repo_copy / "runs/cocolike" / exp
        train = json.loads((run / "train.json").read_text())
        assert train["iterations"] == 1 and train["config"]["profile_settings"]["input"]["max_size"] == 1333
        metrics = json.loads((run / "metrics.json").read_text())
        assert "AP" in json.dumps(metrics)
        record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
        assert 0 <= record["data_sec_per_iter"] <= record["sec_per_iter"]
    assert (repo_copy / "data/weights/standin/resnet50-random-init-not-imagenet.pth").exists()


def test_reports_say_the_stand_in_weights_are_not_imagenet():
    from dyhead.config import load_profile
    from dyhead.report.text import backbone_start

    assert "not ImageNet's" in backbone_start(load_profile("cocolike"))
    assert backbone_start(load_profile("coco")) == "backbones from ImageNet weights"

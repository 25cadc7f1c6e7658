"""`dyhead pretrain`: the ImageNet stand-in of synthetic profiles, and how trainings pick it up."""
import json

import pytest
import torch
import yaml

from dyhead.config import load_profile, resolve, weights_file
from dyhead.errors import DyheadError
from dyhead.modeling import build
from tests.helpers import dvc_stages, dyhead, snakemake_commands


def pretrained_tiny(root, backbones=("r50",)):
    """Mark the tiny profile's backbones `weights: pretrained`."""
    path = root / "params/profiles/tiny.yaml"
    data = yaml.safe_load(path.read_text())
    for name in backbones:
        data["model"]["backbones"][name]["weights"] = "pretrained"
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_pretrain_writes_weights_that_training_loads(repo_copy):
    pretrained_tiny(repo_copy)
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    proc = dyhead("pretrain", "--profile", "tiny", cwd=repo_copy)
    assert "[pretrain] it 20/20" in proc.stdout and "held-out crop accuracy" in proc.stdout
    weights = repo_copy / "data/weights/tiny/r50.pth"
    summary = json.loads((repo_copy / "data/weights/tiny/r50.json").read_text())
    assert summary["iterations"] == 20 and summary["crops"] > 10 and 0.0 <= summary["held_out_accuracy"] <= 1.0
    run = resolve("atss-r50-base-1x", "tiny")
    assert run.weights == "data/weights/tiny/r50.pth"
    state = torch.load(weights, weights_only=True)
    model = build.build_detector(run, 3, "torchvision")
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    assert not torch.equal(state["conv1.weight"], build.build_detector(run, 3, "torchvision", load_weights=False)
                           .backbone.body.conv1.weight)
    # the same settings give the same file (seeded, CPU)
    first = weights.read_bytes()
    dyhead("pretrain", "r50", "--profile", "tiny", cwd=repo_copy)
    assert torch.equal(torch.load(weights, weights_only=True)["layer4.0.conv2.weight"], state["layer4.0.conv2.weight"])
    assert len(first) > 0


def test_pretrained_without_a_pretrain_section_is_refused(repo_copy):
    pretrained_tiny(repo_copy)
    path = repo_copy / "params/profiles/tiny.yaml"
    data = yaml.safe_load(path.read_text())
    del data["pretrain"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(DyheadError, match=r"tiny.yaml: model.backbones.r50.weights: 'pretrained' needs a `pretrain`"):
        load_profile("tiny")


def test_weights_file_names_imagenet_pretrained_or_none():
    coco, mini = load_profile("coco"), load_profile("mini")
    assert weights_file("coco", coco, "r50").endswith(".pth") and "pretrained" not in weights_file("coco", coco, "r50")
    assert weights_file("mini", mini, "r50") == "data/weights/mini/r50.pth"  # mini: `weights: pretrained`
    del mini["model"]["backbones"]["r50"]["weights"]
    assert weights_file("mini", mini, "r50") is None


def test_snakemake_and_dvc_pretrain_before_training(dvc_repo):
    """Both views run `dyhead pretrain` once per pretrained backbone and make its trainings wait for it."""
    pretrained_tiny(dvc_repo, ("r50", "r101"))
    dyhead("dvc-yaml", "--profile", "tiny", cwd=dvc_repo)
    targets = ["reports/table2.md", "reports/table4.md"]
    smk = snakemake_commands(dvc_repo, "tiny", targets)
    assert smk["pretrain@r50"] == "dyhead pretrain r50 --profile tiny --threads 1"
    assert "pretrain@r101" in smk and "pretrain@x101" not in smk
    stages = dvc_stages(dvc_repo)
    for name in ("pretrain@r50", "pretrain@r101"):
        assert stages[name] == smk[name]
    spec = yaml.safe_load((dvc_repo / "dvc.yaml").read_text())["stages"]
    assert "data/weights/tiny/r50.pth" in spec["train"]["do"]["deps"]
    assert "fetch_weights" not in spec

"""`dyhead pretrain`: the ImageNet stand-in of synthetic profiles, and how trainings pick it up."""
import json

import pytest
import torch
import yaml

from dyhead.config import load_profile, resolve, standin_paths, weights_file
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


def test_pretraining_trains_every_layer_whatever_the_detector_freezes(repo_copy, monkeypatch):
    """`freeze_at` and frozen BN are how a detector fine-tunes ImageNet weights; the stand-in is made with every layer
    trained and batch statistics, so its stem is not left at its random init, and its key ignores them."""
    from dyhead.config import standin_key
    from dyhead.engine import pretrain
    from torchvision.ops import FrozenBatchNorm2d

    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    profile = load_profile("tiny")
    entry = profile["model"]["backbones"]["r50"]
    key = standin_key(profile, "r50")
    entry.update(freeze_at=2, norm="frozen_bn", weights="pretrained")
    assert standin_key(profile, "r50") == {**key, "backbone": {**key["backbone"], "weights": "pretrained"}}
    seen = {}

    def spy(body, *args, **kwargs):
        seen["frozen"] = [n for n, p in body.named_parameters() if not p.requires_grad]
        seen["frozen_bn"] = any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
        seen["stem"] = body.conv1.weight.detach().clone()
        return real(body, *args, **kwargs)

    real = pretrain.pretrain_backbone
    monkeypatch.setattr(pretrain, "pretrain_backbone", spy)
    out = repo_copy / "data/weights/tiny/r50.pth"
    pretrain.run_pretrain("tiny", profile, "r50", out, log=lambda *_: None)
    assert seen["frozen"] == [] and not seen["frozen_bn"]
    assert not torch.equal(torch.load(out, weights_only=True)["conv1.weight"], seen["stem"])


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
    assert weights_file("mini", mini, "r101") == "data/weights/mini/r101.pth"  # mini: `weights: pretrained`
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


def test_mini_r50_starts_from_its_committed_standin():
    """README command 1 trains no stand-in: the committed one was made under mini's current settings and code.
    If this fails, pretrain.py, backbone.py, mini's data/pretrain/seed settings or r50 changed since it was made:
    `dyhead synth --profile mini && dyhead pretrain r50 --profile mini --embed`, then commit both files."""
    assert weights_file("mini", load_profile("mini"), "r50") == "data/standins/mini/r50.pth"
    assert resolve("atss-r50-dyh6-LSC-1x", "mini").weights == "data/standins/mini/r50.pth"


def test_committed_standin_replaces_pretraining_only_under_its_settings(dvc_repo):
    """`dyhead pretrain --embed` writes a stand-in and its manifest; Snakemake, DVC and the trainer then take it and
    schedule no pretraining, until a setting it depends on changes; a file that is not the one its manifest records
    is refused with one line."""
    pretrained_tiny(dvc_repo)
    dyhead("synth", "--profile", "tiny", cwd=dvc_repo)
    out = dyhead("pretrain", "r50", "--profile", "tiny", "--embed", cwd=dvc_repo).stdout
    committed, manifest = standin_paths("tiny", "r50")
    assert f"{committed}: committed stand-in for these settings" in out
    record = json.loads((dvc_repo / manifest).read_text())
    assert record["key"]["pretrain"]["iterations"] == 20 and len(record["sha256"]) == 64
    assert resolve("atss-r50-base-1x", "tiny").weights == committed
    smk = snakemake_commands(dvc_repo, "tiny", ["reports/table2.md"])
    assert "train@atss-r50-base-1x" in smk and not any(job.startswith("pretrain@") for job in smk)
    dyhead("dvc-yaml", "--profile", "tiny", cwd=dvc_repo)
    spec = yaml.safe_load((dvc_repo / "dvc.yaml").read_text())["stages"]
    assert "pretrain" not in spec and committed in spec["train"]["do"]["deps"]
    # the trainer loads it
    state = torch.load(dvc_repo / committed, weights_only=True)
    model = build.build_detector(resolve("atss-r50-base-1x", "tiny"), 3, "torchvision")
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    # pretraining again without --embed says which file trainings use
    note = dyhead("pretrain", "r50", "--profile", "tiny", cwd=dvc_repo).stdout
    assert f"trainings under these settings start from the committed {committed}" in note
    # another pretrain recipe: back to pretraining, in both views
    path = dvc_repo / "params/profiles/tiny.yaml"
    data = yaml.safe_load(path.read_text())
    data["pretrain"]["iterations"] = 30
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert resolve("atss-r50-base-1x", "tiny").weights == "data/weights/tiny/r50.pth"
    assert "pretrain@r50" in snakemake_commands(dvc_repo, "tiny", ["reports/table2.md"])
    data["pretrain"]["iterations"] = 20
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    # a different file under the manifest is an error, not a silent start from other weights
    (dvc_repo / committed).write_bytes(b"not the stand-in")
    with pytest.raises(DyheadError, match=r"data/standins/tiny/r50.pth: sha256 [0-9a-f]{12}\.\.\. is not the "):
        resolve("atss-r50-base-1x", "tiny").weights
    (dvc_repo / manifest).write_text("{")
    with pytest.raises(DyheadError, match=r"data/standins/tiny/r50.json: not a stand-in manifest"):
        resolve("atss-r50-base-1x", "tiny").weights

"""`dyhead diagnose`: per-stage gradients of each loss and the linear class probe."""
import json

import torch

from dyhead.config import resolve
from dyhead.engine.diagnose import diagnose, linear_probe, object_level
from tests.helpers import dyhead


def test_linear_probe_reads_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    separable = torch.randn(300, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float()
    assert linear_probe(separable, y, 3) == 1.0
    noise = torch.randn(300, 8, generator=g)
    assert linear_probe(noise, y, 3) < 0.6  # chance is 1/3


def test_object_level_follows_eight_strides():
    strides = [8, 16, 32, 64, 128]
    assert object_level(torch.tensor([0, 0, 64, 64]), strides) == 0  # 8 x 8
    assert object_level(torch.tensor([0, 0, 128, 128]), strides) == 1
    assert object_level(torch.tensor([0, 0, 2, 2]), strides) == 0  # smaller than any: the finest
    assert object_level(torch.tensor([0, 0, 5000, 5000]), strides) == 4


def test_diagnose_dyhead_and_towers_on_tiny(repo_copy):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    out = dyhead("diagnose", "retinanet-r50-dyh6-LSC-1x", "--profile", "tiny", "--init", "--images", "16",
                 "--dcn-backend", "torchvision", cwd=repo_copy)
    assert "| block 6 |" in out.stdout and "|grad cls|" in out.stdout
    rec = json.loads((repo_copy / "runs/tiny/retinanet-r50-dyh6-LSC-1x/diagnose_init.json").read_text())
    assert [s["stage"] for s in rec["stages"]] == ["fpn"] + [f"block {k}" for k in range(1, 7)]
    assert rec["losses"] == ["loss_cls", "loss_box"] and rec["objects"] > 0
    for stage in rec["stages"]:
        assert stage["grad_norm"]["loss_cls"] > 0 and stage["grad_norm"]["loss_box"] > 0  # one shared branch
        assert 0.0 <= stage["class_probe_accuracy"] <= 1.0


def test_diagnose_baseline_towers_see_one_loss_each(repo_copy, monkeypatch):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    rec = diagnose(resolve("retinanet-r50-base-1x", "tiny", repo_copy), init=True, images=16, backend="torchvision",
                   log=lambda *a: None)
    grads = {s["stage"]: s["grad_norm"] for s in rec["stages"]}
    assert set(grads) == {"fpn", "cls tower", "box tower"}
    assert grads["cls tower"]["loss_box"] == 0 and grads["cls tower"]["loss_cls"] > 0
    assert grads["box tower"]["loss_cls"] == 0 and grads["box tower"]["loss_box"] > 0


def test_diagnose_needs_a_trained_model_or_init(repo_copy):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    proc = dyhead("diagnose", "atss-r50-base-1x", "--profile", "tiny", cwd=repo_copy, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("runs/tiny/atss-r50-base-1x/model_final.pth: not found; train "
                                        "atss-r50-base-1x first, or pass --init")

"""The README's code runs as printed: the DyHead block in your own code, and the worked "Add a detector"."""
import re
from dataclasses import replace

import torch

from dyhead.config import resolve
from dyhead.modeling import build
from tests.helpers import REPO


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_block_example_runs():
    (block,) = [b for b in python_blocks() if "from dyhead import DyHead" in b]
    exec(compile(block, "README.md", "exec"), {})


def test_the_added_detector_trains_and_detects(repo_copy, monkeypatch):
    detector, builder = [b for b in python_blocks() if "class Points(" in b or "def build_points" in b]
    ns: dict = {}
    exec(compile(detector, "README.md", "exec"), ns)
    monkeypatch.setattr(build, "DETECTORS", dict(build.DETECTORS))
    exec(compile(builder, "README.md", "exec"), {**vars(build), **ns})
    assert "points" in build.DETECTORS

    base = resolve("atss-r50-dyh1-LSC-1x", "tiny")
    run = replace(base, spec={**base.spec, "detector": "points"})
    torch.manual_seed(0)
    model = build.build_detector(run, num_classes=3, dcn_backend="torchvision")
    assert model.head.dyhead is not None and len(model.head.tower) == 0  # the blocks replace the tower
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0], [0.0, 30.0, 20.0, 60.0]]), "labels": torch.tensor([0, 2])}]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    first = None
    for _ in range(30):  # overfit two images: the losses must fall
        losses = model(images, targets)
        total = sum(losses.values())
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert set(losses) == {"loss_cls", "loss_box"} and total.item() < first
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert (out[1]["boxes"][:, 2] <= 48).all()  # clipped to each image

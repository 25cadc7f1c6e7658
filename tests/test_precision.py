"""Mixed precision: the network under autocast, losses and decoding in fp32, a resumed run identical to an
uninterrupted one (fp16 with its gradient scaler in the checkpoint), the precision recorded with the run."""
import json
import shutil

import pytest
import torch
import yaml

from dyhead.config import resolve
from dyhead.engine.runtime import Runtime, resolve_precision
from dyhead.engine.distributed import Dist
from dyhead.modeling.build import build_detector
from tests.helpers import dyhead

EXP = "atss-r50-dyh1-LSC-1x"


def precision_profile(root, name, precision, **solver):
    prof = yaml.safe_load((root / "params/profiles/tiny.yaml").read_text())
    prof["runtime"]["precision"] = precision
    prof["solver"].update(solver)
    (root / f"params/profiles/{name}.yaml").write_text(yaml.safe_dump(prof))


def test_network_in_half_precision_losses_and_detections_in_fp32():
    run = resolve(EXP, "tiny")
    torch.manual_seed(0)
    model = build_detector(run, 3, "torchvision", load_weights=False)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    rt = Runtime(Dist(), "torchvision", print, "bf16")
    seen = {}
    model.head.register_forward_hook(lambda m, i, out: seen.update(dtype=out[0][0].dtype))  # returns None
    with rt.autocast():
        losses = model(images, targets)
    assert seen["dtype"] == torch.bfloat16  # the network ran in bf16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with rt.autocast(), torch.no_grad():
        out = model(images)
    assert out[0]["boxes"].dtype == torch.float32 and out[0]["scores"].dtype == torch.float32


def test_auto_is_bf16_only_on_a_gpu_that_has_it():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_resumed_half_precision_run_ends_identical(repo_copy, precision):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    name = f"tiny{precision}"
    precision_profile(repo_copy, name, precision, schedules={"1x": 8, "2x": 16, "3x": 24}, checkpoint_period=4)
    args = ("train", EXP, "--profile", name, "--dcn-backend", "torchvision")
    dyhead(*args, cwd=repo_copy)
    run = repo_copy / "runs" / name / EXP
    reference = torch.load(run / "model_final.pth", weights_only=True)["model"]
    summary = json.loads((run / "train.json").read_text())
    assert summary["precision"] == precision
    shutil.rmtree(run)

    dyhead(*args, "--stop-at", "5", cwd=repo_copy)
    ckpt = torch.load(run / "checkpoints/last.pth", weights_only=True)
    assert ckpt["iteration"] == 4 and (("scaler" in ckpt) == (precision == "fp16"))
    assert "resuming from" in dyhead(*args, cwd=repo_copy).stdout
    final = torch.load(run / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert resolve(EXP, name, repo_copy).digest != resolve(EXP, "tiny", repo_copy).digest
    dyhead("evaluate", EXP, "--profile", name, "--dcn-backend", "torchvision", cwd=repo_copy)
    assert json.loads((run / "metrics.json").read_text())["precision"] == precision

"""AP during training (profile `curve`): logged at its points, and the training unchanged by it."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from dyhead.config import resolve
from tests.helpers import dyhead

EXP = "atss-r50-dyh1-LSC-1x"


def tiny_profile(root: Path, name: str, curve: dict | None, **solver) -> None:
    """The tiny profile with an AP curve (or none) and solver overrides, as params/profiles/<name>.yaml."""
    prof = yaml.safe_load((root / "params/profiles/tiny.yaml").read_text())
    prof["solver"].update(solver)
    if curve is not None:
        prof["curve"] = curve
    (root / f"params/profiles/{name}.yaml").write_text(yaml.safe_dump(prof))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny(repo_copy):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    return repo_copy


def test_curve_leaves_the_weights_bit_identical_and_the_digest_alone(tiny):
    tiny_profile(tiny, "off", None, schedules={"1x": 8, "2x": 16}, log_period=2)
    tiny_profile(tiny, "on", {"period": 3, "images": 6}, schedules={"1x": 8, "2x": 16}, log_period=2)
    assert resolve(EXP, "on").digest == resolve(EXP, "off").digest
    for prof in ("off", "on"):
        dyhead("train", EXP, "--profile", prof, cwd=tiny)
    off = torch.load(tiny / "runs/off" / EXP / "model_final.pth", map_location="cpu", weights_only=True)
    on = torch.load(tiny / "runs/on" / EXP / "model_final.pth", map_location="cpu", weights_only=True)
    assert on["digest"] == off["digest"]
    assert on["model"].keys() == off["model"].keys()
    for k in off["model"]:  # BN running statistics and counters included
        assert torch.equal(on["model"][k], off["model"][k]), k

    log_on, log_off = records(tiny / "runs/on" / EXP), records(tiny / "runs/off" / EXP)
    curve = [r for r in log_on if "curve_ap" in r]
    assert [r["iteration"] for r in curve] == [3, 6, 8]  # every period, and the end
    assert all(0.0 <= r["curve_ap"] <= 100.0 and r["curve_images"] == 6 for r in curve)
    assert {"curve_ap50", "curve_ap75", "curve_seconds"} <= set(curve[0])
    timings = ("sec_per_iter", "data_sec_per_iter")  # the only keys allowed to differ: wall-clock times
    assert [r for r in log_on if "curve_ap" not in r] == [
        {**r, **{k: r2[k] for k in timings}} for r, r2 in zip(log_off, [r for r in log_on if "loss" in r])]
    assert all("curve_ap" not in r for r in log_off)


def test_a_resumed_training_logs_each_curve_point_once(tiny):
    tiny_profile(tiny, "resume", {"period": 2, "images": 4}, schedules={"1x": 8, "2x": 16}, checkpoint_period=2)
    dyhead("train", EXP, "--profile", "resume", "--stop-at", "5", cwd=tiny)
    run = tiny / "runs/resume" / EXP
    assert [r["iteration"] for r in records(run) if "curve_ap" in r] == [2, 4]
    dyhead("train", EXP, "--profile", "resume", cwd=tiny)
    assert [r["iteration"] for r in records(run) if "curve_ap" in r] == [2, 4, 6, 8]
    assert [r["iteration"] for r in records(run) if "loss" in r] == list(range(1, 9))


def test_a_curve_point_changes_no_state_rng_or_mode(tiny):
    from dyhead.engine import runtime, train

    tiny_profile(tiny, "inproc", {"period": 1, "images": 8})
    run = resolve(EXP, "inproc")
    t = train.setup(run, runtime.start(run, log=lambda *a: None))
    t.model.train()
    state, rng = copy.deepcopy(t.model.state_dict()), torch.get_rng_state()
    record = train.curve_point(t, 1)
    assert record["iteration"] == 1 and record["curve_images"] == 8
    assert t.model.training and all(m.training for m in t.model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    after = t.model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    t.tracker.finish("FINISHED")

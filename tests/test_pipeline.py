"""The pipeline as a user runs it: CLI steps on the tiny profile, kill and resume, bad inputs."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import dyhead

EXP = "atss-r50-dyh1-LSC-1x"


def set_profile(root: Path, name: str, **solver):
    """A copy of the tiny profile with solver overrides, saved as params/profiles/<name>.yaml."""
    prof = yaml.safe_load((root / "params/profiles/tiny.yaml").read_text())
    prof["solver"].update(solver)
    (root / f"params/profiles/{name}.yaml").write_text(yaml.safe_dump(prof))


@pytest.fixture
def tiny(repo_copy):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    return repo_copy


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_train_evaluate_flops_on_tiny(tiny):
    dyhead("train", EXP, "--profile", "tiny", "--dcn-backend", "torchvision", cwd=tiny)
    dyhead("evaluate", EXP, "--profile", "tiny", "--dcn-backend", "torchvision", cwd=tiny)
    out = dyhead("flops", EXP, "--profile", "tiny", cwd=tiny)
    run = tiny / "runs/tiny" / EXP
    for name in ("model_final.pth", "train.json", "log.jsonl", "metrics.json", "predictions.json", "flops.json"):
        assert (run / name).exists(), name
    assert not (run / "checkpoints/last.pth").exists()  # removed once the final weights are written
    assert "GMACs" in out.stdout
    assert isinstance(json.loads((run / "predictions.json").read_text()), list)


def test_predictions_are_written_compact_and_what_people_read_indented(tmp_path):
    from dyhead.files import save_json

    dets = [{"image_id": i, "category_id": 1, "bbox": [0.5, 1.0, 2.0, 3.25], "score": 0.9} for i in range(3)]
    save_json(tmp_path / "p.json", dets, compact=True)  # as evaluate writes predictions (100k of them on mini)
    save_json(tmp_path / "m.json", dets)
    compact, indented = (tmp_path / "p.json").read_text(), (tmp_path / "m.json").read_text()
    assert compact.count("\n") == 1 and " " not in compact and indented.count("\n") > 10
    assert json.loads(compact) == json.loads(indented) == dets


def test_killed_training_resumes_to_identical_weights(tiny):
    set_profile(tiny, "resume", schedules={"1x": 40, "2x": 80}, checkpoint_period=10, log_period=5)
    args = ("train", EXP, "--profile", "resume", "--dcn-backend", "torchvision")
    dyhead(*args, cwd=tiny)
    run = tiny / "runs/resume" / EXP
    reference = weights(run / "model_final.pth")
    shutil.rmtree(run)

    proc = subprocess.Popen([sys.executable, "-m", "dyhead.cli", *args], cwd=tiny,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints/last.pth"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (run / "model_final.pth").exists(), "the kill did not land mid-training"

    resumed = dyhead(*args, cwd=tiny)
    assert "resuming from" in resumed.stdout
    final = weights(run / "model_final.pth")
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


def test_stop_and_resume_in_process_matches(tiny):
    set_profile(tiny, "resume2", schedules={"1x": 12, "2x": 24}, checkpoint_period=4)
    base = ("train", "atss-r50-base-1x", "--profile", "resume2")
    dyhead(*base, cwd=tiny)
    run = tiny / "runs/resume2/atss-r50-base-1x"
    reference = weights(run / "model_final.pth")
    shutil.rmtree(run)
    dyhead(*base, "--stop-at", "8", cwd=tiny)
    assert not (run / "model_final.pth").exists()
    dyhead(*base, cwd=tiny)
    final = weights(run / "model_final.pth")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    iters = [int(line.split('"iteration": ')[1].split(",")[0]) for line in (run / "log.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters)), "log lines repeated after resume"


def test_a_run_resumed_on_another_machine_names_both_in_train_json(tiny):
    """Float rounding follows the machine's kernels, so a training that moved between machine types says so."""
    from dyhead.engine.runtime import machine

    set_profile(tiny, "moved", schedules={"1x": 8, "2x": 16}, checkpoint_period=4)
    base = ("train", "atss-r50-base-1x", "--profile", "moved")
    dyhead(*base, "--stop-at", "4", cwd=tiny)
    run = tiny / "runs/moved/atss-r50-base-1x"
    here = machine(torch.device("cpu"))
    ckpt = torch.load(run / "checkpoints/last.pth", map_location="cpu", weights_only=True)
    assert ckpt["machines"] == [here]
    ckpt["machines"] = ["Some Other CPU (AVX2)"]  # as if the first iterations had run elsewhere
    torch.save(ckpt, run / "checkpoints/last.pth")
    dyhead(*base, cwd=tiny)
    assert json.loads((run / "train.json").read_text())["machines"] == ["Some Other CPU (AVX2)", here]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny):
    set_profile(tiny, "diverge", base_lr=1.0e6, warmup_iters=0, schedules={"1x": 30, "2x": 60}, checkpoint_period=1)
    proc = dyhead("train", "atss-r50-base-1x", "--profile", "diverge", cwd=tiny, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "stopped" in err and ("non-finite" in err or "loss is nan" in err.lower() or "loss is inf" in err.lower())
    run = tiny / "runs/diverge/atss-r50-base-1x"
    assert not (run / "model_final.pth").exists()
    ckpt = torch.load(run / "checkpoints/last.pth", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_corrupt_annotation_file_is_one_line(tiny):
    ann = tiny / "data/synthetic-tiny/annotations/instances_train.json"
    ann.write_text(ann.read_text()[:200])
    proc = dyhead("train", "atss-r50-base-1x", "--profile", "tiny", cwd=tiny, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "instances_train.json" in proc.stderr and "Traceback" not in proc.stderr


def test_undecodable_image_is_one_line(tiny):
    img = sorted((tiny / "data/synthetic-tiny/val").glob("*.png"))[0]
    img.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dyhead("train", "atss-r50-base-1x", "--profile", "tiny", cwd=tiny)
    proc = dyhead("evaluate", "atss-r50-base-1x", "--profile", "tiny", cwd=tiny, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and img.name in proc.stderr and "Traceback" not in proc.stderr

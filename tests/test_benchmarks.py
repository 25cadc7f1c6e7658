"""The benchmark scripts run and report what they say (tiny sizes on the CPU; the GPU runs are in docs/results)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_step_times_each_model_and_backend(tmp_path, capsys):
    bench = _load("train_step")
    out = tmp_path / "steps.json"
    rc = bench.main(["--profile", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "2",
                     "--backends", "torchvision", "--json", str(out), "retinanet-r50-base-1x", "atss-r50-dyh1-LSC-1x"])
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["profile"] == "tiny" and got["batch"] == 2
    assert [(r["experiment"], r["backend"]) for r in got["results"]] == [
        ("retinanet-r50-base-1x", "torchvision"), ("atss-r50-dyh1-LSC-1x", "torchvision")]
    for r in got["results"]:
        assert r["sec_per_step"] > 0 and math.isclose(r["images_per_sec"], 2 / r["sec_per_step"])
        assert r["losses"] and all(math.isfinite(v) for v in r["losses"].values())
    table = capsys.readouterr().out
    assert "| retinanet-r50-base-1x | – |" in table  # no native column asked for


def test_train_step_default_rows_are_table3(capsys):
    bench = _load("train_step")
    exps = bench.default_experiments()
    assert exps[:2] == ["atss-r50-base-1x", "atss-r50-dyh6-LSC-1x"] and len(exps) == len(set(exps))
    assert {"faster_rcnn-r50-dyh6-LSC-1x", "reppoints-r50-dyh6-LSC-1x", "fcos-r50-base-1x"} <= set(exps)


def test_train_step_refuses_unknown_backend(capsys):
    bench = _load("train_step")
    assert bench.main(["--profile", "tiny", "--device", "cpu", "--backends", "cudnn", "atss-r50-base-1x"]) == 2
    assert "unknown backend 'cudnn'" in capsys.readouterr().err

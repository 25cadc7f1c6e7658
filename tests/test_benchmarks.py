"""The benchmark scripts run and report what they say (tiny sizes on the CPU; the GPU runs are in docs/results)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
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


def _native_built() -> None:
    from dyhead.ops import build, native

    if not native.is_built():
        build.build_extension(cuda="off")
    assert native.is_built(), native.status()


def test_train_step_dyhead_over_baseline_and_autocast(tmp_path, capsys):
    """--dtype runs the step under autocast; each DyHead model is divided by its baseline of the same run."""
    bench = _load("train_step")
    assert bench.baseline_of("faster_rcnn-r50-dyh6-LSC-1x") == "faster_rcnn-r50-base-1x"
    assert bench.baseline_of("atss-r50-base-1x") is None
    out = tmp_path / "train_step_bfloat16.json"
    rc = bench.main(["--profile", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "1",
                     "--dtype", "bfloat16", "--backends", "torchvision", "--json", str(out),
                     "retinanet-r50-base-1x", "retinanet-r50-dyh1-LSC-1x"])
    got = json.loads(out.read_text())
    # torchvision's deformable conv has no bfloat16 CPU kernel: that run fails, is reported, and the rest goes on
    assert rc == 1 and got["dtype"] == "bfloat16"
    assert [(e["experiment"], e["backend"]) for e in got["errors"]] == [("retinanet-r50-dyh1-LSC-1x", "torchvision")]
    assert [r["experiment"] for r in got["results"]] == ["retinanet-r50-base-1x"]
    assert got["results"][0]["dtype"] == "bfloat16"
    assert got["dyhead_over_baseline"] == [{"experiment": "retinanet-r50-dyh1-LSC-1x", "baseline": "retinanet-r50-base-1x"}]
    assert "(autocast)" in capsys.readouterr().out


def test_train_step_ratio_table(tmp_path):
    bench = _load("train_step")
    results = [{"experiment": "a-r50-base-1x", "backend": "native", "sec_per_step": 2.0},
               {"experiment": "a-r50-dyh6-LSC-1x", "backend": "native", "sec_per_step": 3.0},
               {"experiment": "a-r50-dyh6-LSC-1x", "backend": "torchvision", "sec_per_step": 5.0}]
    ratios = bench.dyhead_over_baseline(results, ["a-r50-base-1x", "a-r50-dyh6-LSC-1x"], ["native", "torchvision"])
    assert ratios == [{"experiment": "a-r50-dyh6-LSC-1x", "baseline": "a-r50-base-1x", "native": 1.5}]


def test_dcn_check_runs_on_cpu(tmp_path, capsys):
    """The COCO P3 check (`dcn.py --coco`) at a tiny shape on the CPU: timings, ratios and the numerics of
    the native op against torchvision float32, in JSON and in the gpu_checks summary."""
    _native_built()
    bench = _load("dcn")
    out = tmp_path / "dcn_float32.json"
    rc = bench.main(["--device", "cpu", "--coco", "--only", "check", "--check-shape", "1,8,6,7", "--reps", "3",
                     "--budget", "0.01", "--json", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    c = got["check"]
    assert got["results"] == [] and c["dtype"] == "float32"
    assert (c["shape"]["n"], c["shape"]["c"], c["shape"]["h"], c["shape"]["w"]) == (1, 8, 6, 7)
    for b in ("native", "conv", "torchvision_fp32"):
        assert c[b]["error"] is None and c[b]["fb_ms"] > 0
    assert math.isclose(c["native_over_conv"], c["native"]["fb_ms"] / c["conv"]["fb_ms"])
    assert math.isclose(c["tv_fp32_over_native"], c["torchvision_fp32"]["fb_ms"] / c["native"]["fb_ms"])
    num = c["numerics"]
    assert num["tolerance"] == {"rtol": 1e-4, "atol": 2e-4, "gradients_scaled_by_max_abs": False}
    names = ("output", "grad_input", "grad_offset", "grad_mask", "grad_weight", "grad_bias")
    assert all(num[k]["ok"] and num[k]["max_abs_err"] < 1e-4 for k in names) and num["ok"]
    printed = capsys.readouterr().out
    assert "native / conv" in printed and "grad_offset" in printed
    summary = _load("gpu_summary")
    assert summary.main([str(tmp_path)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("- dcn_float32:")][0]
    assert "1x8x6x7" in line and "numerics (rtol 0.0001) ok" in line


def test_dcn_refuses_bad_groups_and_shapes(capsys):
    bench = _load("dcn")
    assert bench.main(["--device", "cpu", "--only", "check,huge"]) == 2
    assert "unknown shape group(s) huge" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--coco", "--only", "check", "--check-shape", "1,8,6"]) == 2
    assert "--check-shape" in capsys.readouterr().err


def test_profile_step_top_kernels_on_cpu(tmp_path):
    """profile_step.py on the CPU: the top operators of a DyHead step include the native deformable conv."""
    _native_built()
    bench = _load("profile_step")
    js, md = tmp_path / "prof.json", tmp_path / "prof.md"
    rc = bench.main(["--device", "cpu", "--profile", "tiny", "--steps", "1", "--warmup", "0", "--batch", "1",
                     "--top", "100000", "--json", str(js), "--md", str(md), "atss-r50-dyh1-LSC-1x"])
    assert rc == 0
    got = json.loads(js.read_text())
    (m,) = got["models"]
    assert m["experiment"] == "atss-r50-dyh1-LSC-1x" and m["time_kind"] == "self CPU time of operators"
    names = [k["name"] for k in m["kernels"]]
    assert "dyhead::deform_conv2d" in names and "dyhead::deform_conv2d_backward" in names
    shares = [k["share"] for k in m["kernels"]]
    assert shares == sorted(shares, reverse=True) and 0.99 < sum(shares) <= 1.0 + 1e-9
    assert math.isclose(sum(k["total_ms"] for k in m["kernels"]), m["total_ms"], rel_tol=1e-6)
    text = md.read_text()
    assert text.startswith("# Top kernels of a training step (cpu, float32, profile tiny, batch 1")
    assert "| dyhead::deform_conv2d |" in text


def test_train_throughput_runs_dyhead_train_in_its_own_root(tmp_path, capsys):
    bench = _load("train_throughput")
    out, work = tmp_path / "throughput.json", tmp_path / "work"
    rc = bench.main(["--profile", "tiny", "--device", "cpu", "--iterations", "2", "--workers", "0", "--batch", "2",
                     "--evaluate", "--eval-images", "3", "--workdir", str(work), "--json", str(out),
                     "atss-r50-base-1x", "atss-r50-dyh1-LSC-1x"])
    assert rc == 0
    got = json.loads(out.read_text())
    assert [r["experiment"] for r in got["results"]] == ["atss-r50-base-1x", "atss-r50-dyh1-LSC-1x"]
    for r in got["results"]:
        assert r["batch"] == 2 and r["iterations"] == 2 and r["timed_iterations"] == 1 and r["workers"] == 0
        assert math.isclose(r["images_per_second"] * r["seconds_per_image"], 1.0)
        assert 0.0 <= r["data_wait_fraction"] <= 1.0 and r["peak_memory_mb"] > 0
        # 90k iterations x 16 images over 8 devices at the measured rate; 2x twice that
        h = r["projected_hours_8_devices"]
        assert math.isclose(h["1x"], 90_000 * 16 * r["seconds_per_image"] / 8 / 3600)
        assert math.isclose(h["2x"], 2 * h["1x"])
        assert r["evaluate"]["images"] == 3  # the first 3 val images of tiny's 8
    # its own runs/, never the checkout's
    assert (work / "runs/tiny/atss-r50-base-1x/train.json").exists()
    assert "| atss-r50-dyh1-LSC-1x | cpu | 2 | 0 | 1 |" in capsys.readouterr().out


def test_train_throughput_steady_state_from_running_means():
    bench = _load("train_throughput")
    # iterations took 5, 1, 2 s (running means 5, 3, 8/3) and waited 4, 0.5, 0.5 s for data
    records = [{"iteration": 1, "sec_per_iter": 5.0, "data_sec_per_iter": 4.0},
               {"iteration": 2, "sec_per_iter": 3.0, "data_sec_per_iter": 0.5},
               {"iteration": 3, "sec_per_iter": 8 / 3, "data_sec_per_iter": 0.5}]
    got = bench.steady_state(records)
    assert got["iterations"] == 2 and math.isclose(got["seconds"], 3.0) and math.isclose(got["data_seconds"], 1.0)


def test_curve_cost_reads_curve_seconds_against_the_rest_of_training(tmp_path, capsys):
    bench = _load("curve_cost")
    runs = tmp_path / "runs/mini"

    def run(name, train_seconds, curve_seconds, resumed_from=0):
        d = runs / name
        d.mkdir(parents=True)
        (d / "train.json").write_text(json.dumps({"train_seconds": train_seconds, "iterations": 1000,
                                                  "resumed_from": resumed_from}))
        lines = [{"iteration": 10, "loss": 1.0}] + [{"iteration": 250 * (i + 1), "curve_ap": 1.0, "curve_images": 100,
                                                     "curve_seconds": s} for i, s in enumerate(curve_seconds)]
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    run("a", 110.0, [4.0, 6.0])         # 10 s of curve against 100 s of training: 10%
    run("b", 303.0, [1.0, 1.0, 1.0])    # 3 against 300: 1%
    run("c", 50.0, [5.0], resumed_from=500)  # its train_seconds covers only the resumed part: left out
    out = tmp_path / "cost.json"
    assert bench.main(["--runs", str(runs), "--json", str(out)]) == 0
    got = {r["experiment"]: r for r in json.loads(out.read_text())}
    assert set(got) == {"a", "b"}
    assert math.isclose(got["a"]["cost"], 0.1) and math.isclose(got["b"]["cost"], 0.01)
    assert got["a"]["points"] == 2 and got["b"]["images"] == 100
    # pooled: 13 s of curve over 400 s of training
    assert "all runs: 3.2% longer with the curve; the most: a 10.0%" in capsys.readouterr().out


def test_precision_pair_trains_in_bf16_and_compares_with_the_fp32_noise(tmp_path, capsys):
    bench = _load("precision_pair")
    runs = tmp_path / "runs"
    for name, ap in (("atss-r50-base-1x", 10.0), ("atss-r50-base-1x-seed1", 12.5)):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({"metrics": {"AP": ap, "AP50": 20.0, "AP75": 5.0}}))
    out, work = tmp_path / "pair.json", tmp_path / "work"
    assert bench.main(["atss-r50-base-1x", "--profile", "tiny", "--runs", str(runs), "--workdir", str(work),
                       "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["noise_ap"] == 2.5 and got["fp32"]["AP"] == 10.0
    # the bf16 run is real: trained and evaluated in the scratch root, never in the checkout's runs/
    train = json.loads((work / "runs/tiny/atss-r50-base-1x/train.json").read_text())
    assert train["precision"] == "bf16"
    metrics = json.loads((work / "runs/tiny/atss-r50-base-1x/metrics.json").read_text())["metrics"]
    assert got["bf16"]["AP"] == metrics["AP"]
    assert math.isclose(got["gap_ap"], round(got["bf16"]["AP"] - 10.0, 2))
    assert got["within_noise"] == (abs(got["bf16"]["AP"] - 10.0) <= 2.5)
    assert "seed noise |fp32 - seed 1|: 2.50 AP" in capsys.readouterr().out


def test_precision_pair_without_the_fp32_runs_says_what_to_run(tmp_path):
    bench = _load("precision_pair")
    with pytest.raises(SystemExit, match="metrics.json is missing: run the pipeline first"):
        bench.main(["--runs", str(tmp_path), "--workdir", str(tmp_path / "work")])


def test_train_throughput_summarises_finished_runs_without_training(tmp_path, capsys):
    bench = _load("train_throughput")
    run = tmp_path / "runs/cocolike/atss-r50-base-1x"
    run.mkdir(parents=True)
    settings = {"solver": {"batch_size": 2}, "runtime": {"num_workers": 1}}
    (run / "train.json").write_text(json.dumps({
        "experiment": "atss-r50-base-1x", "device": "cpu", "threads": 2, "precision": "fp32", "dcn_backend": "native",
        "peak_rss_mb": 4000.0, "config": {"profile_settings": settings}}))
    # iterations of 30, 10, 20 s (running means 30, 20, 20), 1 s of data wait in each timed one
    records = [{"iteration": 1, "sec_per_iter": 30.0, "data_sec_per_iter": 5.0},
               {"iteration": 2, "sec_per_iter": 20.0, "data_sec_per_iter": 1.0},
               {"curve_ap": 1.0, "iteration": 2},
               {"iteration": 3, "sec_per_iter": 20.0, "data_sec_per_iter": 1.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "metrics.json").write_text(json.dumps({"images": 10, "eval_seconds": 50.0}))
    out = tmp_path / "t.json"
    assert bench.main(["--from-runs", str(run.parent), "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["timed_iterations"] == 2 and math.isclose(r["seconds_per_iteration"], 15.0)
    assert math.isclose(r["seconds_per_image"], 7.5) and math.isclose(r["data_wait_fraction"], 2 / 30)
    assert r["peak_memory_per_image_mb"] == 2000.0 and r["evaluate"]["images_per_second"] == 0.2
    assert "| atss-r50-base-1x | cpu | 2 | 1 | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finished training"):
        bench.main(["--from-runs", str(tmp_path)])


def test_step_pair_times_a_revision_against_this_checkout(tmp_path, capsys):
    _native_built()  # HEAD's sources are this checkout's (in CI): the revision shares the extension
    bench = _load("step_pair")
    out, work = tmp_path / "pair.json", tmp_path / "work"
    assert bench.main(["atss-r50-base-1x", "--ref", "HEAD", "--profile", "tiny", "--rounds", "2", "--steps", "1",
                       "--warmup", "0", "--workdir", str(work), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    (row,) = got["rows"]
    assert len(row["ref_all"]) == len(row["this_all"]) == 2 and min(row["ref_all"] + row["this_all"]) > 0
    assert math.isclose(row["ref_over_this"], row["ref_sec_per_step"] / row["this_sec_per_step"])
    assert (work / "ref" / "dyhead" / "modeling" / "dyhead.py").exists()  # the revision's own tree ran
    assert f"| atss-r50-base-1x | {row['ref_sec_per_step'] * 1000:.1f} |" in capsys.readouterr().out


def test_train_step_channels_last_and_its_summary_line(tmp_path, capsys):
    """train_step --memory-format, as gpu_checks.sh runs it (here on the CPU), and gpu_summary's ratio line."""
    bench = _load("train_step")
    common = ["--profile", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "1", "--threads", "1",
              "--backends", "torchvision", "--dtype", "bfloat16", "atss-r50-base-1x"]
    for suffix, fmt in (("", []), ("_channels_last", ["--memory-format", "channels_last"])):
        assert bench.main([*common, *fmt, "--json", str(tmp_path / f"train_step_bfloat16{suffix}.json")]) == 0
    nhwc = json.loads((tmp_path / "train_step_bfloat16_channels_last.json").read_text())
    assert nhwc["memory_format"] == nhwc["results"][0]["memory_format"] == "channels_last"
    plain = json.loads((tmp_path / "train_step_bfloat16.json").read_text())
    capsys.readouterr()
    assert _load("gpu_summary").main([str(tmp_path)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "channels_last" in ln]
    ratio = plain["results"][0]["sec_per_step"] / nhwc["results"][0]["sec_per_step"]
    assert line.startswith("- train_step bfloat16 channels_last: atss-r50-base-1x") and f"= {ratio:.2f}x" in line


def test_step_pair_set_changes_this_checkouts_side_only(tmp_path):
    _native_built()
    bench = _load("step_pair")
    out = tmp_path / "pair.json"
    assert bench.main(["atss-r50-base-1x", "--ref", "HEAD", "--profile", "tiny", "--rounds", "1", "--steps", "1",
                       "--warmup", "0", "--set", "runtime.memory_format=channels_last", "--workdir",
                       str(tmp_path / "work"), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["settings"] == {"runtime.memory_format": "channels_last"}
    (row,) = got["rows"]
    assert (row["ref_layout"], row["this_layout"]) == ("contiguous", "channels_last")
    with pytest.raises(SystemExit, match="--set memory_format: expected SECTION.KEY=VALUE"):
        bench.main(["--ref", "HEAD", "--set", "memory_format", "--workdir", str(tmp_path / "w2")])


def test_step_pair_refuses_what_is_not_a_commit(tmp_path):
    bench = _load("step_pair")
    with pytest.raises(SystemExit, match="--ref no-such-rev: not a commit"):
        bench.main(["--ref", "no-such-rev", "--workdir", str(tmp_path / "w")])


def test_train_step_compile_reports_the_compiling_step_apart(tmp_path):
    bench = _load("train_step")
    out = tmp_path / "steps.json"
    assert bench.main(["--profile", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch", "1",
                       "--threads", "1", "--backends", "torchvision", "--compile", "--json", str(out),
                       "atss-r50-dyh1-LSC-1x"]) == 0
    got = json.loads(out.read_text())
    (r,) = got["results"]
    assert got["compiled"] and r["compiled"]
    assert r["first_step_sec"] > r["sec_per_step"] > 0  # the first step traced and compiled the block


def test_setting_pair_times_a_setting_against_the_profile_in_one_process(tmp_path, capsys):
    bench = _load("setting_pair")
    out = tmp_path / "pair.json"
    assert bench.main(["atss-r50-base-1x", "--profile", "tiny", "--steps", "2", "--warmup", "0", "--set",
                       "runtime.memory_format=channels_last", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["settings"] == {"runtime.memory_format": "channels_last"}
    (row,) = got["rows"]
    assert (row["as_is_layout"], row["with_layout"]) == ("contiguous", "channels_last")
    assert (row["as_is_batch"], row["with_batch"], row["as_is_dtype"], row["with_dtype"]) == (4, 4, "float32", "float32")
    assert math.isclose(row["as_is_over_with"], row["as_is_sec_per_step"] / row["with_sec_per_step"])
    assert math.isclose(row["as_is_over_with_per_image"], row["as_is_over_with"])  # same batch on both sides
    assert 0 <= row["faster_steps"] <= row["steps"] == 2
    assert f"| atss-r50-base-1x | {row['as_is_sec_per_step'] * 1000:.1f} (batch 4) |" in capsys.readouterr().out
    # the batch and the precision are settings like the others: each side runs its own
    assert bench.main(["atss-r50-base-1x", "--profile", "tiny", "--steps", "1", "--warmup", "0", "--set",
                       "solver.batch_size=2", "--set", "runtime.precision=bf16", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["as_is_batch"], row["with_batch"], row["as_is_dtype"], row["with_dtype"]) == (4, 2, "float32", "bfloat16")
    assert math.isclose(row["as_is_over_with_per_image"], row["as_is_over_with"] * 2 / 4)
    with pytest.raises(SystemExit, match="runtime.precision: 'fp8' is not one of fp32, bf16, fp16"):
        bench.main(["atss-r50-base-1x", "--profile", "tiny", "--steps", "1", "--set", "runtime.precision=fp8"])
    with pytest.raises(SystemExit, match="--set nosuch.key: profile tiny has no 'nosuch' there"):
        bench.main(["atss-r50-base-1x", "--profile", "tiny", "--steps", "1", "--set", "nosuch.key=1"])


def test_head_parts_times_each_attention_switched_off(tmp_path, capsys):
    bench = _load("head_parts")
    out = tmp_path / "parts.json"
    assert bench.main(["--blocks", "1", "--channels", "8", "--gn-groups", "4", "--sizes", "4,2", "--batch", "2",
                       "--steps", "1", "--warmup", "0", "--dcn-backend", "torchvision", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["ms"]) == {"full", "no_spatial", "no_scale", "no_task", "none"} == set(bench.VARIANTS)
    assert all(v > 0 for v in got["ms"].values()) and got["sizes"] == [4, 2]
    assert f"| none | {got['ms']['none']:.1f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "16,x"])


PIPELINE_LOG = """\
[Fri Dec  4 04:00:00 2026]
localrule synth:
    jobid: 1
[Fri Dec  4 04:00:00 2026]
localrule train:
    jobid: 2
    wildcards: exp=atss-r50-base-1x
    threads: 1
[Fri Dec  4 04:00:10 2026]
Finished jobid: 1 (Rule: synth)
[Fri Dec  4 04:00:30 2026]
Finished jobid: 2 (Rule: train)
[Fri Dec  4 04:00:30 2026]
localrule report:
    jobid: 3
    wildcards: table=table2
    threads: 4
[Fri Dec  4 04:00:40 2026]
Finished jobid: 3 (Rule: report)
"""


def test_pipeline_wall_reads_a_snakemake_log_into_a_timeline_and_idle_core_seconds(tmp_path, capsys):
    pw = _load("pipeline_wall")
    log, out = tmp_path / "snakemake.log", tmp_path / "wall.json"
    log.write_text(PIPELINE_LOG)
    assert pw.main(["--log", str(log), "--cores", "2", "--json", str(out)]) == 0
    run = json.loads(out.read_text())[str(log)]
    # synth 10 s + train 30 s on one core each, report 10 s on 2 of its 4 threads: 60 of 2 x 40 core-s busy
    assert run["span_seconds"] == 40 and run["busy_core_seconds"] == 60 and run["idle_core_seconds"] == 20
    assert run["per_rule"]["train"] == {"jobs": 1, "core_seconds": 30}
    assert [(j["rule"], j["name"], j["threads"]) for j in run["jobs_detail"]] == [
        ("synth", "", 1), ("train", "exp=atss-r50-base-1x", 1), ("report", "table=table2", 4)]
    printed = capsys.readouterr().out
    assert "idle 20.0 core-s on 2 cores" in printed
    assert "train atss-r50-base-1x" in printed and "#" in printed.splitlines()[-1]  # a multi-thread job drawn as #

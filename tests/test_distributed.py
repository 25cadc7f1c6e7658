"""torch.distributed on CPU (gloo): 2 processes give what 1 process gives with the same global batch."""
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from dyhead.engine import distributed
from dyhead.errors import DyheadError
from tests.helpers import dry_run_jobs, dyhead

EXP = "atss-r50-dyh1-LSC-1x"


def test_shards_are_disjoint_and_cover_every_index():
    for n in (0, 1, 7, 8, 25):
        for world in (1, 2, 3, 4):
            shards = [distributed.shard_batches(n, 3, distributed.Dist(rank=r, world_size=world)) for r in range(world)]
            seen = [i for s in shards for b in s for i in b]
            assert sorted(seen) == list(range(n)) and len(seen) == n
            assert all(len(b) <= 3 for s in shards for b in s)


def test_merge_rejects_missing_or_duplicated_images():
    ids = [10, 11, 12, 13]
    dets = [[{"image_id": 12, "score": 1.0}, {"image_id": 10, "score": 0.5}], [{"image_id": 11, "score": 0.2}]]
    merged = distributed.merge_shards(dets, [[10, 12], [11, 13]], ids)
    assert [d["image_id"] for d in merged] == [10, 11, 12]  # in dataset order, as one process writes them
    with pytest.raises(DyheadError, match="1 duplicated"):
        distributed.merge_shards(dets, [[10, 12], [11, 12, 13]], ids)
    with pytest.raises(DyheadError, match="1 missing"):
        distributed.merge_shards(dets, [[10, 12], [11]], ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = distributed.init(torch.device("cpu"))
    mean = distributed.mean_over_ranks({"a": torch.tensor(float(rank + 1)), "b": torch.tensor(2.0 * rank)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = distributed.wrap_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)), ctx,
                                     sync_bn=True)
    ids = list(range(100, 107))
    batches = distributed.shard_batches(len(ids), 2, ctx)
    mine = [ids[i] for b in batches for i in b]
    merged = distributed.gather_predictions([{"image_id": i, "score": 0.1} for i in mine], mine, ids, ctx)
    if ctx.is_main:
        Path(out).write_text(json.dumps({
            "mean": {k: v.item() for k, v in mean.items()}, "ddp": type(net).__name__,
            "bn": type(net.module[1]).__name__, "warned": [str(w.message) for w in caught],
            "merged": [d["image_id"] for d in merged]}))
    else:
        assert merged is None


def test_process_group_helpers_with_two_gloo_ranks(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    assert got["mean"] == {"a": 1.5, "b": 1.0}
    assert got["ddp"] == "DistributedDataParallel"
    assert got["bn"] == "BatchNorm2d" and any("sync_bn needs CUDA" in w for w in got["warned"])
    assert got["merged"] == list(range(100, 107))


def test_single_process_has_no_group():
    ctx = distributed.init(torch.device("cpu")) if "RANK" not in os.environ else pytest.skip("under torchrun")
    model = torch.nn.Linear(2, 2)
    assert not ctx.enabled and ctx.is_main and distributed.wrap_model(model, ctx, sync_bn=True) is model
    assert distributed.mean_over_ranks({"x": torch.tensor(3.0)})["x"].item() == 3.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_bn_is_converted_under_nccl(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    ctx = distributed.init(torch.device("cuda"))
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).cuda()
        net = distributed.wrap_model(model, ctx, sync_bn=True)
        assert isinstance(net.module[1], torch.nn.SyncBatchNorm)
        net(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    finally:
        distributed.shutdown()


def _ddp_profile(root: Path, name: str) -> None:
    """tiny at 12 iterations; frozen BN, so per-rank batches see the statistics the global batch sees."""
    prof = yaml.safe_load((root / "params/profiles/tiny.yaml").read_text())
    prof["solver"].update(schedules={"1x": 12, "2x": 24}, log_period=1, checkpoint_period=4)
    prof["eval"]["batch_size"] = 3  # 8 val images: shards of 2 and 1 batches, the last one short
    for bb in prof["model"]["backbones"].values():
        bb["norm"] = "frozen_bn"
    (root / f"params/profiles/{name}.yaml").write_text(yaml.safe_dump(prof))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(repo_copy, monkeypatch):
    """Same losses, same final weights (float tolerance), same resume, same evaluation; one MLflow run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo_copy / 'mlflow.db'}")
    monkeypatch.delenv("DYHEAD_TRACKING", raising=False)
    root = repo_copy
    dyhead("synth", "--profile", "tiny", cwd=root)
    for name in ("one", "two", "resumed"):
        _ddp_profile(root, name)
    common = ("--dcn-backend", "torchvision")
    dyhead("train", EXP, "--profile", "one", *common, cwd=root)
    dyhead("train", EXP, "--profile", "two", *common, cwd=root, nproc=2)
    dyhead("train", EXP, "--profile", "resumed", "--stop-at", "6", *common, cwd=root, nproc=2)
    resumed = dyhead("train", EXP, "--profile", "resumed", *common, cwd=root, nproc=2)
    assert "resuming from" in resumed.stdout and resumed.stdout.count("resuming from") == 1  # rank 0 logs alone

    one, two, res = (root / "runs" / p / EXP for p in ("one", "two", "resumed"))
    ref = _losses(one)
    for other in (two, res):
        assert len(_losses(other)) == len(ref) == 12
        assert max(abs(a - b) for a, b in zip(ref, _losses(other))) <= 2e-6  # log.jsonl keeps 6 decimals
        w1, w2 = _weights(one), _weights(other)
        delta = max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1)
        print(f"{other.parent.name}: max |dw| = {delta:.3g}")
        assert delta < 1e-5
    assert json.loads((two / "train.json").read_text())["world_size"] == 2

    # distributed evaluation: the same detections, in the same order, and the same metrics
    ckpt = torch.load(one / "model_final.pth", map_location="cpu", weights_only=False)
    ckpt["model"]["head.cls_logits.bias"].fill_(0.0)  # a 12-iteration model scores nothing above 0.05
    torch.save(ckpt, one / "model_final.pth")
    dyhead("evaluate", EXP, "--profile", "one", *common, cwd=root)
    single = json.loads((one / "metrics.json").read_text())
    single_preds = (one / "predictions.json").read_text()
    dyhead("evaluate", EXP, "--profile", "one", *common, cwd=root, nproc=2)
    sharded = json.loads((one / "metrics.json").read_text())
    assert sharded["world_size"] == 2 and sharded["images"] == single["images"] == 8
    assert sharded["detections"] == single["detections"] > 0
    assert sharded["metrics"] == single["metrics"] and single["metrics"]["AP50"] > 0
    assert (one / "predictions.json").read_text() == single_preds

    # rank 0 alone tracked: one MLflow run per training, the resumed one holding each step once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for profile in ("two", "resumed"):
        exp_id = client.get_experiment_by_name(f"dyhead-{profile}").experiment_id
        runs = client.search_runs([exp_id])
        assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 13))


def _slurm_dry_run(root: Path, check: bool = True) -> subprocess.CompletedProcess:
    ann = root / "data/coco/annotations/instances_val2017.json"  # the dry-run only needs the DAG
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "reports/table1.md", "--workflow-profile",
                           "workflow/profiles/slurm", "-n", "--config", "profile=coco"],
                          cwd=root, capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _sbatch(job: dict, root: Path) -> str:
    """The sbatch line the SLURM plugin builds from a dry-run job's resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    res = {k: int(v) if v.isdigit() else v for k, v in job["resources"].items() if "<TBD>" not in v}
    fake = type("Job", (), {"resources": _Resources(res), "threads": 8})()
    params = {"run_uuid": "x", "slurm_logfile": "log", "comment_str": "train", "account": "", "partition": "",
              "workdir": str(root)}
    return get_submit_command(fake, params) + set_gres_string(fake)


def test_slurm_dry_run_shows_8_gpu_jobs_each_running_one_torchrun(repo_copy):
    """The slurm profile on the coco profile: every training asks SLURM for 8 GPUs on one node, runs the
    launcher over them (one torchrun) and waits for the GPU check; the sbatch line the plugin builds."""
    proc = _slurm_dry_run(repo_copy)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    trains = [j for j in jobs if j["rule"] == "train"]
    assert len(trains) == 9  # Table 1: eight rows and the second seed
    for job in trains:
        assert job["resources"]["gpu"] == "8" and job["resources"]["cpus_per_task"] == "64"
        assert job["resources"]["nodes"] == "1" and "mpi" not in job["resources"]
        exp = job["wildcards"].removeprefix("exp=")
        assert job["shell"].startswith(f"dyhead train {exp} --profile coco ")
        assert " --processes 8 " in job["shell"] and "--nnodes" not in job["shell"]
        assert "logs/coco/gpu_check.txt" in job["input"]
    evals = [j for j in jobs if j["rule"] == "evaluate"]
    assert evals and all(j["shell"].startswith("dyhead evaluate ") and " --processes 8 " in j["shell"] for j in evals)
    (check,) = [j for j in jobs if j["rule"] == "gpu_check"]
    assert check["resources"]["gpu"] == "8" and check["shell"].startswith("dyhead gpu-check --expect 8 ")

    # what the plugin submits for such a job: --gpus=8 on one node and no per-GPU task split
    sbatch = _sbatch(trains[0], repo_copy)
    assert "--gpus=8" in sbatch and "--nodes=1" in sbatch and "--cpus-per-task=64" in sbatch
    assert "--mem 256000" in sbatch and "-t 1440" in sbatch and "ntasks" not in sbatch


def _set_train_resources(root: Path, **resources) -> None:
    path = root / "workflow/profiles/slurm/profile.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["set-resources"]["train"].update(resources)
    path.write_text(yaml.safe_dump(profile))


def test_slurm_profile_with_two_nodes_runs_one_training_over_both(repo_copy):
    """`nodes: 2` (gpu 16) in the slurm profile: each training is one SLURM job of 2 nodes, one task per
    node; its shell starts one launcher per node with srun, joined by torchrun's c10d rendezvous on the
    first node under the job's id, 8 ranks each; the GPU check still expects 8 GPUs on a node."""
    _set_train_resources(repo_copy, nodes=2, gpu=16)
    proc = _slurm_dry_run(repo_copy)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    trains = [j for j in jobs if j["rule"] == "train"]
    assert len(trains) == 9
    for job in trains:
        exp = job["wildcards"].removeprefix("exp=")
        assert job["shell"].startswith("srun --nodes 2 --ntasks-per-node 1 --cpus-per-task 64 --gpus-per-node 8 "
                                       f"--kill-on-bad-exit=1 dyhead train {exp} --profile coco ")
        assert job["shell"].endswith(" --processes 8 --nnodes 2 --rdzv-endpoint $(hostname):29500 "
                                     f"--rdzv-id $SLURM_JOB_ID 2>&1 | tee logs/coco/{exp}/train.log")
        assert {k: job["resources"][k] for k in ("nodes", "gpu", "mpi", "tasks")} == \
            {"nodes": "2", "gpu": "16", "mpi": "srun", "tasks": "2"}
    evals = [j for j in jobs if j["rule"] == "evaluate"]
    assert evals and all(" --processes 8" in j["shell"] and "srun" not in j["shell"] for j in evals)
    (check,) = [j for j in jobs if j["rule"] == "gpu_check"]
    assert check["shell"].startswith("dyhead gpu-check --expect 8 ")

    # 2 nodes, one task on each (the plugin's jobstep leaves the srun to the rule), the 16 GPUs
    sbatch = _sbatch(trains[0], repo_copy)
    assert "--nodes=2" in sbatch and "--ntasks=2" in sbatch and "--gpus=16" in sbatch
    assert "--cpus-per-task=64" in sbatch and "ntasks-per-gpu" not in sbatch

    # a GPU count that does not split over the nodes stops Snakemake before any job, in one line
    _set_train_resources(repo_copy, nodes=2, gpu=15)
    proc = _slurm_dry_run(repo_copy, check=False)
    assert proc.returncode != 0
    assert "dyhead: error: set-resources train: nodes 2" in proc.stderr and "here 15" in proc.stderr


class _Resources(dict):
    """The two ways the plugin reads a job's resources: .get(name) and .name."""

    def __getattr__(self, name):
        return self.get(name)

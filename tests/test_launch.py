"""The launcher `dyhead train|evaluate --processes ...`: how many processes, torchrun's options, one-line
errors, and one training over two nodes (two torchrun agents joined by a c10d rendezvous on 127.0.0.1)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyhead.engine import launch
from dyhead.errors import DyheadError
from tests.helpers import dyhead

EXP = "atss-r50-dyh1-LSC-1x"


def test_auto_takes_every_visible_gpu_on_cuda_profiles_one_process_on_cpu(monkeypatch):
    monkeypatch.delenv(launch.PROCESSES_ENV, raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert launch.processes_on_node("auto", "cuda") == 4
    assert launch.processes_on_node("auto", "cpu") == 1
    assert launch.processes_on_node("2", "cpu") == 2
    with pytest.raises(DyheadError, match=r"--processes 8: this machine shows 4 GPU\(s\)"):
        launch.processes_on_node("8", "cuda")
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    assert launch.processes_on_node("auto", "cuda") == 1  # runtime.start then says no CUDA device is visible

    monkeypatch.setenv(launch.PROCESSES_ENV, "2")  # what the DVC test uses for 2 gloo processes on CPU
    assert launch.processes_on_node("auto", "cpu") == 2
    assert launch.processes_on_node("3", "cpu") == 3  # an explicit count wins
    with pytest.raises(DyheadError, match=r"DYHEAD_PROCESSES=2: this machine shows 0 GPU\(s\)"):
        launch.processes_on_node("auto", "cuda")
    monkeypatch.setenv(launch.PROCESSES_ENV, "two")
    with pytest.raises(DyheadError, match="DYHEAD_PROCESSES='two': must be a whole number"):
        launch.processes_on_node("auto", "cpu")


def test_torchrun_gets_a_standalone_rendezvous_on_one_node_and_c10d_across_nodes():
    one = launch.Launch(nproc=8)
    assert launch.torchrun_args(one) == ["--standalone", "--nnodes", "1", "--nproc-per-node", "8"]
    two = launch.plan("3", "cpu", nnodes=2, rdzv_endpoint="node001:29500", rdzv_id="4242")
    assert two.world_size == 6
    assert launch.torchrun_args(two) == ["--nnodes", "2", "--nproc-per-node", "3", "--rdzv-backend", "c10d",
                                         "--rdzv-endpoint", "node001:29500", "--rdzv-id", "4242"]
    # torchrun's own parser leaves every dyhead argument to the workers (a flag that abbreviates one of its
    # options, such as --nproc for --nproc-per-node, would stop it)
    from torch.distributed.run import get_args_parser

    ours = ["train", EXP, "--processes", "3", "--nnodes", "2", "--rdzv-endpoint", "node001:29500", "--rdzv-id",
            "4242", "--threads", "8", "--dcn-backend", "native", "--stop-at", "5"]
    parsed = get_args_parser().parse_args([*launch.torchrun_args(two), "-m", "dyhead.cli", *ours])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_endpoint) == ("2", "3", "node001:29500")
    assert parsed.module and parsed.training_script == "dyhead.cli" and parsed.training_script_args == ours


def test_more_than_one_process_hands_over_to_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda exe, cmd: calls.append(cmd))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    launch.relaunch(launch.Launch(nproc=1), ["train", EXP])
    assert calls == []  # one process: the stage runs in this one
    launch.relaunch(launch.Launch(nproc=2), ["train", EXP, "--processes", "2"])
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                      "--nproc-per-node", "2", "-m", "dyhead.cli", "train", EXP, "--processes", "2"]]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch.relaunch(launch.Launch(nproc=2), ["train", EXP, "--processes", "2"])
    assert len(calls) == 1  # a torchrun worker runs the stage itself


def test_bad_launches_fail_in_one_line_before_any_process_starts(repo_copy):
    proc = dyhead("train", EXP, "--profile", "tiny", "--processes", "3", cwd=repo_copy, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "dyhead: error: params/profiles/tiny.yaml: solver.batch_size 4 does not split over 3 processes "
        "(1 node(s) x 3); it is the global batch, each process takes an equal share"]
    proc = dyhead("train", EXP, "--profile", "tiny", "--nnodes", "2", cwd=repo_copy, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "dyhead: error: --nnodes 2: --rdzv-endpoint must be HOST:PORT on the first node, got None")
    proc = dyhead("evaluate", EXP, "--profile", "tiny", "--processes", "0", cwd=repo_copy, check=False)
    assert proc.returncode == 2 and "argument --processes: must be auto or a whole number >= 1, got '0'" in proc.stderr
    assert not (repo_copy / "runs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict:
    return torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_two_agents_over_a_c10d_rendezvous_match_one_agent_with_two_processes(repo_copy, monkeypatch):
    """What `nodes: 2` in the slurm profile runs, on one CPU machine: two launchers (`--nnodes 2`, one
    process each) meet at a c10d rendezvous on 127.0.0.1 and train one model at the tiny profile's global
    batch; one launcher with `--processes 2` trains the same model at the same batch. Same world size,
    same slices of every batch: the same weights, bit for bit."""
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    root = repo_copy
    dyhead("synth", "--profile", "tiny", cwd=root)
    tiny = (root / "params/profiles/tiny.yaml").read_text()
    for name in ("one-agent", "two-agents"):  # the same settings under two run directories
        (root / f"params/profiles/{name}.yaml").write_text(tiny)
    common = ("--dcn-backend", "torchvision")

    single = dyhead("train", EXP, "--profile", "one-agent", "--processes", "2", *common, cwd=root)
    assert "--standalone --nnodes 1 --nproc-per-node 2" in single.stdout

    port = _free_port()
    agent = [sys.executable, "-m", "dyhead.cli", "train", EXP, "--profile", "two-agents", "--processes", "1",
             "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test-job", *common]
    agents = [subprocess.Popen(agent, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert all("--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in o for o in outputs)

    one, two = (root / "runs" / p / EXP for p in ("one-agent", "two-agents"))
    for run in (one, two):
        summary = json.loads((run / "train.json").read_text())
        assert summary["world_size"] == 2 and summary["iterations"] == 4
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

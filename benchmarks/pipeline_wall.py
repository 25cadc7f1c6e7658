"""The README's main command from a clean state, timed: wall time, a per-job timeline and the idle core-seconds.

    python benchmarks/pipeline_wall.py                       # a fresh clone of HEAD in a temp dir, then
                                                             # `snakemake --cores all reports/table2.md` there
    python benchmarks/pipeline_wall.py --rev eb9e750 --rev HEAD   # two revisions one after the other
    python benchmarks/pipeline_wall.py --log path/to/snakemake.log  # analyse a finished run's log only

A clone per revision starts from nothing (no data, no extension, no runs), as a new user's checkout does, and
uses this Python environment (the clone's sources first on PYTHONPATH). The timeline comes from Snakemake's
own log: each job's start and finish time stamps (1 s resolution) and its threads. Idle core-seconds =
cores x wall - the sum over jobs of duration x threads: what a perfect packing of the same jobs would save.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dyhead.files import save_json  # noqa: E402  (the result JSON is written whole or not at all)

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")


@dataclass
class Job:
    jobid: int
    rule: str
    name: str  # the wildcards, e.g. exp=atss-r50-base-1x
    threads: int
    start: float
    end: float | None = None

    @property
    def seconds(self) -> float:
        return (self.end or self.start) - self.start


def parse_log(text: str) -> list[Job]:
    """The jobs of one Snakemake run, from its log (stdout + stderr)."""
    jobs: dict[int, Job] = {}
    stamp, current, rule = None, None, None
    for line in text.splitlines():
        s = line.strip()
        m = STAMP.match(s)
        if m:
            stamp, current, rule = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp(), None, None
            continue
        m = START.match(s)
        if m and stamp is not None:
            rule = m.group(1)
            continue
        if rule is not None and s.startswith("jobid:"):
            current = Job(int(s.split(":")[1]), rule, "", 1, stamp)
            jobs[current.jobid] = current
        elif current is not None and s.startswith("wildcards:"):
            current.name = s.split(":", 1)[1].strip()
        elif current is not None and s.startswith("threads:"):
            current.threads = int(s.split(":")[1])
        m = re.match(r"^Finished jobid: (\d+)", s)
        if m and stamp is not None and int(m.group(1)) in jobs:
            jobs[int(m.group(1))].end = stamp
    return sorted(jobs.values(), key=lambda j: (j.start, j.jobid))


def summarise(jobs: list[Job], cores: int, wall: float | None = None) -> dict:
    if not jobs:
        return {"jobs": 0}
    t0 = min(j.start for j in jobs)
    t1 = max(j.end or j.start for j in jobs)
    span = wall if wall is not None else t1 - t0
    busy = sum(j.seconds * min(j.threads, cores) for j in jobs)
    per_rule = defaultdict(lambda: [0, 0.0])
    for j in jobs:
        per_rule[j.rule][0] += 1
        per_rule[j.rule][1] += j.seconds * min(j.threads, cores)
    return {"jobs": len(jobs), "span_seconds": round(t1 - t0, 1), "wall_seconds": round(span, 1), "cores": cores,
            "busy_core_seconds": round(busy, 1), "idle_core_seconds": round(cores * (t1 - t0) - busy, 1),
            "per_rule": {r: {"jobs": n, "core_seconds": round(s, 1)} for r, (n, s) in sorted(per_rule.items())}}


def timeline(jobs: list[Job], width: int = 60) -> str:
    """One line per job: a bar over the run's span (1 character = span / width)."""
    t0 = min(j.start for j in jobs)
    span = max((j.end or j.start) for j in jobs) - t0 or 1.0
    lines = []
    for j in jobs:
        a = int((j.start - t0) / span * width)
        b = max(a + 1, int(((j.end or j.start) - t0) / span * width))
        bar = " " * a + ("#" if j.threads > 1 else "=") * (b - a)
        lines.append(f"{j.rule:>12} {j.name.replace('exp=', '')[:28]:28} {int(j.start - t0):5d}s {int(j.seconds):5d}s "
                     f"t{j.threads} |{bar:<{width}}|")
    return "\n".join(lines)


def run_clean(rev: str, cores: str, target: str) -> tuple[str, float]:
    """A fresh clone at `rev`, then the main command there; returns its log and wall seconds."""
    work = Path(tempfile.mkdtemp(prefix="dyhead-wall-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(work / "repo")], check=True)
    subprocess.run(["git", "-C", str(work / "repo"), "checkout", "-q", rev], check=True)
    env = {**os.environ, "PYTHONPATH": str(work / "repo"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("DYHEAD_EXT_DIR", None)
    print(f"[{rev}] snakemake --cores {cores} {target} in {work / 'repo'}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", cores, target], cwd=work / "repo",
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (work / "snakemake.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"[{rev}] snakemake failed (rc {proc.returncode}); log: {work / 'snakemake.log'}")
    print(f"[{rev}] done in {wall:.0f} s; log: {work / 'snakemake.log'}; table: {work / 'repo' / target}", flush=True)
    return proc.stdout + proc.stderr, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", action="append", help="git revision(s) to run from a fresh clone (default: HEAD)")
    p.add_argument("--log", type=Path, help="analyse this Snakemake log instead of running")
    p.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    p.add_argument("--target", default="reports/table2.md")
    p.add_argument("--json", type=Path, help="write the summaries here")
    args = p.parse_args(argv)
    cores = os.cpu_count() if args.cores == "all" else int(args.cores)
    results = {}
    if args.log:
        runs = {str(args.log): (args.log.read_text(), None)}
    else:
        runs = {rev: run_clean(rev, args.cores, args.target) for rev in (args.rev or ["HEAD"])}
    for name, (text, wall) in runs.items():
        jobs = parse_log(text)
        s = summarise(jobs, cores, wall)
        results[name] = {**s, "jobs_detail": [asdict(j) for j in jobs]}
        print(f"\n== {name}: wall {s.get('wall_seconds')} s, {s['jobs']} jobs, busy {s.get('busy_core_seconds')} "
              f"core-s, idle {s.get('idle_core_seconds')} core-s on {cores} cores")
        for rule, r in s.get("per_rule", {}).items():
            print(f"   {rule:>12}: {r['jobs']:3d} jobs, {r['core_seconds']:8.1f} core-s")
        if jobs:
            print(timeline(jobs))
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        print(f"\nwall {b} / {a}: {rb['wall_seconds'] / ra['wall_seconds']:.2f}")
    if args.json:
        save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

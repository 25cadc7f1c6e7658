# The DAG: data (synth | fetch) -> build-ext -> train -> evaluate -> flops -> reports/tableN.md
# (and reports/<control>.md for the controls of ours in params/tables.yaml, e.g. coupling; and
# reports/grid_<name>.md for the grids of params/grids.yaml, targets of their own, not in `all`).
# Which experiments exist and which table rows they feed is defined once, in params/.
#   snakemake --cores all reports/table2.md                 # embedded default profile: mini
#   snakemake --cores all reports/table2.md --config profile=coco
#   snakemake --cores all reports/grid_quick.md             # the five detectors, baseline vs 2 blocks
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.19")


validate(config, "workflow/schemas/config.schema.yaml")
# The extension is built into, and loaded from, this workflow's build/ext by every job.
os.environ.setdefault("DYHEAD_EXT_DIR", str(Path("build/ext").resolve()))
# Compiled graphs (runtime.compile) are cached here and shared by every job whose shapes match.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path("build/inductor").resolve()))
# Jobs call `dyhead`: find the one installed next to this Python even if the venv is not activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/coco.smk"
include: "workflow/rules/build.smk"
include: "workflow/rules/gpu.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tta.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/figures.smk"


# Snakemake's own HTML report (`snakemake --report reports/report.html`): this page first, then every table
# and figure marked with report() in the rules
report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        [f"reports/{table}.md" for table in MATRIX.default_tables],
        rules.figures.input,

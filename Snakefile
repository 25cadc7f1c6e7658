# The DAG: data (synth | fetch) -> build-ext -> train -> evaluate -> flops -> reports/tableN.md.
# Which experiments exist and which table rows they feed is defined once, in params/.
#   snakemake --cores all reports/table2.md                 # embedded default profile: mini
#   snakemake --cores all --config profile=coco reports/table2.md
from snakemake.utils import min_version, validate

min_version("9.19")


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/build.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        [f"reports/{table}.md" for table in MATRIX.tables],

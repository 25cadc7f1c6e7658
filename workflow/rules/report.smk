def report_inputs(wildcards):
    """The run files a table (or grid_<name>) reads: metrics and train.json of every experiment, flops.json
    where it prints GFLOPs (every grid does), metrics_tta.json of its TTA rows."""
    name = wildcards.table
    files = table_runs(name, "metrics.json") + table_runs(name, "train.json")
    if name not in MATRIX.tables or MATRIX.tables[name].get("flops"):
        files += table_runs(name, "flops.json")
    if name in MATRIX.tables:
        files += tta_inputs(name)  # rows reporting test-time augmentation (tta.smk)
    return files


# Every report also rewrites reports/results.csv (every run of the profile, one row each): not declared,
# since several jobs write it and Snakemake gives each file one rule.
rule report:
    input:
        report_inputs,
    output:
        md="reports/{table}.md",
        csv="reports/{table}.csv",
        html=report("reports/{table}.html", caption="../report/table.rst", category="{table}"),
    params:
        profile=PROFILE,
        seeds=SEEDS_FLAG,
    shell:
        "dyhead report {wildcards.table} --profile {params.profile}{params.seeds} --out {output.md}"

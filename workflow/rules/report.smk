def report_inputs(wildcards):
    table = MATRIX.tables[wildcards.table]
    files = table_runs(wildcards.table, "metrics.json") + table_runs(wildcards.table, "train.json")
    if table.get("flops"):
        files += table_runs(wildcards.table, "flops.json")
    files += tta_inputs(wildcards.table)  # rows reporting test-time augmentation (tta.smk)
    return files


rule report:
    input:
        report_inputs,
    output:
        "reports/{table}.md",
    params:
        profile=PROFILE,
    shell:
        "dyhead report {wildcards.table} --profile {params.profile} --out {output}"

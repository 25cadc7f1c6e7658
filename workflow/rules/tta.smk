# Test-time augmentation (the profile's `tta` scales and flips): `dyhead evaluate --tta`.
# Under more than one process the images are sharded over the ranks like plain evaluation.
rule evaluate_tta:
    input:
        data=data_ready(),
        model=f"{RUNS}/{{exp}}/model_final.pth",
    output:
        metrics=f"{RUNS}/{{exp}}/metrics_tta.json",
        predictions=f"{RUNS}/{{exp}}/predictions_tta.json",
    log:
        f"logs/{PROFILE}/{{exp}}/evaluate_tta.log",
    params:
        profile=PROFILE,
        launch=launch_flags,
    threads: PROFILE_CFG["runtime"]["threads"]
    resources:
        gpu=0,
    shell:
        "dyhead evaluate {wildcards.exp} --profile {params.profile} --tta --threads {threads} {params.launch} "
        "2>&1 | tee {log}"


def tta_inputs(table):
    """metrics_tta.json of the rows that report TTA numbers (Table 5's multi-scale testing row)."""
    return [f"{RUNS}/{row['experiment']}/metrics_tta.json" for row in MATRIX.tables[table]["rows"] if row.get("tta")]

# Figures (dyhead figure ...; matplotlib PNGs in reports/figures/), each marked for Snakemake's own HTML report:
#   snakemake --cores all                                 # tables and figures
#   snakemake --report reports/report.html               # every table and figure of what was run, one file
# Model figures are drawn for the tables' 6-block ATSS DyHead (Matrix.figure_experiments), curves and gains
# for every table with baselines (Matrix.figure_tables).
FIGURE_EXPS = MATRIX.figure_experiments()
FIGURE_TABLES = MATRIX.figure_tables()


rule fig3:
    input:
        data=data_ready(),
        model=f"{RUNS}/{{exp}}/model_final.pth",
    output:
        report("reports/figures/fig3_{exp}.png", caption="../report/fig3.rst", category="Figures",
               subcategory="{exp}"),
    params:
        profile=PROFILE,
    shell:
        "dyhead figure fig3 {wildcards.exp} --profile {params.profile}"


rule fig4:
    input:
        data=data_ready(),
        model=f"{RUNS}/{{exp}}/model_final.pth",
    output:
        report("reports/figures/fig4_{exp}.png", caption="../report/fig4.rst", category="Figures",
               subcategory="{exp}"),
    params:
        profile=PROFILE,
    shell:
        "dyhead figure fig4 {wildcards.exp} --profile {params.profile}"


rule detections:
    input:
        data=data_ready(),
        predictions=f"{RUNS}/{{exp}}/predictions.json",
    output:
        figure=report("reports/figures/detections_{exp}.png", caption="../report/detections.rst",
                      category="Figures", subcategory="{exp}"),
        perclass=report("reports/perclass_{exp}.html", caption="../report/perclass.rst", category="Figures",
                        subcategory="{exp}"),
    params:
        profile=PROFILE,
    shell:
        "dyhead figure detections {wildcards.exp} --profile {params.profile}"


rule curves:
    input:
        report_inputs,  # the table's runs (report.smk); log.jsonl is written beside each train.json
    output:
        report("reports/figures/curves_{table}.png", caption="../report/curves.rst", category="{table}"),
    params:
        profile=PROFILE,
    shell:
        "dyhead figure curves {wildcards.table} --profile {params.profile}"


rule gains:
    input:
        report_inputs,
    output:
        report("reports/figures/gains_{table}.png", caption="../report/gains.rst", category="{table}"),
    params:
        profile=PROFILE,
        seeds=SEEDS_FLAG,
    shell:
        "dyhead figure gains {wildcards.table} --profile {params.profile}{params.seeds}"


rule figures:
    input:
        [f"reports/figures/{name}_{exp}.png" for exp in FIGURE_EXPS for name in ("fig3", "fig4", "detections")],
        [f"reports/figures/{name}_{table}.png" for table in FIGURE_TABLES for name in ("curves", "gains")],


# The convergence control (params/tables.yaml `convergence`, on demand): `snakemake convergence` trains the
# long runs (6x on mini) and Table 3's pairs, then writes reports/convergence.md and this figure.
rule convergence_figure:
    input:
        table_runs("convergence", "train.json"),
        table_runs("table3", "train.json"),
    output:
        report("reports/figures/convergence.png", caption="../report/convergence.rst", category="convergence"),
    params:
        profile=PROFILE,
    shell:
        "dyhead figure convergence convergence --profile {params.profile}"


rule convergence:
    input:
        "reports/convergence.md",
        "reports/figures/convergence.png",

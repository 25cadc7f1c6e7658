rule train:
    input:
        data=data_ready(),
        ext="build/ext/manifest.json",
        weights=backbone_weights,  # ImageNet file or pretrained stand-in, if the backbone starts from one (coco.smk)
        gpus=gpu_checked,  # the GPU check, when trainings ask for GPUs (gpu.smk)
    output:
        model=f"{RUNS}/{{exp}}/model_final.pth",
        summary=f"{RUNS}/{{exp}}/train.json",
    log:
        f"logs/{PROFILE}/{{exp}}/train.log",
    params:
        profile=PROFILE,
        launch=launch_flags,
        srun=srun_nodes,
    threads: PROFILE_CFG["runtime"]["threads"]
    priority: train_priority  # the longest trainings start first (common.smk)
    resources:
        mem_mb=4000,
        gpu=0,  # the slurm profile sets 8: one torchrun over them (nodes: N, one over N nodes)
        **multinode("train"),
    shell:
        "{params.srun}dyhead train {wildcards.exp} --profile {params.profile} --threads {threads} {params.launch} "
        "2>&1 | tee {log}"


rule evaluate:
    input:
        data=data_ready(),
        model=f"{RUNS}/{{exp}}/model_final.pth",
    output:
        metrics=f"{RUNS}/{{exp}}/metrics.json",
        predictions=f"{RUNS}/{{exp}}/predictions.json",
    log:
        f"logs/{PROFILE}/{{exp}}/evaluate.log",
    params:
        profile=PROFILE,
        launch=launch_flags,
    threads: PROFILE_CFG["runtime"]["threads"]
    priority: PRIORITY["evaluate"]
    resources:
        gpu=0,  # the slurm profile sets 8: the val set sharded over them
    shell:
        "dyhead evaluate {wildcards.exp} --profile {params.profile} --threads {threads} {params.launch} "
        "2>&1 | tee {log}"


rule flops:
    output:
        f"{RUNS}/{{exp}}/flops.json",
    priority: PRIORITY["flops"]
    log:
        f"logs/{PROFILE}/{{exp}}/flops.log",
    params:
        profile=PROFILE,
    shell:
        "dyhead flops {wildcards.exp} --profile {params.profile} 2>&1 | tee {log}"

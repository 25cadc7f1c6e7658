# The GPU check: where trainings ask for GPUs (the slurm profile sets train: gpu=8), every training
# waits for one short job that proves a node hands a job the GPUs it asks for, before a sweep of
# 8-GPU trainings queues for hours on a partition or gres setting that gives them fewer.


def requested_gpus(rule):
    """The GPUs per node --set-resources gives `rule` (the slurm profile: 8); 0 when none is set."""
    return profile_resource(rule, "gpu") // max(1, profile_resource(rule, "nodes", 1))


def gpu_checked(wildcards):
    return [f"logs/{PROFILE}/gpu_check.txt"] if requested_gpus("train") else []


rule gpu_check:
    output:
        f"logs/{PROFILE}/gpu_check.txt",
    log:
        f"logs/{PROFILE}/gpu_check.log",
    resources:
        gpu=requested_gpus("train"),
        runtime=5,
    shell:
        "dyhead gpu-check --expect {resources.gpu} --out {output} 2>&1 | tee {log}"

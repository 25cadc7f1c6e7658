if DATA["source"] in ("synthetic", "cocolike"):  # both made by `dyhead synth`

    rule synth:
        output:
            f"{DATA['root']}/synth.json",
        priority: PRIORITY["inputs"]
        log:
            f"logs/{PROFILE}/synth.log",
        params:
            profile=PROFILE,
        shell:
            "dyhead synth --profile {params.profile} 2>&1 | tee {log}"


# The ImageNet stand-in: backbones a profile marks `weights: pretrained` start from a classifier of
# object crops of its training split (`dyhead pretrain`); backbone_weights (coco.smk) points the
# training at the file.
if "pretrain" in PROFILE_CFG:

    rule pretrain:
        input:
            data=data_ready(),
            ext="build/ext/manifest.json",  # the DCN stand-ins' deformable convs
        output:
            weights=pretrained_path(PROFILE, "{backbone}"),
            summary=pretrained_path(PROFILE, "{backbone}").removesuffix(".pth") + ".json",
        wildcard_constraints:
            backbone="|".join(PROFILE_CFG["model"]["backbones"]),
        log:
            f"logs/{PROFILE}/pretrain/{{backbone}}.log",
        params:
            profile=PROFILE,
        threads: PROFILE_CFG["runtime"]["threads"]
        priority: PRIORITY["inputs"]
        shell:
            "dyhead pretrain {wildcards.backbone} --profile {params.profile} --threads {threads} 2>&1 | tee {log}"

# Paper-scale inputs: COCO 2017 (coco profile) and the ImageNet weights any profile's backbones load.
# Only the small files are declared outputs: Snakemake deletes a job's outputs before re-running it
# and after a failure, which must never happen to 26 GB of images. The fetch itself skips what is
# in place (fetch.json, per-archive markers under .fetch/).
import re
import shlex

from dyhead.modeling.pretrained import IMAGENET, STANDIN_SUFFIX, arch_of_file, arch_of_standin


def _flags(**options):
    """' --name value' for each option set in the Snakemake config (none by default), each value quoted for the
    shell: a path with a space stays one argument and a ';' starts no second command."""
    return "".join(f" --{name.replace('_', '-')} {shlex.quote(str(value))}" for name, value in options.items() if value)


if DATA["source"] == "coco":

    rule fetch_coco:
        output:
            *[DATA[k] for k in ("train_annotations", "val_annotations", "test_annotations") if k in DATA],
            marker=f"{DATA['root']}/fetch.json",
        log:
            f"logs/{PROFILE}/fetch_coco.log",
        params:
            profile=PROFILE,
            extra=_flags(mirror=config.get("coco_mirror"), from_dir=config.get("coco_from_dir")),
        resources:
            downloads=1,
        shell:
            "(dyhead fetch-coco --profile {params.profile}{params.extra}"
            " && dyhead check-data --profile {params.profile}) 2>&1 | tee {log}"

    rule testdev:
        # Not needed by the tables (ours are on val2017); the upload file for the COCO server.
        input:
            data=rules.fetch_coco.output.marker,
            model=f"{RUNS}/{{exp}}/model_final.pth",
        output:
            f"{RUNS}/{{exp}}/detections_test-dev2017_{{exp}}{{tta,(-tta)?}}_results.zip",
        log:
            f"logs/{PROFILE}/{{exp}}/testdev{{tta}}.log",
        params:
            profile=PROFILE,
            flag=lambda w: " --tta" if w.tta else "",
            launch=launch_flags,
        threads: PROFILE_CFG["runtime"]["threads"]
        resources:
            gpu=0,
        shell:
            "dyhead evaluate {wildcards.exp} --profile {params.profile} --split test-dev{params.flag} "
            "--threads {threads} {params.launch} 2>&1 | tee {log}"


def backbone_weights(wildcards):
    """The file the experiment's backbone starts from under this profile: an ImageNet file (fetch_weights),
    the pretrained stand-in (pretrain, data.smk) or none."""
    backbone = MATRIX.experiments[wildcards.exp]["backbone"]
    if backbone not in PROFILE_CFG["model"]["backbones"]:
        return []
    path = weights_file(PROFILE, PROFILE_CFG, backbone)
    return [path] if path else []


rule fetch_weights:
    output:
        "{directory}/{file}",
    wildcard_constraints:
        file="|".join(r.name for r in IMAGENET.values()),
    log:
        "logs/fetch_weights/{directory}/{file}.log",
    params:
        arch=lambda w: arch_of_file(w.file),
        extra=_flags(from_dir=config.get("weights_from_dir")),
    resources:
        downloads=1,
    shell:
        "dyhead fetch-weights {params.arch} --dir {wildcards.directory}{params.extra} 2>&1 | tee {log}"


# Random-init torchvision backbones saved under the names a profile loads (cocolike: the coco path's
# weight loading without a download); the names say they are not ImageNet weights.
rule standin_weights:
    output:
        "{directory}/{file}",
    wildcard_constraints:
        file=r"[^/]+" + re.escape(STANDIN_SUFFIX),
    log:
        "logs/standin_weights/{directory}/{file}.log",
    params:
        arch=lambda w: arch_of_standin(w.file),
    priority: PRIORITY["inputs"]
    shell:
        "dyhead standin-weights {params.arch} --dir {wildcards.directory} 2>&1 | tee {log}"

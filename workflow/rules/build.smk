# The native deformable-conv op; every training depends on it. CUDA kernels are compiled only for
# profiles that run on CUDA. Where the build fails (no compiler), the manifest records that and
# trainings fall back to torchvision's op (dcn_backend: auto).
rule build_ext:
    output:
        "build/ext/manifest.json",
    priority: PRIORITY["inputs"]
    log:
        "logs/build_ext.log",
    params:
        cuda="off" if PROFILE_CFG["runtime"]["device"] == "cpu" else "auto",
    shell:
        "dyhead build-ext --build-dir build/ext --cuda {params.cuda} --allow-fallback 2>&1 | tee {log}"

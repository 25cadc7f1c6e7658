# The native deformable-conv op; every training depends on it. Where no compiler is available the
# manifest records that, and trainings fall back to torchvision's op (dcn_backend: auto).
rule build_ext:
    output:
        "build/ext/manifest.json",
    log:
        "logs/build_ext.log",
    shell:
        "dyhead build-ext --allow-fallback 2>&1 | tee {log}"

if DATA["source"] == "synthetic":

    rule synth:
        output:
            f"{DATA['root']}/synth.json",
        log:
            f"logs/{PROFILE}/synth.log",
        params:
            profile=PROFILE,
        shell:
            "dyhead synth --profile {params.profile} 2>&1 | tee {log}"

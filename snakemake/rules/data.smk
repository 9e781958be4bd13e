# Structures -> dataset -> splits.


rule fetch:
    output:
        FETCHED,
    params:
        args=fetch_args,
        cache=CACHE,
    log:
        f"{LOGS}/fetch.log",
    shell:
        "foldtune fetch {params.args} --cache {params.cache} --out {output} > {log} 2>&1"


rule prepare:
    input:
        FETCHED,
    output:
        MANIFEST,
    params:
        args=prepare_args,
        dataset=DATASET,
    log:
        f"{LOGS}/prepare.log",
    shell:
        "foldtune prepare --in {input} --out {params.dataset} {params.args} --no-progress > {log} 2>&1"


rule split:
    input:
        MANIFEST,
    output:
        SPLITS,
    params:
        args=split_args,
        dataset=DATASET,
    log:
        f"{LOGS}/split.log",
    shell:
        "foldtune split --dataset {params.dataset} --out {output} {params.args} --no-progress > {log} 2>&1"

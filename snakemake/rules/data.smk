# Structures -> dataset -> splits.


# The files a step reads (ids file, query, chains file) are its inputs, and their contents a param: editing
# one reruns the step and what follows.
rule fetch:
    input:
        unpack(fetch_inputs),
    output:
        FETCHED,
    params:
        args=fetch_args,
        digest=fetch_digest,
        cache=CACHE,
        out=parent_of_output,
    log:
        f"{LOGS}/fetch.log",
    conda:
        "../envs/foldtune.yaml"
    shell:
        "foldtune fetch {params.args} --cache {params.cache} --out {params.out} --no-progress > {log} 2>&1"


rule prepare:
    input:
        unpack(prepare_inputs),
    output:
        MANIFEST,
    params:
        args=prepare_args,
        digest=prepare_digest,
        dataset=parent_of_output,
    log:
        f"{LOGS}/prepare.log",
    conda:
        "../envs/foldtune.yaml"
    # Exactly the files this fetch delivered: structures/ may still hold an earlier fetch's files.
    shell:
        "foldtune prepare --fetch-report {input.fetched} --out {params.dataset} {params.args} --no-progress "
        "> {log} 2>&1"


rule split:
    input:
        manifest=MANIFEST,
    output:
        SPLITS,
    params:
        args=split_args,
        dataset=dataset_dir,
    log:
        f"{LOGS}/split.log",
    conda:
        "../envs/foldtune.yaml"
    shell:
        "foldtune split --dataset {params.dataset} --out {output} {params.args} --no-progress > {log} 2>&1"

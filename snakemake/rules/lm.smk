# Language models (training.kind: lm): the contact precision of every run (the untuned base `none` included)
# on every evaluated split, from ESM-2's contact head (`foldtune contacts`; needs the release's
# <name>-contact-regression.pt next to model.esm2). The report reads contacts/<run>/<split>.csv.


rule contacts:
    input:
        run=f"{EXP}/runs/{{run}}/summary.json",
        manifest=MANIFEST,
        splits=SPLITS,
    output:
        table=f"{EXP}/contacts/{{run}}/{{split}}.csv",
        summary=f"{EXP}/contacts/{{run}}/{{split}}.json",
    params:
        run=run_dir,
        dataset=dataset_dir,
    log:
        f"{LOGS}/contacts/{{run}}_{{split}}.log",
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/foldtune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} foldtune contacts --run {params.run} --dataset {params.dataset} "
        "--splits {input.splits} --split {wildcards.split} --out {output.table} --no-progress > {log} 2>&1"

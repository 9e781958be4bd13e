# Model jobs: the optional base model trained from scratch, then one fine-tuning run per grid point.
# `resources: gpu=1` marks them for the scheduler (cap with `--resources gpu=N` locally, GPUs per job on SLURM);
# Snakemake does not assign device ids, so on a multi-GPU workstation set CUDA_VISIBLE_DEVICES yourself.


rule base:
    input:
        manifest=MANIFEST,
        splits=SPLITS,
    output:
        f"{BASE_RUN}/summary.json",
    params:
        config=RESOLVED_CONFIG,
        overrides=base_overrides,
        digest=base_digest,
    log:
        f"{LOGS}/train/base.log",
    # The base is the critical path: start it before the quick side jobs (baselines, scoring).
    priority: 20
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/foldtune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} foldtune train --config {params.config} --section base_training "
        "{params.overrides} trainer.threads={threads} > {log} 2>&1"


rule train:
    input:
        unpack(train_inputs),
    output:
        f"{EXP}/runs/{{run}}/summary.json",
    params:
        config=RESOLVED_CONFIG,
        overrides=train_overrides,
        digest=train_digest,
    log:
        f"{LOGS}/train/{{run}}.log",
    priority: 10
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/foldtune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} foldtune train --config {params.config} --section training "
        "{params.overrides} trainer.threads={threads} > {log} 2>&1"

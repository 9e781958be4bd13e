# Model jobs: the optional base model trained from scratch, then one fine-tuning run per grid point.
# `resources: gpu=N` marks them for the scheduler (cap with `--resources gpu=N` locally; on SLURM the plugin
# asks for N GPUs): N = the section's `trainer.devices` when it is a count (DDP processes, started by Lightning
# inside the one job), else 1. Snakemake does not assign device ids, so on a multi-GPU workstation set
# CUDA_VISIBLE_DEVICES yourself.
#
# Reruns: `foldtune train --rerun` resumes the run directory's last.ckpt when the run was started with the same
# config and inputs (a killed job, a SLURM retry) and otherwise moves the old run aside to
# runs/<name>.replaced/<time>/ and starts clean. `--deadline auto` stops a job, checkpointed, shortly before
# its SLURM time limit (exit 4, no summary.json), so the profile's `retries` resubmit it and it resumes.


# Without a base_training section, or with a shipped base (`base_run`), there is no base job.
if TRAINS_BASE:

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
            rank_threads=rank_threads,
        log:
            f"{LOGS}/train/base.log",
        # The base is the critical path: start it before the quick side jobs (baselines, scoring).
        priority: 20
        threads: 1
        resources:
            gpu=model_gpus("base_training"),
            mem_mb=8000,
            runtime=240,
        conda:
            "../envs/foldtune.yaml"
        shell:
            "OMP_NUM_THREADS={params.rank_threads} foldtune train --config {params.config} --section base_training "
            "--rerun --deadline auto {params.overrides} trainer.threads={params.rank_threads} > {log} 2>&1"


rule train:
    input:
        unpack(train_inputs),
    output:
        f"{EXP}/runs/{{run}}/summary.json",
    params:
        config=RESOLVED_CONFIG,
        overrides=train_overrides,
        digest=train_digest,
        rank_threads=rank_threads,
    log:
        f"{LOGS}/train/{{run}}.log",
    priority: 10
    threads: 1
    resources:
        gpu=model_gpus("training"),
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/foldtune.yaml"
    shell:
        "OMP_NUM_THREADS={params.rank_threads} foldtune train --config {params.config} --section training "
        "--rerun --deadline auto {params.overrides} trainer.threads={params.rank_threads} > {log} 2>&1"

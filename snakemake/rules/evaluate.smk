# Predict every evaluated split with every run (the untuned base included) and with the baselines; score them.


# evaluate.batch_runs: one job per group of runs and split folds the split with every run of the group (see
# the schema; a group's predictions start as soon as its runs are trained); else one job per run and split.
if not config["evaluate"]["batch_runs"]:

    rule predict:
        input:
            run=f"{EXP}/runs/{{run}}/summary.json",
            manifest=MANIFEST,
            splits=SPLITS,
        output:
            f"{EXP}/predictions/{{run}}/{{split}}/predictions.csv",
        params:
            run=run_dir,
            dataset=dataset_dir,
            out=parent_of_output,
            args=predict_args,
            digest=predict_digest,
        log:
            f"{LOGS}/predict/{{run}}_{{split}}.log",
        threads: 1
        resources:
            gpu=1,
            mem_mb=8000,
            runtime=60,
        conda:
            "../envs/foldtune.yaml"
        shell:
            "OMP_NUM_THREADS={threads} foldtune predict --run {params.run} --dataset {params.dataset} "
            "--splits {input.splits} --split {wildcards.split} --out {params.out} {params.args} --no-progress "
            "> {log} 2>&1"

else:
    # One rule per batch (Snakemake needs every output pattern up front); a batch's predictions start as soon
    # as its own runs are trained.
    for _batch, _runs in BATCHES.items():

        rule:
            name:
                f"predict_{_batch}"
            input:
                runs=[f"{EXP}/runs/{run}/summary.json" for run in _runs],
                manifest=MANIFEST,
                splits=SPLITS,
            output:
                [f"{EXP}/predictions/{run}/{{split}}/predictions.csv" for run in _runs],
            params:
                runs=shlex.join(f"{EXP}/runs/{run}" for run in _runs),
                dataset=dataset_dir,
                out=batched_out_template,
                args=predict_args,
                digest=predict_digest,
            log:
                f"{LOGS}/predict/{_batch}_{{split}}.log",
            threads: 1
            resources:
                gpu=1,
                mem_mb=8000,
                runtime=120,
            conda:
                "../envs/foldtune.yaml"
            shell:
                "OMP_NUM_THREADS={threads} foldtune predict --run {params.runs} --dataset {params.dataset} "
                "--splits {input.splits} --split {wildcards.split} --out {params.out} {params.args} "
                "--no-progress > {log} 2>&1"


rule predict_baseline:
    input:
        manifest=MANIFEST,
        splits=SPLITS,
    output:
        f"{EXP}/predictions/{{baseline}}/{{split}}/predictions.csv",
    params:
        name=baseline_cli_name,
        dataset=dataset_dir,
        out=parent_of_output,
    log:
        f"{LOGS}/predict/{{baseline}}_{{split}}.log",
    conda:
        "../envs/foldtune.yaml"
    shell:
        "foldtune predict --baseline {params.name} --dataset {params.dataset} --splits {input.splits} "
        "--split {wildcards.split} --out {params.out} --no-progress > {log} 2>&1"


rule score:
    input:
        predictions=score_input,
        manifest=MANIFEST,
    output:
        f"{EXP}/scores/{{scored}}/{{split}}.csv",
    params:
        dataset=dataset_dir,
    log:
        f"{LOGS}/score/{{scored}}_{{split}}.log",
    conda:
        "../envs/foldtune.yaml"
    shell:
        "foldtune score --predictions {input.predictions} --dataset {params.dataset} --out {output} --no-progress "
        "> {log} 2>&1"

# Tables, plots, report.md / report.html / summary.csv from every run summary, training log and score table.


rule report:
    input:
        scores=all_scores(),
        summaries=all_summaries(),
        groups=GROUPS_FILE,
    output:
        md=f"{EXP}/report.md",
        html=f"{EXP}/report.html",
        summary=f"{EXP}/summary.csv",
    params:
        results=parent_of_output,
        config=RESOLVED_CONFIG,
        runs=report_runs,
        digest=report_digest,
    log:
        f"{LOGS}/report.log",
    conda:
        "../envs/foldtune.yaml"
    shell:
        "foldtune report --results {params.results} --out {params.results} --config {params.config} "
        "--runs {params.runs} --groups {input.groups} > {log} 2>&1"

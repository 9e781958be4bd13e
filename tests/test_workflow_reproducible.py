"""The demo's promises on a micro config through Snakemake's CLI: step budgets and fixed seeds make a forced
rerun reproduce summary.csv byte for byte; grid groups give the head-only control and the adapter-only runs;
a shipped base replaces the base job; batched prediction (one job per split) predicts every run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_workflow_dag import job_counts, snakemake
from tests.test_workflow_e2e import micro_config

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "snakemake" / "profiles" / "local"


def _run(config: Path, directory: Path, *extra: str) -> None:
    result = snakemake("--configfile", str(config), "--workflow-profile", str(PROFILE), "--cores", "2",
                       "--resources", "gpu=2", "--directory", str(directory), *extra, cwd=directory, timeout=900)
    exp = directory / "results" / "micro"
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(exp.glob("logs/**/*.log")))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:] + logs


@pytest.mark.slow
def test_forced_rerun_reproduces_summary_csv_and_groups(tmp_path: Path):
    config = micro_config(tmp_path)
    edited = yaml.safe_load(config.read_text())
    edited["training"]["data"]["val_split"] = None
    edited["grid"] = {"label": "adapter only", "methods": ["lora"], "ranks": [2], "seeds": [0],
                      "groups": [{"name": "heads", "label": "adapter + head", "methods": ["none"],
                                  "training": {"model.train_heads": True}}]}
    edited["evaluate"]["batch_runs"] = True
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    _run(config, tmp_path)
    exp = tmp_path / "results" / "micro"
    first = (exp / "summary.csv").read_bytes()

    summary = pd.read_csv(exp / "summary.csv", dtype={"group": str}).fillna({"group": ""})
    assert "train_seconds" not in summary.columns and (exp / "costs.csv").is_file()
    head = summary[summary.method == "head"].iloc[0]
    assert head.group == "adapter + head" and head.adapter_params == 0 and head.head_params > 0
    assert head.steps == 3  # the training section's max_steps: budgets are steps
    lora = summary[summary.method == "lora"].iloc[0]
    assert lora.group == "adapter only" and lora.head_params == 0 and lora.adapter_params == lora.trainable_params
    reference = json.loads((exp / "runs" / "none" / "summary.json").read_text())
    assert reference["steps"] == 0 and reference["trainable_params"] == 0  # the untuned base never trains
    # Batched: one predict job per group and split (the reference joins the top-level group, `grid`).
    assert sorted(p.name for p in (exp / "logs" / "predict").glob("*_val.log")) == ["grid_val.log", "heads_val.log",
                                                                             "ideal_helix_val.log"]

    # Everything again from scratch but the data steps (same inputs): every number of summary.csv is the same.
    for name in ("runs", "predictions", "scores", "plots"):
        shutil.rmtree(exp / name)
    for name in ("summary.csv", "costs.csv", "report.md", "report.html"):
        (exp / name).unlink()
    _run(config, tmp_path)
    assert json.loads((exp / "runs" / "heads-none_s0" / "summary.json").read_text())["steps"] == 3  # retrained
    assert (exp / "summary.csv").read_bytes() == first

    # A shipped base: the finished base run used in place of the base job (which is not scheduled).
    shipped = tmp_path / "shipped"
    shutil.copytree(exp / "runs" / "base", shipped)
    edited["base_run"] = str(shipped)
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    counts = job_counts(snakemake("--configfile", str(config), "-n", "--forceall", "--directory", str(tmp_path),
                                  cwd=tmp_path).stdout)
    assert "base" not in counts and counts["train"] == 3
    assert counts["predict_grid"] == 1 and counts["predict_heads"] == 1

"""The language-model path of the workflow through Snakemake's CLI on a tiny random ESM-2 saved in the
fair-esm release layout: train every method -> `foldtune contacts` per run -> a report with the contact-
precision table and plot. Contacts of a random model are meaningless: this checks the machinery (files,
columns, parameter counts); tests/test_upstream_esm2.py checks the numbers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.lm import PRECISION_COLUMNS, build_language_model
from pipeline.train import attach_method
from tests._esm_fixtures import random_esm2, write_esm2_checkpoint
from tests.test_workflow_dag import job_counts, snakemake
from tests.test_workflow_e2e import micro_data

REPO = Path(__file__).resolve().parents[1]
METHODS = ["lora", "lorta", "tlora", "full", "none"]  # every method foldtune has
ADAPTER = {"alpha": 4, "part": "stem", "targets": ["attn", "mlp"]}


def lm_config(tmp_path: Path) -> Path:
    checkpoint = write_esm2_checkpoint(tmp_path / "esm2", random_esm2(perturb=False))
    config = {
        "experiment": "micro_lm",
        "data": micro_data(tmp_path),
        "training": {
            "kind": "lm",
            "model": {"esm2": str(checkpoint)},
            "adapter": ADAPTER,
            "data": {"train_split": "train", "val_split": "val", "crop_size": 64, "batch_size": 2},
            "trainer": {"max_steps": 3, "val_every_n_steps": 100, "checkpoint_every_n_steps": 100, "lr": 1e-3},
        },
        "grid": {"methods": METHODS, "ranks": [2], "seeds": [0]},
        "evaluate": {"splits": ["test"]},
        "report": {"title": "micro lm", "disclaimer": "Tiny random ESM-2: machinery only."},
    }
    path = tmp_path / "micro_lm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def expected_trainable(config: dict, method: str) -> int:
    """Trainable parameters of `method` on the configured base, counted here on the model itself."""
    model = build_language_model(config["training"]["model"])
    attach_method(model, {**ADAPTER, "method": method, "rank": 2, "dropout": 0.0})
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_lm_workflow_end_to_end(tmp_path: Path):
    config_path = lm_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    profile = REPO / "snakemake" / "profiles" / "local"
    result = snakemake("--configfile", str(config_path), "--workflow-profile", str(profile), "--cores", "2",
                       "--resources", "gpu=2", "--directory", str(tmp_path), cwd=tmp_path, timeout=600)
    exp = tmp_path / "results" / "micro_lm"
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(exp.glob("logs/**/*.log")))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:] + logs
    counts = job_counts(result.stdout + result.stderr)
    assert counts["train"] == len(METHODS) and counts["contacts"] == len(METHODS)
    assert "predict" not in counts and "score" not in counts and "predict_baseline" not in counts

    test_chains = set(pd.read_csv(exp / "splits.csv").query("split == 'test'").chain_id)
    names = {"lora": "lora_r2_s0", "lorta": "lorta_r2_s0", "tlora": "tlora_r2_s0", "full": "full_s0", "none": "none"}
    summary = pd.read_csv(exp / "summary.csv")
    assert set(summary.method) == set(METHODS) and set(summary.split) == {"test"}
    assert {*PRECISION_COLUMNS, "trainable_params", "val_perplexity"} <= set(summary.columns)
    for method, run in names.items():
        run_summary = json.loads((exp / "runs" / run / "summary.json").read_text())
        assert run_summary["kind"] == "lm" and run_summary["method"] == method
        assert run_summary["steps"] == (0 if method == "none" else 3)
        assert run_summary["trainable_params"] == expected_trainable(config, method)
        if method == "full":
            assert run_summary["trainable_params"] == run_summary["total_params"]
        table = pd.read_csv(exp / "contacts" / run / "test.csv")
        assert set(table.chain_id) == test_chains and list(table.columns[4:]) == PRECISION_COLUMNS
        assert table[PRECISION_COLUMNS].stack().between(0, 1).all()
        written = json.loads((exp / "contacts" / run / "test.json").read_text())
        assert written["method"] == method and written["chains"] == len(test_chains)
        row = summary[summary.method == method].iloc[0]
        assert row.trainable_params == run_summary["trainable_params"]
        for column in PRECISION_COLUMNS:
            assert row[column] == pytest.approx(table[column].mean(), abs=1e-5, nan_ok=True)
    assert (exp / "plots" / "contacts_vs_params.png").stat().st_size > 1000
    html = (exp / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2  # contacts vs params, training curves
    markdown = (exp / "report.md").read_text()
    assert markdown.startswith("# micro lm") and "long P@L/5" in markdown and "Tiny random ESM-2" in markdown

    again = snakemake("--configfile", str(config_path), "-n", "--directory", str(tmp_path), cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]


def test_shipped_lm_config_lints_and_plans_contacts(tmp_path: Path):
    config = REPO / "configs" / "esm2_lm.yaml"
    # data.query is relative to the working directory (the repo root in use) and an input of fetch
    query = Path(yaml.safe_load(config.read_text())["data"]["query"])
    (tmp_path / query).parent.mkdir(parents=True)
    shutil.copy(REPO / query, tmp_path / query)
    lint = snakemake("--configfile", str(config), "--lint", "--directory", str(tmp_path), cwd=tmp_path)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, (lint.stdout + lint.stderr)[-3000:]
    counts = job_counts(snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path), cwd=tmp_path).stdout)
    # lorta, lora, tlora at ranks 1 and 8, plus the untuned base: each trained and scored for contacts once
    assert counts["train"] == 7 and counts["contacts"] == 7 and counts["report"] == 1

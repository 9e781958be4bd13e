"""The whole workflow through Snakemake's CLI on a micro config in a temp directory: every expected output
exists with values in range, the report agrees with the score tables, and a rerun redoes only what changed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.test_workflow_dag import job_counts, snakemake

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
CHAINS = ["1vii.pdb,A", "1ubi.pdb,A", "1ejg.pdb,A", "2q2k.cif,A"]  # 36-76 residues: fast to fold


def micro_data(tmp_path: Path) -> dict:
    """The `data:` section of the micro configs: CHAINS from the bundled structures, offline (writes chains.csv)."""
    chains = tmp_path / "chains.csv"
    chains.write_text("file,chain\n" + "\n".join(f"{SAMPLES / 'structures' / c.split(',')[0]},{c.split(',')[1]}"
                                                 for c in CHAINS) + "\n")
    return {"ids_file": str(chains), "source_dirs": [str(SAMPLES / "structures")], "offline": True,
            "chains_file": str(chains), "split": {"fractions": [0.5, 0.25, 0.25], "identity": 0.4}}


def micro_config(tmp_path: Path) -> Path:
    config = {
        "experiment": "micro",
        "data": micro_data(tmp_path),
        "base_training": {
            "model": {"source": "random"},
            "adapter": {"method": "full"},
            "data": {"train_split": "train", "val_split": "val", "crop_size": 32, "batch_size": 2},
            "trainer": {"max_steps": 4, "val_every_n_steps": 100, "checkpoint_every_n_steps": 100, "lr": 1e-3},
        },
        "training": {
            "model": {"source": "random"},
            "data": {"train_split": "val", "val_split": "val", "crop_size": 32, "batch_size": 1},
            "trainer": {"max_steps": 3, "val_every_n_steps": 100, "checkpoint_every_n_steps": 100, "lr": 1e-2},
        },
        "grid": {"methods": ["lora", "none"], "ranks": [2], "seeds": [0]},
        # One split keeps the job count (each job imports torch: seconds) down; test_workflow_dag covers several.
        "evaluate": {"splits": ["val"], "baselines": ["ideal-helix"]},
        "report": {"title": "micro", "gain_split": "val", "disclaimer": "Tiny random models: machinery only."},
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
def test_workflow_end_to_end(tmp_path: Path):
    config = micro_config(tmp_path)
    profile = REPO / "snakemake" / "profiles" / "local"
    result = snakemake("--configfile", str(config), "--workflow-profile", str(profile), "--cores", "2",
                       "--resources", "gpu=2", "--directory", str(tmp_path), cwd=tmp_path, timeout=600)
    exp = tmp_path / "results" / "micro"
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(exp.glob("logs/**/*.log")))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:] + logs
    check_outputs(tmp_path, config)



def check_outputs(tmp_path: Path, config: Path, lora_steps: int = 3) -> None:
    exp = tmp_path / "results" / "micro"
    manifest = pd.read_csv(exp / "dataset" / "manifest.csv")
    assert sorted(manifest.chain_id) == ["1ejg_A", "1ubi_A", "1vii_A", "2q2k_A"]
    splits = pd.read_csv(exp / "splits.csv")
    assert set(splits.chain_id) == set(manifest.chain_id) and set(splits.split) <= {"train", "val", "test"}
    fetched = pd.read_csv(exp / "structures" / "fetch_report.csv")
    assert set(fetched.status) == {"local"}  # offline: served from data/samples, nothing downloaded

    runs = {"base": "full", "lora_r2_s0": "lora", "none": "none"}
    for name, method in runs.items():
        summary = json.loads((exp / "runs" / name / "summary.json").read_text())
        assert summary["method"] == method
        if method == "lora":
            assert summary["rank"] == 2 and 0 < summary["trainable_params"] < summary["total_params"]
            assert summary["steps"] == lora_steps
        if method == "none":
            assert summary["trainable_params"] == 0 and summary["steps"] == 0
    lora_config = yaml.safe_load((exp / "runs" / "lora_r2_s0" / "config.yaml").read_text())
    assert lora_config["model"]["base_run"].endswith("runs/base") and lora_config["trainer"]["threads"] == 1

    per_split = splits.groupby("split").chain_id.apply(set).to_dict()
    for name in ("lora_r2_s0", "none", "ideal_helix"):
        for split in ("val",):
            predictions = pd.read_csv(exp / "predictions" / name / split / "predictions.csv")
            assert set(predictions.chain_id) == per_split[split]
            for chain_id in predictions.chain_id:
                assert (exp / "predictions" / name / split / f"{chain_id}.pdb").stat().st_size > 1000
            scores = pd.read_csv(exp / "scores" / name / f"{split}.csv")
            assert set(scores.chain_id) == per_split[split]
            assert scores.tm_score.between(0, 1).all() and scores.lddt.between(0, 1).all()
            assert (scores.rmsd > 0).all() and scores.gdt_ts.between(0, 1).all()
            if name == "ideal_helix":
                assert scores.tm_score.between(0.05, 0.6).all()

    summary = pd.read_csv(exp / "summary.csv")
    assert set(summary.method) == {"lora", "none", "ideal-helix"} and set(summary.split) == {"val"}
    for row in summary.itertuples():
        scored = "ideal_helix" if row.method == "ideal-helix" else ("none" if row.method == "none" else "lora_r2_s0")
        scores = pd.read_csv(exp / "scores" / scored / f"{row.split}.csv")
        assert row.tm_mean == pytest.approx(scores.tm_score.mean(), abs=1e-5)
        if row.method != "none":
            base = pd.read_csv(exp / "scores" / "none" / f"{row.split}.csv").set_index("chain_id").tm_score
            gain = scores.set_index("chain_id").tm_score - base
            assert row.tm_gain == pytest.approx(gain.mean(), abs=1e-5)
    html = (exp / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4
    assert "Tiny random models: machinery only." in html
    assert (exp / "report.md").read_text().startswith("# micro")
    assert (exp / "logs" / "train" / "lora_r2_s0.log").exists()

    # Nothing changed: nothing to do. A report-only change reruns the report only; a training change reruns
    # training and everything downstream of it, not the data steps or the base.
    again = snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path), cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    edited = yaml.safe_load(config.read_text())
    edited["report"]["title"] = "micro, retitled"
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    counts = job_counts(snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path),
                                  cwd=tmp_path).stdout)
    assert counts == {"report": 1, "all": 1, "total": 2}
    edited["training"]["trainer"]["lr"] = 5e-3
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    counts = job_counts(snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path),
                                  cwd=tmp_path).stdout)
    assert counts["train"] == 2 and "base" not in counts and "prepare" not in counts and "fetch" not in counts
    assert counts["predict"] == 2 and counts["score"] == 2 and "predict_baseline" not in counts

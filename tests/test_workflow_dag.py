"""The Snakemake workflow without running models: --lint, schema validation (defaults, clear errors), the DAG
of a grid (jobs, run names, the exact `foldtune` command lines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "snakemake" / "Snakefile"


def snakemake(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *args], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def micro_config(tmp_path: Path, **changes) -> Path:
    config = {
        "experiment": "micro",
        "data": {"ids": ["1ubi", "1vii_A"], "source_dirs": ["/nowhere"], "offline": True},
        "base_training": {"model": {"source": "random"}, "trainer": {"max_time_s": 5}},
        "training": {"data": {"train_split": "val"}, "trainer": {"max_time_s": 5}},
        "grid": {"methods": ["lora", "lorta", "full"], "ranks": [2, 4], "seeds": [0, 1]},
        "evaluate": {"splits": ["val", "test"], "max_tokens": 2048},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_lint_is_clean_on_the_demo_config():
    result = snakemake("--configfile", "configs/demo.yaml", "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_dag_of_a_grid(tmp_path: Path):
    config = micro_config(tmp_path)
    result = snakemake("--configfile", str(config), "-n", "-p", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    # lora, lorta x ranks 2, 4 x seeds 0, 1 = 8; full x 2 seeds = 2; the untuned base `none` always = 1.
    runs = 8 + 2 + 1
    assert counts == {"fetch": 1, "prepare": 1, "split": 1, "base": 1, "train": runs, "predict": 2 * runs,
                      "predict_baseline": 2, "score": 2 * (runs + 1), "report": 1, "all": 1, "total": counts["total"]}
    out = result.stdout
    # One `foldtune train` per grid point, with the grid values and the base as overrides.
    line = next(l for l in out.splitlines() if "output_dir=results/micro/runs/lorta_r4_s1" in l)
    for piece in ("--section training", "adapter.method=lorta", "adapter.rank=4", "trainer.seed=1",
                  "'adapter.targets=[attn,mlp]'", "adapter.part=trunk", "model.base_run=results/micro/runs/base",
                  "data.dataset=results/micro/dataset", "data.splits=results/micro/splits.csv", "trainer.threads=1"):
        assert piece in line, (piece, line)
    assert "foldtune train --config results/micro/workflow_config.yaml --section base_training" in out
    assert "foldtune predict --baseline ideal-helix --dataset results/micro/dataset" in out
    assert ("foldtune predict --run results/micro/runs/none --dataset results/micro/dataset --splits "
            "results/micro/splits.csv --split val --out results/micro/predictions/none/val --max-tokens 2048") in out
    assert ("foldtune score --predictions results/micro/predictions/full_s0/test/predictions.csv "
            "--dataset results/micro/dataset --out results/micro/scores/full_s0/test.csv") in out
    assert "foldtune fetch 1ubi 1vii_A --source-dir /nowhere --offline --cache resources/structures" in out
    assert re.search(r"foldtune report --results results/micro --out results/micro .*--runs .*ideal_helix", out)
    # The resolved config (defaults filled) is what `foldtune train` reads.
    resolved = yaml.safe_load((tmp_path / "results/micro/workflow_config.yaml").read_text())
    assert resolved["evaluate"]["baselines"] == ["ideal-helix"] and resolved["evaluate"]["precision"] == "fp32"
    assert "--precision" not in out  # fp32 is predict's default
    assert resolved["data"]["split"] == {"identity": 0.4, "fractions": [0.8, 0.1, 0.1], "seed": 0,
                                         "date_cutoff": None}
    assert resolved["grid"]["targets"] == [["attn", "mlp"]] and resolved["report"]["gain_split"] is None


def test_evaluate_precision_reaches_every_predict(tmp_path: Path):
    config = micro_config(tmp_path, **{"evaluate.precision": "bf16", "grid.methods": ["lora"], "grid.ranks": [2],
                                       "grid.seeds": [0]})
    result = snakemake("--configfile", str(config), "-n", "-p", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [line for line in result.stdout.splitlines() if "foldtune predict --run" in line]
    assert len(runs) == 4 and all("--max-tokens 2048 --precision bf16 --no-progress" in line for line in runs), runs
    assert all("--precision" not in line for line in result.stdout.splitlines() if "--baseline" in line)


def test_target_and_part_sweeps_name_runs_and_no_base(tmp_path: Path):
    config = micro_config(tmp_path, **{"grid.methods": ["lora", "none"], "grid.ranks": [8], "grid.seeds": [0],
                                       "grid.targets": [["attn"], ["qv"]], "grid.part": ["trunk", "stem"],
                                       "base_training": None, "evaluate.baselines": []})
    result = snakemake("--configfile", str(config), "-n", "-p", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    names = set(re.findall(r"output_dir=results/micro/runs/(\S+)", result.stdout))
    assert names == {"lora_r8_s0_attn_trunk", "lora_r8_s0_attn_stem", "lora_r8_s0_qv_trunk", "lora_r8_s0_qv_stem",
                     "none"}
    assert "model.base_run" not in result.stdout and "base_training" not in result.stdout
    assert "predict_baseline" not in result.stdout


def test_groups_head_only_control_and_a_shipped_base(tmp_path: Path):
    """Grid groups: each group's runs carry its overrides and name prefix, the reference `none` never trains
    (model.train_heads=false), `none` in a head-training group is the head-only control, a group budget picks
    its own ranks; a shipped base (`base_run`) replaces the base job unless retrain_base asks for it."""
    import json

    from pipeline.budget import rank_for_budget

    shipped = tmp_path / "shipped_base"
    shipped.mkdir()
    (shipped / "summary.json").write_text("{}")
    groups = [{"name": "heads", "label": "adapter + head", "methods": ["none", "lora"], "ranks": [2],
               "training": {"model.train_heads": True, "trainer.lr": 0.01}},
              {"name": "budget", "methods": ["lora", "lorta"], "budget": {"params": 6000}}]
    model = {"source": "random", "size": {"trunk": {"max_recycles": 0}}}
    config = micro_config(tmp_path, **{"grid.methods": ["lorta"], "grid.ranks": [1, 4], "grid.seeds": [0],
                                       "grid.label": "adapter only", "grid.groups": groups,
                                       "base_run": str(shipped), "base_training.model": model,
                                       "training.model": {**model, "train_heads": False}})
    result = snakemake("--configfile", str(config), "-n", "-p", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^.*output_dir=results/micro/runs/(\S+).*$",
                                                         result.stdout, re.M)}
    ranks = {m: rank_for_budget(model, {"method": m, "targets": ["attn", "mlp"], "part": "trunk"}, 6000).rank
             for m in ("lora", "lorta")}
    assert set(lines) == {"none", "lorta_r1_s0", "lorta_r4_s0", "heads-none_s0", "heads-lora_r2_s0",
                          f"budget-lora_r{ranks['lora']}_s0", f"budget-lorta_r{ranks['lorta']}_s0"}
    assert "base_training" not in result.stdout  # the shipped base: no base job
    assert all(f"model.base_run={shipped}" in line for line in lines.values())
    assert "model.train_heads=false" in lines["none"]
    for name in ("heads-none_s0", "heads-lora_r2_s0"):
        assert "model.train_heads=true" in lines[name] and "trainer.lr=0.01" in lines[name], lines[name]
    assert "train_heads" not in lines["lorta_r1_s0"] and "trainer.lr" not in lines["budget-lora_r%d_s0" % ranks["lora"]]
    labels = json.loads((tmp_path / "results/micro/groups.json").read_text())
    assert labels["heads-none_s0"]["label"] == "adapter + head" and labels["lorta_r4_s0"]["label"] == "adapter only"
    assert labels["budget-lorta_r%d_s0" % ranks["lorta"]]["label"] == "budget"
    assert "--groups results/micro/groups.json" in result.stdout

    retrain = snakemake("--configfile", str(config), "--config", "retrain_base=True", "-n", "-p",
                        "--directory", str(tmp_path), cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stdout + retrain.stderr
    assert "--section base_training" in retrain.stdout and "model.base_run=results/micro/runs/base" in retrain.stdout

    (shipped / "summary.json").unlink()
    missing = snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path), cwd=tmp_path)
    assert missing.returncode != 0 and f"base_run: {shipped}/summary.json not found" in missing.stdout + missing.stderr


@pytest.mark.parametrize(("change", "message"), [
    ({"grid.methods": ["lora", "dora"]}, r"grid\.methods\.1: 'dora' is not one of"),
    ({"grid.ranks": [0]}, r"grid\.ranks\.0: 0 is less than the minimum of 1"),
    ({"data.ids": [], "data.source_dirs": []}, r"data: none of the alternatives fit \(.*'ids_file' is a required property"),
    ({"experiment": "my experiment"}, r"experiment: 'my experiment' does not match"),
    ({"evaluate.precision": "fp16"}, r"evaluate\.precision: 'fp16' is not one of"),
    ({"grid.budget": {"params": 1000, "rule": "closest"}}, r"grid\.budget\.rule: 'closest' is not one of"),
])
def test_schema_rejects_bad_configs_naming_the_key(tmp_path: Path, change: dict, message: str):
    config = micro_config(tmp_path, **change)
    result = snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert re.search(message, text), text[-2000:]
    assert str(config) in text  # the error names the config file
    assert not (tmp_path / "results").exists()  # nothing written for a rejected config


def test_editing_the_ids_file_query_or_chains_file_reruns_its_step(tmp_path: Path):
    """data.ids_file / data.chains_file / data.query are inputs (and digested params) of fetch / prepare."""
    samples = REPO / "data" / "samples" / "structures"
    (tmp_path / "ids.txt").write_text("1ubi\n1vii\n")
    (tmp_path / "chains.csv").write_text("file,chain\n1ubi.pdb,A\n1vii.pdb,A\n")
    config = micro_config(tmp_path, **{"data.ids": [], "data.ids_file": "ids.txt", "data.chains_file": "chains.csv",
                                       "data.source_dirs": [str(samples)]})
    manifest = "results/micro/dataset/manifest.csv"
    run = ("--configfile", str(config), "--directory", str(tmp_path), "--cores", "1", manifest)
    done = snakemake(*run, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert snakemake(*run, "-n", cwd=tmp_path).stdout.count("Nothing to be done") == 1

    def jobs_after(edit) -> dict:
        edit()
        result = snakemake(*run, "-n", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return job_counts(result.stdout) if "Job stats:" in result.stdout else {}

    chains = tmp_path / "chains.csv"
    stamp = chains.stat()
    # Same modification time as before, other contents: the digest still sees it.
    assert jobs_after(lambda: (chains.write_text("file,chain\n1ubi.pdb,A\n"),
                               os.utime(chains, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))))["prepare"] == 1
    ids = tmp_path / "ids.txt"
    counts = jobs_after(lambda: ids.write_text("1ubi\n"))
    assert counts["fetch"] == 1 and counts["prepare"] == 1
    # A query file is an input too: a missing one is named before any job runs.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    query = micro_config(fresh, **{"data.ids": [], "data.query": "q.json", "data.offline": False})
    missing = snakemake("--configfile", str(query), "--directory", str(fresh), "-n", manifest, cwd=fresh)
    assert missing.returncode != 0 and "q.json" in missing.stdout + missing.stderr
    assert "Missing input" in missing.stdout + missing.stderr or "MissingInputException" in missing.stderr


@pytest.mark.parametrize("change, message", [
    ({"training.trainer": {"max_step": 5}}, "training: trainer.max_step: unknown key"),
    ({"base_training.trainer": {"lr": -1}}, "base_training: trainer.lr: must be >= 0.0"),
    ({"grid.training": {"trainer.warmup_steps": "ten"}}, "training: trainer.warmup_steps: expected an integer"),
])
def test_a_bad_training_setting_stops_the_dry_run(tmp_path: Path, change: dict, message: str):
    config = micro_config(tmp_path, **change)
    result = snakemake("--configfile", str(config), "-n", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{config}: {message}" in result.stdout + result.stderr

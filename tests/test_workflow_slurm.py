"""The whole workflow through a real SLURM cluster (`--executor slurm`, the repository's profile): every job
goes through sbatch, the lora training runs as 2 DDP processes inside one job holding 2 (fake) GPUs, and that
job is cancelled mid-run (scancel) after its first checkpoint: the profile's `retries` resubmit it and it
resumes from last.ckpt. Needs a cluster: `sudo snakemake/profiles/slurm/local-cluster.sh up` (.ci/run starts
one). Safe next to other runs of this test: own directory, and Snakemake names its jobs with its own run id.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_workflow_dag import SNAKEFILE
from tests.test_workflow_e2e import check_outputs, micro_config

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "snakemake" / "profiles" / "slurm"
TIMEOUT = 900  # s for the whole workflow (measured ~3 min on 2 loaded cores); a hang fails, never stalls CI
LORA_STEPS = 12


def _missing() -> str | None:
    tools = [t for t in ("sbatch", "squeue", "sinfo", "scancel") if shutil.which(t) is None]
    if tools:
        return f"SLURM client commands not on PATH: {', '.join(tools)} (apt-get install slurm-client)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T %G"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM controller answers (sinfo timed out)"
    if nodes.returncode or not nodes.stdout.strip():
        return (f"no SLURM controller answers (sinfo: {(nodes.stderr or nodes.stdout).strip()[:200]}); start one "
                "with `sudo snakemake/profiles/slurm/local-cluster.sh up`")
    if not re.search(r"gpu:(\d+)", nodes.stdout) or max(map(int, re.findall(r"gpu:(\d+)", nodes.stdout))) < 2:
        return f"the SLURM cluster has no node with gres gpu:2 (sinfo: {nodes.stdout.strip()[:200]})"
    return None


def _jobs_here(workdir: Path) -> list[dict]:
    """This test's SLURM jobs (finished ones stay listed for MinJobAge): id, state, comment (rule)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k|%Z"], capture_output=True, text=True,
                         timeout=30).stdout
    rows = [dict(zip(("id", "state", "comment", "dir"), line.split("|"))) for line in out.splitlines() if line]
    return [r for r in rows if Path(r["dir"]) == workdir]


def _cancel_training_after_first_checkpoint(workdir: Path, run_dir: Path, done: threading.Event, seen: dict):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    while not done.is_set():
        if ckpt.is_file() and not (run_dir / "summary.json").exists():
            for job in _jobs_here(workdir):
                if job["state"] == "RUNNING" and "rule_train" in job["comment"] and "lora" in job["comment"]:
                    subprocess.run(["scancel", job["id"]], check=True, timeout=30)
                    seen.update(cancelled=job["id"], at_step=torch.load(ckpt, weights_only=False)["global_step"])
                    return
        time.sleep(0.1)


@pytest.mark.slow
def test_workflow_on_slurm_with_ddp_and_a_cancelled_training_job(tmp_path: Path):
    missing = _missing()
    if missing:
        pytest.skip(f"SLURM end-to-end test skipped: {missing}")
    config = micro_config(tmp_path)
    edited = yaml.safe_load(config.read_text())
    edited["training"]["trainer"].update(max_steps=LORA_STEPS, checkpoint_every_n_steps=2, devices=2)
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    model_rules = {"base": 1, "train": 2, "predict": 1}  # threads: train = 2 DDP processes x 1 thread
    set_resources = [f"{rule}:{key}={value}" for rule, threads in model_rules.items()
                     for key, value in (("slurm_partition", "gpu"), ("mem_mb", 2000), ("runtime", 20),
                                        ("cpus_per_task", threads))]
    args = ["timeout", "-k", "10", str(TIMEOUT), sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE),
            "--configfile", str(config), "--workflow-profile", str(PROFILE), "--directory", str(tmp_path),
            "--jobs", "4", "--latency-wait", "5", "--slurm-init-seconds-before-status-checks", "1",
            "--default-resources", "slurm_partition=cpu", "slurm_account=", "mem_mb=1000", "runtime=20",
            "cpus_per_task=1", "--set-resources", *set_resources,
            "--set-threads", *[f"{rule}={threads}" for rule, threads in model_rules.items()]]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    run_dir = tmp_path / "results" / "micro" / "runs" / "lora_r2_s0"
    done, seen = threading.Event(), {}
    watcher = threading.Thread(target=_cancel_training_after_first_checkpoint, args=(tmp_path, run_dir, done, seen),
                               daemon=True)
    watcher.start()
    started = time.time()
    try:
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT + 30)
    finally:
        done.set()
        watcher.join(timeout=10)
    elapsed = time.time() - started
    print(f"SLURM workflow: {elapsed:.0f} s; cancelled {seen}")
    exp = tmp_path / "results" / "micro"
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(exp.glob("logs/**/*.log")))
    assert result.returncode == 0, f"rc {result.returncode}\n" + (result.stdout + result.stderr)[-5000:] + logs

    check_outputs(tmp_path, config, lora_steps=LORA_STEPS)

    # Every job went through sbatch: the plugin's per-job logs are named by SLURM job id, and squeue (no
    # accounting database; finished jobs stay listed for MinJobAge) knows those ids, run from this directory.
    slurm_logs = sorted((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
    logged_ids = {p.stem for p in slurm_logs}
    jobs = {j["id"]: j for j in _jobs_here(tmp_path)}
    rules = {re.match(r"rule_([a-z_]+?)(?:_wildcards|$)", j["comment"]).group(1) for j in jobs.values()}
    assert {"fetch", "prepare", "split", "base", "train", "predict", "predict_baseline", "score"} <= rules, rules
    assert logged_ids and logged_ids <= set(jobs), (logged_ids, jobs)
    assert all(j["state"] == "COMPLETED" for i, j in jobs.items() if i != seen.get("cancelled")), jobs

    # The cancelled training job was resubmitted (retries) and resumed from its checkpoint, not restarted.
    assert seen, "the training job finished before it could be cancelled"
    assert jobs[seen["cancelled"]]["state"] == "CANCELLED"
    train_jobs = [i for i, j in jobs.items() if "rule_train" in j["comment"] and "lora" in j["comment"]]
    assert len(train_jobs) == 2, train_jobs
    assert (run_dir / "logs" / "metrics.part000.csv").is_file()  # --rerun kept the killed attempt's log: resumed
    assert not (run_dir.parent / "lora_r2_s0.replaced").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == LORA_STEPS and ckpt["foldtune"]["world_size"] == 2
    assert ckpt["foldtune"]["batches_seen"] == LORA_STEPS  # per rank, batch 1, no accumulation
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == LORA_STEPS
    assert 1 <= seen["at_step"] < LORA_STEPS


def test_deadline_auto_reads_the_slurm_time_limit_inside_a_job():
    """`foldtune train --deadline auto` inside a real job: squeue's time left of a 5-minute job, minus the
    30 s margin (5 % of 300 s is less than the 30 s floor)."""
    missing = _missing()
    if missing:
        pytest.skip(f"SLURM deadline test skipped: {missing}")
    code = ("import time; from pipeline.commands.train import resolve_deadline; "
            "print('LEFT', resolve_deadline('auto') - time.time())")
    job = ["srun", "-t", "5", "-n", "1", "-J", f"foldtune-test-{time.time_ns()}", sys.executable, "-c", code]
    result = subprocess.run(["timeout", "-k", "5", "120", *job], capture_output=True, text=True, timeout=150, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    left = float(re.search(r"LEFT (\S+)", result.stdout).group(1))
    assert 300 - 30 - 60 < left <= 300 - 30, left  # up to a minute of queueing / start-up

"""`python -m pipeline.demo` under Ctrl-C (the whole process group, as a terminal sends it) and after a kill -9
that leaves Snakemake's lock behind: one message saying how to go on, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path) -> Path:
    config = {"experiment": "micro",
              "data": {"ids": ["1ubi", "1vii_A", "1l2y"], "source_dirs": [str(REPO / "data/samples/structures"),
                                                                      "/work/shared/data/structures"],
                       "offline": True},
              "base_training": {"model": {"source": "random"}, "trainer": {"max_steps": 100000, "max_time_s": 120}},
              "training": {"data": {"train_split": "val"}, "trainer": {"max_time_s": 5}},
              "grid": {"methods": ["lora"], "ranks": [2], "seeds": [0]}, "evaluate": {"splits": ["val"]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(tmp_path: Path, config: Path) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "pipeline.demo", "--config", str(config), "--cores", "1", "--",
                             "--directory", str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_locks(tmp_path: Path, process: subprocess.Popen) -> None:
    """Until Snakemake runs jobs (it holds its locks then; the base job alone takes minutes)."""
    locks = tmp_path / ".snakemake" / "locks"
    for _ in range(600):
        if locks.is_dir() and any(locks.iterdir()):
            time.sleep(0.5)
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    raise AssertionError("snakemake did not start its jobs")


def test_ctrl_c_then_a_killed_run_s_lock(tmp_path: Path):
    config = _config(tmp_path)
    process = _start(tmp_path, config)
    _wait_for_locks(tmp_path, process)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: every process of the foreground group
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out[-3000:]
    assert "demo: interrupted (Ctrl-C) after" in out and f"python -m pipeline.demo --config {config}" in out
    assert "Traceback" not in out.split("demo: interrupted")[-1]
    # kill -9 of everything: Snakemake's lock stays, and the next run names the way out.
    process = _start(tmp_path, config)
    _wait_for_locks(tmp_path, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    again = _start(tmp_path, config)
    out, _ = again.communicate(timeout=300)
    assert again.returncode != 0
    assert f"demo: {tmp_path} is locked by another Snakemake run, or by one that was killed" in out
    assert "--unlock" in out.split("is locked by")[-1]

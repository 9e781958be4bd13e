"""benchmarks/gpu_check.py --tiny: the GPU check runs end to end on the CPU (tiny shapes, one step each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_with_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--steps", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "Training step — tiny" in text and "Prediction throughput" in text
    for method in ("| lorta |", "| lora |", "| full |"):
        assert method in text, method  # every method ran (no out-of-memory note on the CPU)

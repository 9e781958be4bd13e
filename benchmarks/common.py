"""Shared benchmark machinery: interleaved timing, peak memory in a fresh process, machine facts, tables.

Timing rule used everywhere: the variants being compared live in one process and are run in
interleaved rounds (round i starts at variant i mod n), so drift from other load on the machine hits
every variant alike. A ratio A/B is the median over rounds of (t_A / t_B) of the same round.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- timing
@dataclass
class Timings:
    """Seconds per call for each variant, one entry per interleaved round (warm-up excluded)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of t_a / t_b (paired, so slow rounds cancel)."""
        pairs = [ta / tb for ta, tb in zip(self.seconds[a], self.seconds[b])]
        return statistics.median(pairs)

    def spread(self, name: str) -> float:
        """Relative half-range of the middle half of the samples (a rough noise figure)."""
        xs = sorted(self.seconds[name])
        if len(xs) < 4:
            return (xs[-1] - xs[0]) / (2 * statistics.median(xs))
        q1, q3 = xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
        return (q3 - q1) / (2 * statistics.median(xs))


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> Timings:
    """Run every call `warmup` times (untimed), then `repeats` interleaved timed rounds."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    synchronize(device)
    out = Timings({name: [] for name in names})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            out.seconds[name].append(time.perf_counter() - start)
        if progress is not None:
            progress(f"round {round_index + 1}/{repeats}")
    return out


# --------------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status: {key}: not found")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a code block, in MiB: CUDA allocator peak on GPU, VmHWM (RSS high-water) on CPU.

    `baseline_mb` is what was resident when the block started (weights, optimizer not yet stepped);
    `peak_mb` the high-water mark inside the block; `delta_mb = peak_mb - baseline_mb`.
    On CPU the high-water mark is per process, so use one fresh process per variant (`run_worker`).
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.baseline_mb = self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
        else:
            if not reset_peak_rss():
                raise RuntimeError("/proc/self/clear_refs: cannot reset VmHWM; CPU peak memory unavailable")
            self.baseline_mb = _status_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = _status_kib("VmHWM") / 1024

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.baseline_mb


def step_memory(step, steps: int, device: str) -> dict:
    """Run ``step`` ``steps`` times inside PeakMemory; dict(peak_mb, delta_mb)."""
    with PeakMemory(device) as mem:
        for _ in range(steps):
            step()
    return {"peak_mb": mem.peak_mb, "delta_mb": mem.delta_mb}


class WorkerFailed(RuntimeError):
    """A fresh-process measurement exited non-zero; ``summary`` is a short reason for a table cell."""

    def __init__(self, module: str, payload: dict, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        killed = " (killed by signal 9: out of memory?)" if returncode == -9 else ""
        self.summary = f"worker exit {returncode}{killed}"
        super().__init__(f"{module} {self.summary} ({payload}):\n{stderr[-3000:]}")


def run_worker(module: str, payload: dict, timeout: float = 1800) -> dict:
    """Run `python -m <module> --worker '<json>'` in a fresh process and return the JSON it prints last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(payload)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise WorkerFailed(module, payload, proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- machine
def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: str = "cpu") -> dict[str, str]:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "fair-esm": _version("fair-esm"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def info_block(info: dict[str, str], command: str, load_before: str, load_after: str) -> str:
    lines = [f"- command: `{command}`"]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines.append(f"- load average (1/5/15 min) before: {load_before}; after: {load_after}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- tables
def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, op: str, target: float) -> str:
    """'met' / 'missed' for a goal written as `value op target` with op in {'<=', '>='}."""
    if op == "<=":
        return "met" if value <= target else "missed"
    if op == ">=":
        return "met" if value >= target else "missed"
    raise ValueError(f"goal operator: {op!r}: expected '<=' or '>='")


@dataclass
class Section:
    """One block of docs/benchmarks.md: a title, a table, and free text (notes, how it was run)."""

    title: str
    table: str
    notes: list[str] = field(default_factory=list)
    rows: list[list[object]] = field(default_factory=list)  # raw rows, for tests
    headers: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"### {self.title}", "", self.table]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(parts) + "\n"


def make_section(title: str, headers: list[str], rows: list[list[object]], notes: list[str] | None = None) -> Section:
    return Section(title, md_table(headers, rows), list(notes or []), rows, headers)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_main(description: str, worker: Callable[[dict], dict],
               sections: Callable[[argparse.Namespace], Sequence["Section"]],
               argv: list[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Command line shared by the benchmark modules: `--worker JSON` runs one measurement in this (fresh)
    process and prints its JSON result for `run_worker`; otherwise the module's tables are printed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    torch.set_num_threads(args.threads)
    for section in sections(args):
        print(section.markdown())
    return 0

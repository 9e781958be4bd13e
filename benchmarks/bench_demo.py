"""Wall time of `make demo` on this machine, split into the install and the workflow.

A temporary copy of the working tree (tracked + untracked-not-ignored files, i.e. what a clone of the
next commit holds; no .venv, no results) gets a clean `make install` (fresh venv; the pip cache and the
configured wheelhouse are allowed), then `make demo` runs the workflow (install is then a no-op).

Run alone: `python -m benchmarks.bench_demo [--keep] [--cores 2]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, Section, load_average, log, make_section


def copy_worktree(dest: Path) -> int:
    """Copy the files git would put in a clone of the working tree (incl. not-yet-committed ones)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
    count = 0
    for rel in filter(None, listing.split("\0")):
        src = REPO_ROOT / rel
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        count += 1
    return count


def timed(cmd: list[str], cwd: Path, log_path: Path, timeout: float) -> tuple[float, int]:
    """Run `cmd`, send its output to `log_path`; returns (seconds, exit code)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # the venv's bin must not shadow `python3` for the fresh `python3 -m venv`
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p)
    start = time.perf_counter()
    with open(log_path, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return time.perf_counter() - start, code


def demo_available(root: Path = REPO_ROOT) -> bool:
    return (root / "pipeline" / "demo.py").is_file()


def run(cores: int = 2, keep: bool = False, timeout: float = 3600) -> list[Section]:
    workdir = Path(tempfile.mkdtemp(prefix="foldtune-demo-bench-"))
    rows: list[list[object]] = []
    notes = [f"temporary copy of the working tree in {workdir} ({'kept' if keep else 'deleted afterwards'})",
             f"load average before: {load_average()}"]
    try:
        files = copy_worktree(workdir)
        log(f"copied {files} files to {workdir}; timing `make install`")
        install_s, code = timed(["make", "install"], workdir, workdir / "install.log", timeout)
        rows.append(["make install (fresh venv, pip cache + wheelhouse allowed)", f"{install_s:.0f}",
                     "ok" if code == 0 else f"failed (exit {code})"])
        if code != 0:
            notes.append("install log tail: " + (workdir / "install.log").read_text()[-800:].replace("\n", " ⏎ "))
        if not demo_available(workdir):
            rows.append([f"workflow (make demo CORES={cores})", "not measured yet",
                         "pipeline/demo.py does not exist yet"])
        elif code == 0:
            log("timing the demo workflow")
            demo_s, demo_code = timed(["make", "demo", f"CORES={cores}"], workdir, workdir / "demo.log", timeout)
            rows.append([f"workflow (make demo CORES={cores}, install already done)", f"{demo_s:.0f}",
                         "ok" if demo_code == 0 else f"failed (exit {demo_code})"])
            if demo_code == 0:
                rows.append(["total make demo from a clean checkout", f"{install_s + demo_s:.0f}", ""])
            else:
                notes.append("demo log tail: " + (workdir / "demo.log").read_text()[-800:].replace("\n", " ⏎ "))
    finally:
        notes.append(f"load average after: {load_average()}")
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return [make_section("`make demo` wall time", ["phase", "seconds", "status"], rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (and its logs)")
    args = parser.parse_args(argv)
    for section in run(args.cores, args.keep):
        print(section.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: run the whole workflow on the bundled structures and show where the report is.

    python -m pipeline.demo --config configs/demo.yaml --cores 2

Runs Snakemake (fetch -> prepare -> split -> base -> train x methods -> predict -> score -> report) with the
local workflow profile, then prints the wall time, the report's paths and its headline table. A second run
only redoes what changed (Snakemake compares outputs, code and parameters).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "snakemake" / "Snakefile"
PROFILE = REPO / "snakemake" / "profiles" / "local"


# The demo's console table: the report's columns that fit a terminal.
SHOWN = ("group", "method", "rank", "trainable params", "own params", "TM-score (mean ± sd)", "lDDT", "steps",
         "TM gain vs base", "chains improved", "gain vs head only")


def snakemake_command(config: Path, cores: int, extra: list[str]) -> list[str]:
    """The Snakemake command line; model jobs use one torch thread each, so `cores` of them run at once."""
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--configfile", str(config),
            "--workflow-profile", str(PROFILE), "--cores", str(cores), "--resources", f"gpu={cores}", *extra]


def working_dir(extra: list[str]) -> Path:
    """Where Snakemake keeps `.snakemake/` (its locks): `--directory`/`-d` among the extra arguments, else REPO."""
    for index, arg in enumerate(extra):
        if arg in ("--directory", "-d") and index + 1 < len(extra):
            return Path(extra[index + 1]).resolve()
        if arg.startswith("--directory="):
            return Path(arg.split("=", 1)[1]).resolve()
    return REPO


def left_locks(workdir: Path) -> bool:
    """Snakemake removes its locks when it ends, also on failure: locks left after it ended belong to another
    run on the directory, or to one that was killed (kill -9, power loss)."""
    locks = workdir / ".snakemake" / "locks"
    return locks.is_dir() and any(locks.iterdir())


def _run(command: list[str], env: dict) -> tuple[int, bool]:
    """(exit code, interrupted): Ctrl-C reaches Snakemake too (same process group), which stops its jobs and
    exits; wait for that instead of leaving it behind. A second Ctrl-C stops it at once."""
    process = subprocess.Popen(command, env=env, cwd=REPO)
    try:
        return process.wait(), False
    except KeyboardInterrupt:
        try:
            return process.wait(), True
        except KeyboardInterrupt:
            process.kill()
            return process.wait(), True


def experiment_dir(config: Path) -> Path:
    data = yaml.safe_load(config.read_text()) or {}
    return Path(data.get("results_dir", "results")) / str(data.get("experiment", "demo"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", type=Path)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("snakemake_args", nargs="*", help="passed to snakemake after `--` (e.g. -- --forceall)")
    args = parser.parse_args(argv)
    if not args.config.exists():
        print(f"demo: {args.config}: config not found")
        return 2
    env = dict(os.environ)
    # The rules call `foldtune`: make this interpreter's console scripts (the .venv) win on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = snakemake_command(args.config, args.cores, args.snakemake_args)
    print("demo:", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    code, interrupted = _run(command, env)
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    wall = f"{int(minutes)} min {seconds:.0f} s"
    workdir = working_dir(args.snakemake_args)
    exp = experiment_dir(args.config)
    exp = exp if exp.is_absolute() else workdir / exp
    rerun = " ".join(["python -m pipeline.demo", *(sys.argv[1:] if argv is None else argv)])
    if code != 0 and left_locks(workdir):
        unlock = " ".join(snakemake_command(args.config, args.cores, [*args.snakemake_args, "--unlock"])[2:])
        print(f"\ndemo: {workdir} is locked by another Snakemake run, or by one that was killed. If none is "
              f"running, unlock it and rerun:\n  python -m {unlock}\n  {rerun}")
        return code or 1
    if interrupted:
        print(f"\ndemo: interrupted (Ctrl-C) after {wall}; rerun to continue (finished steps are kept, an "
              f"interrupted training run resumes from its last checkpoint):\n  {rerun}")
        return 130
    if code != 0:
        print(f"\ndemo: snakemake failed (exit {code}) after {wall}; logs under {exp}/logs/ "
              f"(a rerun resumes: finished steps are kept)")
        return code
    summary_csv = exp / "summary.csv"
    print(f"\ndemo: finished in {wall}")
    print(f"  report: {exp / 'report.html'}  (and report.md, summary.csv, per_target.csv, plots/)")
    if summary_csv.exists():
        import pandas as pd

        from pipeline.report import display_table

        report = (yaml.safe_load((exp / "workflow_config.yaml").read_text()) or {}).get("report", {}) \
            if (exp / "workflow_config.yaml").exists() else {}
        summary = pd.read_csv(summary_csv, dtype={"group": str, "targets": str, "part": str}).fillna(
            {"targets": "", "part": "", "group": ""})
        gain_split = report.get("gain_split")
        splits = [gain_split] if gain_split in set(summary.split) else []
        splits += [s for s in dict.fromkeys(summary.split) if s not in splits]
        for split in splits:
            with_gain = bool(summary[summary.split == split].tm_gain.notna().any())
            print(f"\nsplit {split}" + (" (the chains the adapters were fine-tuned on)" if split == gain_split
                                        else " (held out)" if gain_split else "") + ":")
            table = display_table(summary, split, with_gain)
            print(table[[c for c in table.columns if c in SHOWN]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

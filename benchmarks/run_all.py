"""Run every foldtune benchmark and write docs/benchmarks.md.

    make bench                                   # = python benchmarks/run_all.py
    python benchmarks/run_all.py --quick         # whole suite on tiny shapes (< 2 min), smoke test
    python benchmarks/run_all.py --gpu           # GPU shapes (ESM-2 650M/3B, ESMFold v1), needs CUDA
    python benchmarks/run_all.py --only adapters folding --out docs/benchmarks.md

The hand-written analysis between `<!-- analysis:begin -->` and `<!-- analysis:end -->` in the output
file is kept across runs; everything else is regenerated. `--quick` writes to .bench/ unless `--out`
is given, so a smoke run never overwrites the measured numbers.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import REPO_ROOT, Section, info_block, load_average, log, machine_info  # noqa: E402

SUITES = ("adapters", "folding", "metrics", "demo", "memory")
ANALYSIS_BEGIN, ANALYSIS_END = "<!-- analysis:begin -->", "<!-- analysis:end -->"
QUIET_LOAD = 1.5


def wait_for_quiet(max_wait_s: float, threshold: float = QUIET_LOAD, poll_s: float = 120) -> str:
    """Sleep until the 1-min load average is below `threshold` (or `max_wait_s` passed); returns a note."""
    waited = 0.0
    while True:
        one_minute = float(load_average().split()[0])
        if one_minute < threshold:
            return f"waited {waited:.0f} s for 1-min load < {threshold} (was {one_minute:.2f} at start)"
        if waited >= max_wait_s:
            return f"machine not quiet after {waited:.0f} s (1-min load {one_minute:.2f}); measured anyway"
        log(f"1-min load {one_minute:.2f} >= {threshold}; waiting {poll_s:.0f} s")
        time.sleep(poll_s)
        waited += poll_s


def metrics_sections(quick: bool, metrics_args: tuple[str, ...] = ()) -> list[Section]:
    """The metrics contributor's benchmarks/bench_metrics.py (`--out FILE [--pairs N] [--rounds R]`),
    run as a script; the markdown it writes becomes this section."""
    script = REPO_ROOT / "benchmarks" / "bench_metrics.py"
    title = "Structure metrics: foldtune batch scoring vs TMscore (benchmarks/bench_metrics.py)"
    if not script.is_file():
        return [Section(title, "not measured yet: benchmarks/bench_metrics.py does not exist yet")]
    out = REPO_ROOT / ".bench" / "bench_metrics.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--out", str(out)] + (["--pairs", "4", "--rounds", "1"] if quick else list(metrics_args))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    shown = ["benchmarks/bench_metrics.py"] + [shlex.quote(c) for c in cmd[2:]]
    notes = [f"command: `python {' '.join(shown)}` (exit {proc.returncode})"]
    text = out.read_text() if out.is_file() else proc.stdout
    # its own headings become level 4, so they never split this document's `## ` suite blocks
    body = "\n".join("####" + line.lstrip("#") if line.startswith("#") else line
                      for line in text.strip().splitlines()) or "(no output)"
    if proc.returncode != 0:
        notes.append("stderr tail: " + proc.stderr.strip()[-1500:].replace("\n", " ⏎ "))
    return [Section(title, body, notes)]


def memory_sections(quick: bool, memory_args: tuple[str, ...] = ()) -> list[Section]:
    """benchmarks/bench_memory_plan.py (ESMFold v1 widths, fresh process per point; ~10-20 CPU minutes, or
    `--memory-args '--reuse .bench/memory_plan.md'` to refit earlier measurements); it also writes
    pipeline/memory_plan.json, which `foldtune train --dry-run` reads. Skipped by --quick."""
    title = "ESMFold v1 memory plan (benchmarks/bench_memory_plan.py)"
    if quick:
        return [Section(title, "skipped in --quick (one fresh process per point at ESMFold v1 widths)")]
    out = REPO_ROOT / ".bench" / "memory_plan.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.bench_memory_plan", "--out", str(out), "--json",
           "pipeline/memory_plan.json", *memory_args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    notes = [f"command: `python {' '.join(shlex.quote(c) for c in cmd[1:])}` (exit {proc.returncode})"]
    text = out.read_text() if out.is_file() and proc.returncode == 0 else proc.stdout
    body = "\n".join("####" + line.lstrip("#") if line.startswith("#") else line
                      for line in text.strip().splitlines()) or "(no output)"
    if proc.returncode != 0:
        notes.append("stderr tail: " + proc.stderr.strip()[-1500:].replace("\n", " ⏎ "))
    return [Section(title, body, notes)]


def gpu_placeholder(what: str) -> Section:
    return Section(f"{what} — GPU", "not run: no GPU (run `make bench BENCH_ARGS=--gpu` on a CUDA machine)")


def run_suite(name: str, gpu: bool, quick: bool, metrics_args: tuple[str, ...] = (),
              adapter_tables: tuple[str, ...] = ("steps", "ratios", "dense", "merged"), reduced: bool = False,
              memory_args: tuple[str, ...] = ()) -> list[Section]:
    if name == "adapters":
        from benchmarks import bench_adapters

        sections = bench_adapters.run(gpu=gpu, quick=quick, only=adapter_tables, reduced=reduced)
        gpu_note = [gpu_placeholder("ESM-2 650M / 3B adapter tables")] if "steps" in adapter_tables else []
        return sections if gpu or quick else sections + gpu_note
    if name == "folding":
        from benchmarks import bench_folding

        sections = bench_folding.run(gpu=gpu, quick=quick)
        if not gpu:
            sections.append(gpu_placeholder("ESMFold v1 shape (3B stem, 48 blocks), crop 256, bf16 + checkpointing"))
        return sections
    if name == "metrics":
        return metrics_sections(quick, metrics_args)
    if name == "memory":
        return memory_sections(quick, memory_args)
    if name == "demo":
        if quick:
            return [Section("`make demo` wall time", "skipped in --quick (a clean install takes minutes)")]
        from benchmarks import bench_demo

        return bench_demo.run()
    raise ValueError(f"--only: {name!r}: expected one of {', '.join(SUITES)}")


TITLES = {"adapters": "1. Adapter training step (ESM-2 shapes)", "folding": "2. Folding training step",
          "metrics": "3. Structure metrics", "demo": "4. Pipeline: `make demo`",
          "memory": "5. ESMFold v1 memory plan (CPU-measured, extrapolated)"}


def render(blocks: dict[str, str], header: str, analysis: str) -> str:
    parts = ["# foldtune benchmarks", "",
             "Generated by `benchmarks/run_all.py` (`make bench`); the analysis section is hand-written and kept "
             "across runs. Ratios compare variants timed in one process in interleaved rounds (median over "
             "rounds of t_A/t_B), so load from other processes hits both sides alike.", "",
             "## Environment (latest run)", "", header, ""]
    for name in SUITES:
        if name in blocks:
            parts += [f"## {TITLES[name]}", "", blocks[name].strip(), ""]
    parts += ["## Analysis", "", ANALYSIS_BEGIN, analysis.strip(), ANALYSIS_END, ""]
    return "\n".join(parts)


def existing_blocks(path: Path) -> tuple[dict[str, str], str]:
    """Suite blocks and the analysis of a previous output, so a partial `--only` run keeps the rest."""
    if not path.is_file():
        return {}, "(not written yet)"
    text = path.read_text()
    analysis = "(not written yet)"
    if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
        analysis = text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0]
    blocks = {}
    for name, title in TITLES.items():
        heading = f"## {title}\n"
        if heading in text:
            body = text.split(heading, 1)[1]
            blocks[name] = body.split("\n## ", 1)[0]
    return blocks, analysis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="GPU shapes (needs CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, whole suite in < 2 min")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown output (default docs/benchmarks.md; .bench/benchmarks_quick.md with --quick)")
    parser.add_argument("--only", nargs="*", choices=SUITES, default=list(SUITES))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help=f"first wait up to SECONDS for the 1-min load average to drop below {QUIET_LOAD}")
    parser.add_argument("--reduced", action="store_true",
                        help="busy machine: CPU adapter tables at half the batch (B=4 / B=1) and 3 rounds")
    parser.add_argument("--adapter-tables", nargs="+", choices=("steps", "dense", "merged", "ratios"),
                        default=["steps", "ratios", "dense", "merged"], help="which adapter tables to run")
    parser.add_argument("--merge-from", nargs="*", type=Path, default=[], metavar="MD",
                        help="copy the suite blocks of earlier outputs (e.g. suites run in parallel into "
                             "separate files) into --out before writing; suites run now take precedence")
    parser.add_argument("--metrics-args", default="",
                        help="extra arguments for benchmarks/bench_metrics.py, e.g. '--rounds 1'")
    parser.add_argument("--memory-args", default="",
                        help="extra arguments for benchmarks/bench_memory_plan.py, e.g. '--reuse .bench/memory_plan.md'")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch.cuda.is_available() is False on this machine")
    out = args.out or REPO_ROOT / (".bench/benchmarks_quick.md" if args.quick else "docs/benchmarks.md")
    torch.set_num_threads(args.threads)

    quiet_note = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else "no wait for a quiet machine requested"
    command = "python benchmarks/run_all.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    device = "cuda" if args.gpu else "cpu"
    load_start = load_average()
    blocks, analysis = existing_blocks(out)
    merged: set[str] = set()
    for other in args.merge_from:  # same suite in several files (tables run in parallel): concatenate
        for name, text in existing_blocks(other)[0].items():
            blocks[name] = blocks[name].rstrip() + "\n\n" + text.strip() if name in merged else text
            merged.add(name)
    for name in args.only:
        before = load_average()
        start = time.perf_counter()
        log(f"suite {name}")
        sections = run_suite(name, args.gpu, args.quick, tuple(shlex.split(args.metrics_args)),
                             tuple(args.adapter_tables), args.reduced, tuple(shlex.split(args.memory_args)))
        meta = (f"_{machine_info(device)['date']}: `{command.strip()}`; torch threads {torch.get_num_threads()}; "
                f"suite wall time "
                f"{time.perf_counter() - start:.0f} s; load average (1/5/15 min) before {before}, after "
                f"{load_average()}_")
        blocks[name] = "\n".join([meta, ""] + [section.markdown() for section in sections])
    header = info_block(machine_info(device), command.strip(), load_start, load_average()) + f"\n- {quiet_note}"
    if args.quick:
        header += "\n- **--quick: tiny shapes, smoke test only; these numbers mean nothing**"

    from data.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(blocks, header, analysis))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

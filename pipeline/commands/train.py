"""`foldtune train`: fine-tune a folding model or an ESM-2 language model with an adapter."""

from __future__ import annotations

import argparse
import sys

HELP = "fine-tune a folding model (kind: fold) or ESM-2 masked LM (kind: lm) with an adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (docs/training.md)")
    parser.add_argument("--section", help="read the mapping under this top-level key of the file")
    parser.add_argument("--resume", action="store_true", help="continue OUTPUT_DIR/checkpoints/last.ckpt")
    parser.add_argument("--rerun", action="store_true",
                        help="resume OUTPUT_DIR's run if it was started with this same config and inputs, else move "
                             "it aside to OUTPUT_DIR.replaced/ and start clean (what the workflow runs)")
    parser.add_argument("--deadline", metavar="auto|SECONDS",
                        help="stop (checkpointed, exit 4, no summary.json) at this wall time: SECONDS from now, or "
                             "`auto` = before the time limit of the SLURM job this runs in (none outside SLURM)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the predicted step peak memory (ESMFold v1 shapes, pipeline/memory_plan.py) and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, values parsed as YAML (adapter.rank=4 trainer.recycles=[0,3])")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(args.config, section=args.section, overrides=args.overrides)
    except ConfigError as exc:
        print(f"foldtune train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from pipeline.memory_plan import estimate

    predicted_gb, memory_line = estimate(cfg)
    if args.dry_run:
        print(memory_line)
        return 0
    warn_if_over_gpu_memory(predicted_gb, memory_line)

    try:
        deadline = resolve_deadline(args.deadline)
    except ValueError as exc:
        print(f"foldtune train: --deadline: {exc}", file=sys.stderr)
        return 2
    if args.rerun and args.resume:
        print("foldtune train: --rerun decides whether to resume by itself; pass it without --resume", file=sys.stderr)
        return 2

    from pipeline.models import ModelSourceError
    from pipeline.train import prepare_rerun, train

    try:
        resume = prepare_rerun(cfg) if args.rerun else args.resume
        result = train(cfg, resume=resume, deadline=deadline)
    except (KeyboardInterrupt, SystemExit):  # Lightning ends its graceful Ctrl-C shutdown with sys.exit(1)
        print(f"foldtune train: interrupted (Ctrl-C); the run continues from {cfg['output_dir']}/checkpoints/"
              "last.ckpt with --resume (or --rerun), when it has one", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"foldtune train: {exc.filename or cfg['output_dir']}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ConfigError, ModelSourceError, ValueError) as exc:
        print(f"foldtune train: {exc}", file=sys.stderr)
        return 2
    summary = result.summary
    if summary["status"] == "stopped_at_deadline":
        print(f"foldtune train: stopped at the deadline at step {summary['steps']} of {cfg['trainer']['max_steps']}; "
              f"checkpointed: {result.run_dir}/checkpoints/last.ckpt (rerun with --rerun or --resume to continue)",
              file=sys.stderr)
        return 4
    if result.aborted:
        print(f"foldtune train: aborted after {cfg['trainer']['max_bad_steps']} non-finite losses in a row at "
              f"step {summary['steps']} (chains: {', '.join(summary.get('nonfinite_chains') or []) or '?'}); "
              f"last good checkpoint: {result.run_dir}/checkpoints/last.ckpt",
              file=sys.stderr)
        return 3
    if summary.get("nonfinite_batches"):
        print(f"foldtune train: {summary['nonfinite_batches']} batch(es) skipped for a non-finite loss or gradient, "
              f"chains: {', '.join(summary['nonfinite_chains'])} (check their coordinates; summary.json lists them)",
              file=sys.stderr)
    print(f"train: {summary['method']} {summary['trainable_params']:,} / {summary['total_params']:,} trainable; "
          f"{summary['steps']} steps in {summary['train_seconds']:.1f} s; final loss {summary['final_train_loss']}; "
          f"best val TM {summary['best_val_tm_score']} -> {result.run_dir}")
    return 0


def warn_if_over_gpu_memory(predicted_gb: float | None, memory_line: str) -> bool:
    """One warning line on stderr when the predicted step peak exceeds the visible GPU's memory; returns it."""
    if predicted_gb is None:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if predicted_gb <= total_gb:
        return False
    print(f"foldtune train: warning: {memory_line} > {total_gb:.0f} GB on {torch.cuda.get_device_name(0)}; "
          "consider trainer.grad_checkpointing=true, adapter.part=trunk or a smaller data.crop_size", file=sys.stderr)
    return True


def _slurm_seconds(text: str) -> float | None:
    """squeue's %L (time left): [days-]hours:minutes:seconds, minutes:seconds, or UNLIMITED/NOT_SET."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def resolve_deadline(value: str | None) -> float | None:
    """--deadline -> epoch seconds (None: no deadline). `auto` asks squeue for the current SLURM job's time
    left and keeps a margin (5 %, 30 s to 5 min) for the last checkpoint and the exit."""
    import os
    import subprocess
    import time

    if value is None:
        return None
    if value != "auto":
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{value!r}: expected `auto` or a number of seconds") from None
        if not seconds > 0:
            raise ValueError(f"{value!r}: must be > 0 seconds")
        return time.time() + seconds
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        left = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        print(f"foldtune train: --deadline auto: squeue did not answer for job {job}; no deadline", file=sys.stderr)
        return None
    seconds = _slurm_seconds(left)
    if seconds is None:
        return None
    return time.time() + seconds - min(300.0, max(30.0, 0.05 * seconds))

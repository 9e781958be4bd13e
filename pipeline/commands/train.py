"""`foldtune train`: fine-tune a folding model or an ESM-2 language model with an adapter."""

from __future__ import annotations

import argparse
import sys

HELP = "fine-tune a folding model (kind: fold) or ESM-2 masked LM (kind: lm) with an adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (docs/training.md)")
    parser.add_argument("--section", help="read the mapping under this top-level key of the file")
    parser.add_argument("--resume", action="store_true", help="continue OUTPUT_DIR/checkpoints/last.ckpt")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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

    from pipeline.models import ModelSourceError
    from pipeline.train import train

    try:
        result = train(cfg, resume=args.resume)
    except (ConfigError, ModelSourceError, ValueError) as exc:
        print(f"foldtune train: {exc}", file=sys.stderr)
        return 2
    summary = result.summary
    if result.aborted:
        print(f"foldtune train: aborted after {cfg['trainer']['max_bad_steps']} non-finite losses in a row at "
              f"step {summary['steps']}; last good checkpoint: {result.run_dir}/checkpoints/last.ckpt",
              file=sys.stderr)
        return 3
    print(f"train: {summary['method']} {summary['trainable_params']:,} / {summary['total_params']:,} trainable; "
          f"{summary['steps']} steps in {summary['train_seconds']:.1f} s; final loss {summary['final_train_loss']}; "
          f"best val TM {summary['best_val_tm_score']} -> {result.run_dir}")
    return 0

"""`foldtune import-peft`: turn a peft LoRA adapter into a foldtune run directory (`predict --run` reads it)."""

from __future__ import annotations

import argparse
import sys

HELP = "make a foldtune run directory from a peft LoRA adapter directory and a training config (its base)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="peft adapter directory (adapter_config.json with peft_type)")
    parser.add_argument("--config", required=True, help="training config whose model section builds the adapter's base")
    parser.add_argument("--section", help="read the mapping under this top-level key of the file")
    parser.add_argument("--out", required=True, help="run directory to write (config.yaml + adapter/)")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, section=args.section)
        from pipeline import export

        out = export.import_peft(args.adapter, cfg, args.out)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"foldtune import-peft: {exc}", file=sys.stderr)
        return 2
    print(f"import-peft: {args.adapter} -> {out} (foldtune predict --run {out} ...)")
    return 0

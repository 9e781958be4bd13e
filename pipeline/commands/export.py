"""`foldtune export`: a run's LoRA adapter in peft's format, or (--merged) the merged model for transformers."""

from __future__ import annotations

import argparse
import sys

HELP = "export a run: its LoRA adapter in peft's format, or --merged: a plain transformers ESMFold directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory (RUN/config.yaml + RUN/adapter/)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--merged", action="store_true",
                        help="fold the adapter into the weights: EsmForProteinFolding.from_pretrained(OUT) loads it")


def run(args: argparse.Namespace) -> int:
    import warnings

    from pipeline import export

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            if args.merged:
                report = export.export_merged(args.run, args.out)
                message = (f"export: merged {report['adapted_weights']} adapted weights "
                           f"(update loss {report['update_relative_loss']:.2e} in {report['dtypes']})")
            else:
                export.export_peft(args.run, args.out)
                message = "export: peft LoRA adapter (PeftModel.from_pretrained(base, OUT))"
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"foldtune export: {exc}", file=sys.stderr)
        return 2
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning) and "export --merged" in str(warning.message):
            print(f"foldtune {warning.message}", file=sys.stderr)
    print(f"{message} -> {args.out}")
    return 0

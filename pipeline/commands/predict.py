"""`foldtune predict`: fold a dataset split or a FASTA file with a run's model (or a baseline)."""

from __future__ import annotations

import argparse
import sys

HELP = "fold sequences / a dataset split with a (fine-tuned) model; writes PDBs + predictions.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", nargs="+", metavar="RUN",
                       help="training run directory (RUN/config.yaml + RUN/adapter/); several runs on one base "
                            "build the base once and switch adapters (--out then holds {run}, or gets RUN names)")
    model.add_argument("--base-config", help="training config: fold with its untuned base model")
    model.add_argument("--baseline", choices=["ideal-helix"], help="no model: a structure baseline")
    parser.add_argument("--section", help="with --base-config: top-level key holding the training config")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--dataset", help="dataset directory written by `foldtune prepare`")
    inputs.add_argument("--fasta", help="FASTA file of single chains (numbered 1..L)")
    parser.add_argument("--splits", help="splits CSV (with --split)")
    parser.add_argument("--split", help="fold only the chains of this split")
    parser.add_argument("--out", required=True,
                        help="output directory for <chain_id>.pdb + predictions.csv; with several runs a template "
                             "with {run} (the run directory's name), else OUT/<run name>")
    parser.add_argument("--merged", action="store_true", help="merge the adapter into the weights first")
    parser.add_argument("--force", action="store_true",
                        help="load an adapter even if it was recorded on another base (fingerprint differs)")
    parser.add_argument("--sequence", choices=["full", "observed"], default="full",
                        help="with --dataset: fold each chain's deposited sequence (default) or only its observed "
                             "residues (author numbers as position ids, the behaviour before full-length chains)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch (B x Lmax)")
    parser.add_argument("--chunk-size", type=int,
                        help="rows per chunk of the trunk's axial attention (memory ~O(L)); default 128 for batches "
                             "with a chain longer than 512 residues, else none")
    parser.add_argument("--num-recycles", type=int,
                        help="n recycles = n + 1 trunk passes; default as upstream ESMFold: max_recycles passes")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: stem, trunk and heads under bf16 autocast, the structure module in fp32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", action="store_true")


def run_out_dirs(runs: list[str], out: str) -> list[str]:
    """One output directory per run: `out` itself for one run, `out` with {run} filled in, or out/<name>."""
    from pathlib import Path

    names = [Path(run).resolve().name for run in runs]
    if "{run}" in out:
        outs = [out.replace("{run}", name) for name in names]
    elif len(runs) == 1:
        outs = [out]
    else:
        outs = [str(Path(out) / name) for name in names]
    if len(set(outs)) != len(outs):
        raise ValueError(f"--out: {out}: several runs would write the same directory (runs with one name?)")
    return outs


def device_error(args: argparse.Namespace) -> str | None:
    """Why `--device` cannot be used here, as `--device value: why`, or None (checked before any file is read;
    the other options: `predict.check_fold_options`)."""
    import re

    import torch

    device = args.device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device not in ("auto", "cpu") and not match:
        return f"--device {device}: expected auto, cpu, cuda or cuda:N"
    if match:
        if not torch.cuda.is_available():
            return (f"--device {device}: CUDA is not available (torch {torch.__version__} sees no GPU); "
                    "use --device cpu or auto")
        index, count = int(match.group(1) or 0), torch.cuda.device_count()
        if index >= count:
            return f"--device {device}: there are {count} CUDA device(s) (0..{count - 1})"
    return None


def run(args: argparse.Namespace) -> int:
    import time

    import pandas as pd
    import torch

    from pipeline import predict

    problem = device_error(args)
    if problem:
        print(f"foldtune predict: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        predict.check_fold_options(args.chunk_size, args.num_recycles, args.precision, args.max_tokens)
        if args.dataset:
            targets = predict.targets_from_dataset(args.dataset, args.splits, args.split)
            targets = predict.select_sequence(targets, args.sequence)
        else:
            if args.split:
                raise ValueError("--split: only with --dataset")
            targets = predict.targets_from_fasta(args.fasta)
        if not targets:
            raise ValueError("nothing to predict")
        if args.baseline:
            table = predict.predict_baseline(targets, args.out)
        else:
            device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
            if args.run:
                outs = run_out_dirs(args.run, args.out)
                tables = predict.predict_runs(args.run, targets, outs, device=device, merged=args.merged,
                                              force=args.force, max_tokens=args.max_tokens,
                                              chunk_size=args.chunk_size, num_recycles=args.num_recycles,
                                              precision=args.precision, progress=not args.no_progress)
                table = pd.concat(tables, ignore_index=True)
            else:
                from pipeline.config import load_config

                cfg = load_config(args.base_config, section=args.section)
                model = predict.load_base_model(cfg).eval()
                model.to(device)
                warning = predict.recycles_warning(cfg, model, args.num_recycles, args.base_config, trained=False)
                if warning:
                    print(warning, file=sys.stderr)
                table = predict.predict_targets(model, targets, args.out, max_tokens=args.max_tokens,
                                                chunk_size=args.chunk_size, num_recycles=args.num_recycles,
                                                precision=args.precision, progress=not args.no_progress)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"foldtune predict: {exc}", file=sys.stderr)
        return 2
    print(f"predict: {len(table)} predictions, mean pLDDT {table['mean_plddt'].mean():.1f} -> {args.out} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0

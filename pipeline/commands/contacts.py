"""`foldtune contacts`: contact precision of a language-model run (or a base ESM-2) on a dataset split.

    foldtune contacts --run RUN --dataset DATASET --splits splits.csv --split test --out contacts/RUN/test.csv
    foldtune contacts --esm2 esm2_t12_35M_UR50D --dataset DATASET --out base.csv

Writes OUT (one row per chain: P@L, P@L/2, P@L/5 for short 6-11, medium 12-23 and long >= 24 separations,
Cβ < 8 Å contacts, CA for glycine) and OUT with suffix .json (means over chains). Needs the release's
contact regression (`<name>-contact-regression.pt`); without it no precision is reported.
"""

from __future__ import annotations

import argparse
import sys

HELP = "contact precision (P@L, L/2, L/5; short/medium/long range) of a language-model run on a dataset split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", help="kind lm training run directory (RUN/config.yaml + RUN/adapter/)")
    model.add_argument("--esm2", help="an untuned base: fair-esm ESM-2 release name or local .pt")
    parser.add_argument("--dataset", required=True, help="dataset directory written by `foldtune prepare`")
    parser.add_argument("--splits", help="splits CSV (with --split)")
    parser.add_argument("--split", help="evaluate only the chains of this split")
    parser.add_argument("--out", required=True, help="per-chain CSV; the summary goes next to it as .json")
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch (B x Lmax)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", action="store_true")


def _chains(dataset: str, splits: str | None, split: str | None) -> dict:
    from data.chains import chain_path, load_chain, read_manifest
    from pipeline.train import read_split

    if bool(splits) != bool(split):
        raise ValueError("--splits and --split go together")
    ids = read_split(splits, split) if split else list(read_manifest(dataset)["chain_id"])
    if not ids:
        raise ValueError(f"--split: no chains with split {split!r} in {splits}")
    return {chain_id: load_chain(chain_path(dataset, chain_id)) for chain_id in ids}


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from data.io import atomic_path, atomic_write_text
    from pipeline import lm

    started = time.perf_counter()
    try:
        chains = _chains(args.dataset, args.splits, args.split)
        if args.run:
            model, cfg = lm.load_lm_run(args.run)
            source = {"run": str(args.run), "method": cfg["adapter"]["method"]}
            what = f"--run {args.run}: model.esm2"
        else:
            model = lm.build_language_model({"esm2": args.esm2}).eval()
            source = {"esm2": args.esm2, "method": "none"}
            what = f"--esm2 {args.esm2}"
        lm.require_contact_regression(model, what)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model.to(device)
        table = lm.evaluate_contacts(model, chains, max_tokens=args.max_tokens, progress=not args.no_progress)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        summary = {**source, "dataset": str(args.dataset), "split": args.split, **lm.summarize_contacts(table)}
        atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"foldtune contacts: {exc}", file=sys.stderr)
        return 2
    long_l = summary["mean"]["long_P@L"]
    print(f"contacts: {len(table)} chains, long-range P@L {'n/a' if long_l is None else f'{long_l:.3f}'} -> "
          f"{out} ({time.perf_counter() - started:.1f} s)")
    return 0

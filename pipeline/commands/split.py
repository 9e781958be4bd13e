"""`foldtune split`: train/val/test split of a prepared dataset by sequence-identity clusters."""

from __future__ import annotations

import argparse
import time

HELP = "train/val/test split by sequence-identity clusters (writes chain_id,split,cluster)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset directory written by `foldtune prepare`")
    parser.add_argument("--out", required=True, help="splits CSV to write (chain_id,split,cluster)")
    parser.add_argument("--threshold", type=float, default=0.4,
                        help="sequence identity (identical aligned pairs / shorter length) that joins clusters")
    parser.add_argument("--fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", metavar="CSV", help="external clustering: chain_id,cluster CSV or MMseqs2 "
                        "easy-cluster *_cluster.tsv (skips the O(N²) alignments)")
    parser.add_argument("--date-cutoff", metavar="YYYY-MM-DD",
                        help="clusters with a chain released after this date go to test only")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from data.dataset import read_manifest
    from data.io import atomic_path
    from data.split import make_splits

    started = time.perf_counter()
    try:
        manifest = read_manifest(args.dataset)
        if args.date_cutoff:
            import pandas as pd

            pd.Timestamp(args.date_cutoff)
        splits = make_splits(manifest, threshold=args.threshold, fractions=args.fractions, seed=args.seed,
                             clusters_file=args.clusters, date_cutoff=args.date_cutoff, progress=not args.no_progress)
    except (OSError, ValueError) as exc:
        print(f"foldtune split: {exc}")
        return 2
    with atomic_path(args.out) as tmp:
        splits.to_csv(tmp, index=False)
    counts = splits["split"].value_counts()
    per_split = ", ".join(f"{s} {int(counts.get(s, 0))} chains / {splits[splits.split == s].cluster.nunique()} clusters"
                          for s in ("train", "val", "test"))
    print(f"split: {len(splits)} chains in {splits.cluster.nunique()} clusters -> {per_split}; "
          f"{time.perf_counter() - started:.1f} s")
    return 0

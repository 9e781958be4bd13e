"""`foldtune prepare`: parse, clean and filter structure files into a dataset directory."""

from __future__ import annotations

import argparse

HELP = "parse, clean and tokenize structures into a dataset directory (manifest.csv, chains/*.npz, errors.csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="inputs", nargs="+", default=[], metavar="DIR_OR_FILE",
                        help="structure files (.pdb/.cif, optionally .gz) or directories searched recursively")
    parser.add_argument("--fetch-report", metavar="CSV",
                        help="read exactly the files this `foldtune fetch` report lists as delivered (what the "
                             "workflow runs: stale files of an earlier fetch in the same directory are left out)")
    parser.add_argument("--out", required=True, metavar="DATASET", help="dataset directory to write")
    parser.add_argument("--chains-file", metavar="CSV", help="CSV with columns file,chain: only these chains")
    parser.add_argument("--model", type=int, default=1, help="model number (1-based) of multi-model files")
    parser.add_argument("--min-len", type=int, default=16, help="minimum chain length (full deposited length)")
    parser.add_argument("--max-len", type=int, default=1024,
                        help="maximum chain length (full deposited length; 0 = no limit)")
    parser.add_argument("--max-unknown", type=float, default=0.1, help="maximum fraction of X residues")
    parser.add_argument("--max-resolution", type=float, default=None,
                        help="maximum resolution in Å (chains without a resolution pass)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data.prepare import ChainFilters, prepare_dataset, read_chains_file, read_fetch_report

    filters = ChainFilters(min_len=args.min_len, max_len=args.max_len or None, max_unknown=args.max_unknown,
                           max_resolution=args.max_resolution)
    if not args.inputs and not args.fetch_report:
        print("foldtune prepare: no inputs (give --in files/directories or --fetch-report CSV)")
        return 2
    inputs = list(args.inputs)
    try:
        chains = read_chains_file(args.chains_file) if args.chains_file else None
        if args.fetch_report:
            delivered = read_fetch_report(args.fetch_report)
            if not delivered:
                print(f"foldtune prepare: {args.fetch_report}: the fetch delivered no files")
                return 1
            inputs += delivered
    except (OSError, ValueError) as exc:
        print(f"foldtune prepare: {exc}")
        return 2
    summary = prepare_dataset(inputs, args.out, filters=filters, chains=chains, model=args.model,
                              progress=not args.no_progress)
    print(summary.line())
    if summary.errors:
        print(f"  rejections listed in {args.out}/errors.csv")
    return 0 if summary.chains_written else 1

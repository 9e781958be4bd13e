"""`foldtune score`: TM-score, GDT-TS/HA, RMSD, lDDT and CA-lDDT of a model against a reference.

    foldtune score MODEL REF [--chain1 C] [--chain2 C] [--model1 N] [--model2 N] [--align auto|index|number|sequence] [--json]
    foldtune score --pairs pairs.csv --out scores.csv                      (columns id,model,ref[,chain1,chain2])
    foldtune score --predictions PRED_DIR/predictions.csv --dataset DATASET --out scores.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "TM-score, GDT, RMSD, lDDT of a model against a reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model structure (PDB/mmCIF, optionally .gz)")
    parser.add_argument("ref", nargs="?", help="reference (native) structure; all scores are normalised by it")
    parser.add_argument("--chain1", help="chain of MODEL (default: first protein chain)")
    parser.add_argument("--chain2", help="chain of REF (default: first protein chain)")
    parser.add_argument("--model1", type=int, default=1, help="model number in MODEL (default 1)")
    parser.add_argument("--model2", type=int, default=1, help="model number in REF (default 1)")
    parser.add_argument(
        "--align", choices=("auto", "index", "number", "sequence"), default="auto",
        help="residue correspondence: the deposited-sequence index (both chains carry the same SEQRES/mmCIF "
        "sequence, e.g. a `foldtune predict` PDB vs its dataset native), residue number + insertion code (like "
        "TMscore), a global sequence alignment (like TMscore -seq); auto (default): index when possible, else number",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--pairs", help="batch mode: CSV with columns id,model,ref[,chain1,chain2]")
    parser.add_argument("--predictions", help="workflow mode: PRED_DIR/predictions.csv (chain_id,pdb,mean_plddt,...)")
    parser.add_argument("--dataset", help="workflow mode: dataset directory (manifest.csv, chains/*.npz)")
    parser.add_argument("--out", help="output CSV for --pairs / --predictions (written atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _format(result: dict) -> str:
    return "\n".join(
        [
            f"TM-score   {result['tm_score']:.4f}",
            f"GDT-TS     {result['gdt_ts']:.4f}",
            f"GDT-HA     {result['gdt_ha']:.4f}",
            f"RMSD       {result['rmsd']:.3f} A",
            f"lDDT       {result['lddt']:.4f}",
            f"lDDT-CA    {result['lddt_ca']:.4f}",
            f"matched    {result['n_aligned']} residues",
            f"L_ref      {result['l_ref']}",
        ]
    )


def run(args: argparse.Namespace) -> int:
    import warnings

    from pipeline import scoring

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scoring.ScoreWarning)
        code = _run(args)
    for warning in caught:
        if issubclass(warning.category, scoring.ScoreWarning):
            print(f"foldtune score: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return code


def _run(args: argparse.Namespace) -> int:
    from pipeline import scoring

    try:
        if args.pairs or args.predictions:
            if args.model or args.ref:
                print("foldtune score: give MODEL REF, or --pairs, or --predictions, not several", file=sys.stderr)
                return 2
            if not args.out:
                print("foldtune score: --out is required with --pairs / --predictions", file=sys.stderr)
                return 2
            if args.predictions:
                if not args.dataset:
                    print("foldtune score: --predictions needs --dataset", file=sys.stderr)
                    return 2
                frame = scoring.score_predictions(
                    args.predictions, args.dataset, args.out, align=args.align, show_progress=not args.no_progress
                )
            else:
                frame = scoring.score_table(args.pairs, args.out, align=args.align, show_progress=not args.no_progress)
            failed = frame[frame[scoring.ERROR_COLUMN].astype(bool)]
            key = "chain_id" if args.predictions else "id"
            for row in failed.itertuples():
                print(f"foldtune score: {getattr(row, key)}: {getattr(row, scoring.ERROR_COLUMN)}", file=sys.stderr)
            print(f"wrote {len(frame)} rows to {args.out}"
                  + (f"; {len(failed)} could not be scored (column `error`)" if len(failed) else ""), file=sys.stderr)
            return 1 if len(failed) else 0
        if not (args.model and args.ref):
            print("foldtune score: need MODEL and REF (or --pairs / --predictions)", file=sys.stderr)
            return 2
        result = scoring.score_pair(
            args.model, args.ref, chain1=args.chain1, chain2=args.chain2, model1=args.model1, model2=args.model2,
            align=args.align,
        )
    except (ValueError, OSError) as exc:
        print(f"foldtune score: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else _format(result))
    return 0

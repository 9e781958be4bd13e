"""`foldtune params`: trainable / total parameters of a named model + adapter, built on the meta device."""

from __future__ import annotations

import argparse
import json

HELP = "count trainable/total parameters of a model + adapter (meta device: no weights, no download)"
METHOD_ORDER = ("none", "full", "lora", "lorta", "tlora")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from adapters.zoo import EXTRA_NAMES, MODEL_NAMES

    parser.add_argument("--model", required=True, choices=MODEL_NAMES + EXTRA_NAMES, metavar="NAME",
                        help="fair-esm ESM-2 name (esm2_t6_8M_UR50D ... esm2_t48_15B_UR50D) or esmfold_v1")
    parser.add_argument("--method", choices=METHOD_ORDER, default="lorta")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="scaling numerator (default 2*rank; no effect on counts)")
    parser.add_argument("--targets", default="attn", help="comma list of attn, mlp, qv (trimul: ESMFold pair track)")
    parser.add_argument("--part", choices=("stem", "trunk", "all"), default="all")
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list with --table)")
    parser.add_argument("--table", action="store_true", help="compare every method at this rank and targets")


def _config(args: argparse.Namespace, method: str):
    import adapters

    return adapters.config_from_dict({
        "method": method, "rank": args.rank, "alpha": args.alpha if args.alpha is not None else 2 * args.rank,
        "targets": [t.strip() for t in args.targets.split(",") if t.strip()], "part": args.part})


def summarize(args: argparse.Namespace, methods: tuple[str, ...]) -> list[dict]:
    from adapters.zoo import build_meta_model, param_summary

    model = build_meta_model(args.model)
    rows = []
    for method in methods:
        config = _config(args, method)
        row = {"model": args.model, **config.to_dict()}
        row.update(param_summary(model, config))
        rows.append(row)
    return rows


def _format_row(row: dict) -> str:
    targets = ",".join(row.get("targets", [])) or "-"
    rank = row.get("rank", "-")
    return (f"{row['method']:<6} {str(rank):>4} {targets:<10} {row['part']:<5} {row['trainable_params']:>15,} "
            f"{row['total_params']:>16,} {row['trainable_percent']:>9.4f}%")


def run(args: argparse.Namespace) -> int:
    methods = METHOD_ORDER if args.table else (args.method,)
    try:
        rows = summarize(args, methods)
    except ValueError as exc:
        print(f"foldtune params: {exc}")
        return 2
    if args.json:
        print(json.dumps(rows if args.table else rows[0], indent=2))
        return 0
    print(f"model {args.model}: {rows[0]['base_params']:,} base parameters")
    print(f"{'method':<6} {'rank':>4} {'targets':<10} {'part':<5} {'trainable':>15} {'total':>16} {'trainable%':>10}")
    for row in rows:
        print(_format_row(row))
        if not args.table:
            for name, stack in row["stacks"].items():
                dims = f"d={stack['dim']} H={stack['heads']} d_h={stack['head_dim']} L={stack['layers']}"
                extra = f" M={stack['types']} sites={stack['sites']}" if "types" in stack else ""
                print(f"  stack {name:<10} {dims}{extra}  trainable {stack.get('trainable', '-'):,}"
                      if "trainable" in stack else f"  stack {name:<10} {dims}")
            for part, count in row.get("parts", {}).items():
                print(f"  part {part:<11} trainable {count:,}")
    return 0

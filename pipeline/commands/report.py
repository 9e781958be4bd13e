"""`foldtune report`: tables, plots and report.md / report.html from an experiment's results directory."""

from __future__ import annotations

import argparse
import time

HELP = "compare methods: tables, plots, report.md/html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, metavar="DIR",
                        help="experiment directory holding runs/<run>/ and scores/<run>/<split>.csv")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: --results)")
    parser.add_argument("--config", metavar="YAML", help="workflow config whose `report:` section sets the title, "
                        "disclaimer and splits (the flags below win)")
    parser.add_argument("--runs", nargs="+", metavar="NAME",
                        help="only these runs / baselines (default: every runs/*/ and scores/*/)")
    parser.add_argument("--groups", metavar="JSON", help="run -> group of the workflow (RESULTS/groups.json): "
                        "one table section and Pareto row per group")
    parser.add_argument("--title")
    parser.add_argument("--disclaimer", help="a paragraph shown at the top (e.g. 'small random models')")
    parser.add_argument("--gain-split", help="split the adapters were fine-tuned on: adds TM gain vs the untuned base")
    parser.add_argument("--main-split", help="split of the headline table (default: --gain-split or the first)")


def run(args: argparse.Namespace) -> int:
    from pipeline.report import build_report, load_groups, options_from_config

    started = time.perf_counter()
    try:
        options = options_from_config(args.config)
        for key in ("title", "disclaimer", "gain_split", "main_split"):
            if getattr(args, key) is not None:
                setattr(options, key, getattr(args, key))
        written = build_report(args.results, args.out or args.results, options, runs=args.runs,
                               groups=load_groups(args.groups))
    except (OSError, ValueError) as exc:
        print(f"foldtune report: {exc}")
        return 2
    import pandas as pd

    from pipeline.report import display_table
    from pipeline.report_lm import display_lm_table

    summary = pd.read_csv(written["summary"], dtype={"group": str, "targets": str, "part": str}).fillna(
        {"targets": "", "part": "", "group": ""})
    if "contacts_plot" in written:  # a language-model report
        print(display_lm_table(summary, options.main_split or summary.split.iloc[0]).to_string(index=False))
    else:
        split = options.main_split or options.gain_split or summary.split.iloc[0]
        print(display_table(summary, split, summary[summary.split == split].tm_gain.notna().any()).to_string(index=False))
    print(f"report: {written['html']} and {written['md']} ({len(written) - 2} files besides); "
          f"{time.perf_counter() - started:.1f} s")
    return 0

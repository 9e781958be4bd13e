"""The report of a language-model experiment (`training.kind: lm`): contact precision per method.

Reads RESULTS/runs/<run>/summary.json (+ metrics.csv) and RESULTS/contacts/<run>/<split>.csv (`foldtune
contacts`: one row per chain, P@L, P@L/2, P@L/5 for short, medium and long range). Writes into OUT
``summary.csv`` (one row per split x variant: parameters, the nine precisions as means over chains of the
seed-averaged per-chain values, the last validation perplexity), ``costs.csv``, ``per_target.csv``,
``plots/contacts_vs_params.png``, ``plots/training_curves.png`` and ``report.md`` / ``report.html``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from data.io import atomic_path
from pipeline.lm import PRECISION_COLUMNS
from pipeline.report import (
    COST_COLUMNS,
    METHOD_COLORS,
    REFERENCE_METHOD,
    VARIANT,
    Document,
    ReportOptions,
    _fmt,
    _group_order,
    _method_sort_key,
    _save,
    _split_order,
    _variant_label,
    load_curves,
    load_runs,
    plot_curves,
    write_documents,
)

HEADLINE = "long_P@L"  # the column of the plot and the per-target table
PLOTTED = ("long_P@L", "long_P@L/5", "medium_P@L/5")


def load_contacts(results: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Per-chain contact precision of every run and split (long format) with the run's variant columns."""
    frames = []
    for name in runs.index:
        for path in sorted((results / "contacts" / name).glob("*.csv")):
            frame = pd.read_csv(path)
            missing = [c for c in ["chain_id", *PRECISION_COLUMNS] if c not in frame.columns]
            if missing:
                raise ValueError(f"{path}: columns: missing {missing[0]} (a `foldtune contacts` table is expected)")
            frames.append(frame.assign(run=name, split=path.stem))
    if not frames:
        raise ValueError(f"{results}/contacts: no <run>/<split>.csv contact tables")
    return pd.concat(frames, ignore_index=True).join(runs[VARIANT + ["seed"]], on="run")


def _last_val_perplexity(results: Path, run: str) -> float:
    path = results / "runs" / run / "metrics.csv"
    if not path.exists():
        return float("nan")
    frame = pd.read_csv(path)
    if "val_perplexity" not in frame.columns or frame.val_perplexity.isna().all():
        return float("nan")
    return float(frame.val_perplexity.dropna().iloc[-1])


def lm_summary_table(results: Path, runs: pd.DataFrame, contacts: pd.DataFrame) -> pd.DataFrame:
    """One row per split x variant: parameters, steps, mean of each precision column over chains (seeds
    averaged per chain first; chains without a pair in a range left out) and the last val perplexity."""
    per_target = contacts.groupby(["split", *VARIANT, "chain_id"], sort=False, dropna=False)[PRECISION_COLUMNS].mean()
    per_target = per_target.reset_index()
    rows = []
    for key, group in per_target.groupby(["split", *VARIANT], sort=False, dropna=False):
        split, label, method, rank, targets, part = key
        variant_runs = runs[(runs["group"] == label) & (runs.method == method) & (runs["rank"] == rank)
                            & (runs.targets == targets) & (runs.part == part)]
        perplexity = [_last_val_perplexity(results, run) for run in variant_runs.index]
        row = {"split": split, "group": label, "method": method, "rank": int(rank), "targets": targets,
               "part": part, "n_seeds": int(variant_runs.seed.nunique()), "n_targets": int(group.chain_id.nunique()),
               "trainable_params": int(variant_runs.trainable_params.mean()),
               "adapter_params": int(variant_runs.adapter_params.mean()),
               "steps": int(pd.to_numeric(variant_runs.steps, errors="coerce").fillna(0).mean()),
               **{column: group[column].mean() for column in PRECISION_COLUMNS},
               f"{HEADLINE}_sd": group[HEADLINE].std(ddof=1) if group[HEADLINE].count() > 1 else np.nan,
               "val_perplexity": float(np.nanmean(perplexity)) if not all(map(math.isnan, perplexity)) else np.nan,
               "train_seconds": variant_runs.train_seconds.mean(),
               "peak_memory_mb": pd.to_numeric(variant_runs.peak_memory_mb, errors="coerce").mean()}
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(["none", "lora", "lorta", "tlora", "full"])}
    groups = _group_order(runs)
    table["_order"] = table.method.map(lambda m: order.get(m, len(order)))
    table["_group"] = table["group"].map(lambda g: groups.get(g, len(groups)))
    table = table.sort_values(["split", "_group", "_order", "rank", "targets", "part"])
    return table.drop(columns=["_order", "_group"]).reset_index(drop=True)


def display_lm_table(summary: pd.DataFrame, split: str) -> pd.DataFrame:
    """The human-readable method x rank table of one split: P@L, L/2, L/5 per range."""
    table = summary[summary.split == split].fillna({"targets": "", "part": "", "group": ""})
    many_groups = table["group"].nunique() > 1
    rows = []
    for row in table.to_dict("records"):
        entry = {"group": row["group"]} if many_groups else {}
        entry.update({"method": "none (untuned base)" if row["method"] == REFERENCE_METHOD else row["method"],
                      "rank": row["rank"] or "–", "trainable params": _fmt(int(row["trainable_params"]))})
        for column in PRECISION_COLUMNS:
            entry[column.replace("_", " ")] = _fmt(row[column])
        entry["val perplexity"] = _fmt(row["val_perplexity"], 2)
        entry["steps"] = _fmt(int(row["steps"])) if row["steps"] else "–"
        if "train_seconds" in row:
            entry["train (s)"] = _fmt(row["train_seconds"], 0) if row["train_seconds"] else "–"
        rows.append(entry)
    return pd.DataFrame(rows)


def plot_contacts_vs_params(summary: pd.DataFrame, path: Path, splits: list[str]) -> Path:
    """Contact precision (long-range P@L, P@L/5, medium-range P@L/5) vs trainable parameters (log x), one
    line per method over its ranks; the untuned base as a dashed line."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(splits), len(PLOTTED), figsize=(4.8 * len(PLOTTED), 4.2 * len(splits) + 0.6),
                             squeeze=False)
    for row_axes, split in zip(axes, splits):
        table = summary[summary.split == split]
        reference = table[table.method == REFERENCE_METHOD]
        trained = table[(table.method != REFERENCE_METHOD) & (table.trainable_params > 0)]
        for ax, column in zip(row_axes, PLOTTED):
            for (label, method), group in trained.groupby(["group", "method"], sort=False):
                group = group.sort_values("trainable_params")
                name = f"{label}: {method}" if label else method
                ax.plot(group.trainable_params, group[column], marker="o", label=name,
                        color=METHOD_COLORS.get(method))
                for point in group.to_dict("records"):
                    if point["rank"]:
                        ax.annotate(f"r{point['rank']}", (point["trainable_params"], point[column]),
                                    textcoords="offset points", xytext=(4, 4), fontsize=8)
            for point in reference.to_dict("records"):
                if not math.isnan(point[column]):
                    ax.axhline(point[column], ls="--", lw=1.2, color="black",
                               label=f"untuned base ({point[column]:.3f})")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(column)
            ax.set_title(f"{column.replace('_', ' ')} · split: {split}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    fig.suptitle("Contact precision vs trainable parameters", fontsize=11)
    return _save(fig, path)


def build_lm_report(results: Path, out: Path, options: ReportOptions, runs: list[str] | None = None,
                    groups: dict[str, str] | None = None) -> dict[str, Path]:
    """Read RESULTS (runs + contacts), write the LM report files into OUT; returns their paths."""
    run_table = load_runs(results, runs, groups)
    contacts = load_contacts(results, run_table)
    summary = lm_summary_table(results, run_table, contacts)
    splits = _split_order(summary.split.unique())
    main_split = options.main_split or splits[0]
    if main_split not in splits:
        raise ValueError(f"report.main_split: split {main_split!r} has no contact tables (have {', '.join(splits)})")
    plots = out / "plots"
    written = {"summary": out / "summary.csv", "costs": out / "costs.csv", "per_target": out / "per_target.csv",
               "contacts_plot": plot_contacts_vs_params(summary, plots / "contacts_vs_params.png", splits)}
    curves = plot_curves(load_curves(results, list(run_table.index)), run_table, plots / "training_curves.png")
    if curves is not None:
        written["curves"] = curves
    with atomic_path(written["summary"]) as tmp:
        summary.drop(columns=COST_COLUMNS).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(written["costs"]) as tmp:
        summary[summary.split == splits[0]][[*VARIANT, "steps", *COST_COLUMNS]].to_csv(tmp, index=False,
                                                                                      float_format="%.6g")
    per_target = contacts.groupby(["split", *VARIANT, "chain_id"], sort=False, dropna=False)[PRECISION_COLUMNS]
    per_target = per_target.mean().reset_index()
    with atomic_path(written["per_target"]) as tmp:
        per_target.to_csv(tmp, index=False, float_format="%.6g")

    doc = Document(options.title)
    if options.disclaimer:
        doc.note(options.disclaimer)
    methods = sorted(set(run_table.method), key=_method_sort_key)
    doc.text(f"Results: `{results}`. {len(run_table)} runs of a masked-language-model fine-tuning; methods: "
             f"{', '.join(methods)}. Contact precision of ESM-2's unsupervised contact head (the release's "
             "logistic regression on the attention maps): among the top L, L/2, L/5 predicted pairs (L: the "
             "chain's deposited length) the fraction that are native contacts (Cβ–Cβ < 8 Å, CA for glycine), "
             "for short (6–11), medium (12–23) and long (≥ 24) sequence separation; pairs with an unobserved "
             "residue are left out. Per-chain values averaged over seeds, then over chains.")
    for split in [main_split] + [s for s in splits if s != main_split]:
        chains = ", ".join(sorted(per_target[per_target.split == split].chain_id.unique()))
        doc.heading(f"Split `{split}`")
        doc.text(f"Chains: {chains}.")
        doc.table(display_lm_table(summary, split))
    doc.heading("Plots")
    doc.image(written["contacts_plot"], "Contact precision vs trainable parameters (log scale): one line per "
              "method over its ranks; dashed: the untuned base.")
    if "curves" in written:
        doc.image(written["curves"], "Masked-LM training loss per step of every run (from metrics.csv).")
    doc.heading(f"Per-target {HEADLINE.replace('_', ' ')}")
    many_groups = per_target["group"].nunique() > 1
    wide = per_target.assign(variant=[_variant_label(*v, False, many_groups)
                                      for v in per_target[VARIANT].itertuples(index=False)])
    wide = wide.pivot_table(index=["split", "chain_id"], columns="variant", values=HEADLINE, sort=False)
    wide = wide.reset_index().round(3)
    wide.columns.name = None
    shown = wide.head(options.max_target_rows)
    doc.table(shown, f"All {len(wide)} rows are in `per_target.csv`." if len(wide) > len(shown)
              else "Seed-averaged; also in `per_target.csv` with every range and fraction.")
    return write_documents(doc, out, written)

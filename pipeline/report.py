"""`foldtune report`: compare methods from an experiment's results directory.

Reads (layout of docs/design.md):
    RESULTS/runs/<run>/summary.json     method, rank, targets, part, trainable_params, train_seconds, peak_memory_mb...
    RESULTS/runs/<run>/metrics.csv      step, train_loss, ... (Lightning CSV logger)
    RESULTS/scores/<name>/<split>.csv   chain_id, tm_score, gdt_ts, gdt_ha, rmsd, lddt, lddt_ca, ..., mean_plddt
Score directories without a run (``ideal_helix``) are baselines: 0 trainable parameters, no training.

Writes into OUT: ``summary.csv`` (one row per split x method x rank x targets x part), ``per_target.csv``
(one row per split x variant x chain, seeds averaged), ``plots/*.png`` and ``report.md`` + ``report.html``
(the same content; the HTML embeds the plots as base64 PNG so it is a single shareable file).

Aggregation: a *variant* is (method, rank, targets, part). Its per-target score is the mean over seeds; the
table's mean / sd / median are over targets. The TM gain of a variant on a split is its per-target TM minus the
untuned base's (method ``none``) on the same chain; "improved" counts chains with a gain > 0.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.io import atomic_path, atomic_write_text

METRICS = ("tm_score", "lddt", "lddt_ca", "gdt_ts", "gdt_ha", "rmsd", "mean_plddt")
VARIANT = ["group", "method", "rank", "targets", "part"]
BASELINE_METHODS = {"ideal_helix": "ideal-helix"}
METHOD_ORDER = ["none", "ideal-helix", "head", "lora", "lorta", "tlora", "full"]
METHOD_COLORS = {"lora": "tab:blue", "lorta": "tab:orange", "tlora": "tab:green", "full": "tab:red",
                 "none": "black", "ideal-helix": "tab:gray", "head": "tab:purple"}
REFERENCE_METHOD = "none"
# A `none` run that trained the folding head (model.train_heads) is the head-only control, reported as "head".
HEAD_METHOD = "head"
# Wall-clock costs: reported, but kept out of summary.csv so that a rerun reproduces it byte for byte.
COST_COLUMNS = ["train_seconds", "peak_memory_mb"]


# ------------------------------------------------------------------------------------------------ loading
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: summary: cannot read JSON ({exc})") from exc


def _seed_of(run_dir: Path, name: str) -> int:
    config = run_dir / "config.yaml"
    if config.exists():
        import yaml

        seed = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("seed")
        if seed is not None:
            return int(seed)
    match = re.search(r"_s(\d+)(?:_|$)", name)
    return int(match.group(1)) if match else 0


def _targets_text(targets: Any) -> str:
    if targets is None:
        return ""
    if isinstance(targets, str):
        return targets
    return "+".join(str(t) for t in targets)


def load_groups(path: str | Path | None) -> dict[str, str]:
    """run name -> group label from the workflow's groups.json ({run: {"group", "label"}}); {} without one."""
    if not path:
        return {}
    data = _read_json(Path(path))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: groups: expected {{run: {{group, label}}}}")
    return {name: str(entry.get("label") or entry.get("group") or "") for name, entry in data.items()}


def load_runs(results: Path, names: list[str] | None = None, groups: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run (and per baseline), indexed by run name; `groups`: run -> group label."""
    groups = groups or {}
    group_order = {label: i for i, label in enumerate(dict.fromkeys(groups.values()))}  # the workflow's order
    rows = []
    runs_dir, scores_dir = results / "runs", results / "scores"
    # Without a list: every run and score directory, except the from-scratch base the grid started from
    # (it is the untuned base's weights, which `none` reports).
    candidates = set(names) if names is not None else (
        {p.parent.name for p in runs_dir.glob("*/summary.json")} | {p.name for p in scores_dir.glob("*") if p.is_dir()}
    ) - {"base"}
    for name in sorted(candidates):
        run_dir = runs_dir / name
        if (run_dir / "summary.json").exists():
            summary = _read_json(run_dir / "summary.json")
            method = summary.get("method")
            if method is None:
                raise ValueError(f"{run_dir / 'summary.json'}: method: missing")
            full_or_none = method in ("full", "none")
            if method == "none" and summary.get("train_heads") and (summary.get("steps") or 0) > 0:
                method = HEAD_METHOD
            trainable = int(summary.get("trainable_params") or 0)
            rows.append({
                "run": name, "group": groups.get(name, ""), "group_order": group_order.get(groups.get(name, ""), 0),
                "method": method,
                "rank": 0 if full_or_none else int(summary.get("rank") or 0),
                "targets": "" if full_or_none else _targets_text(summary.get("targets")),
                "part": "" if method == "none" else str(summary.get("part") or ""),
                "seed": int(summary["seed"]) if summary.get("seed") is not None else _seed_of(run_dir, name),
                "trainable_params": trainable,
                "adapter_params": int(summary.get("adapter_params", trainable) or 0),
                "head_params": int(summary.get("head_params") or 0),
                "total_params": summary.get("total_params"),
                "train_seconds": float(summary.get("train_seconds") or 0.0),
                "steps": summary.get("steps"),
                "peak_memory_mb": summary.get("peak_memory_mb"),
                "final_train_loss": summary.get("final_train_loss"),
            })
        elif name in BASELINE_METHODS or (scores_dir / name).is_dir():
            rows.append({"run": name, "group": groups.get(name, ""),
                         "group_order": group_order.get(groups.get(name, ""), 0), "method": BASELINE_METHODS.get(name, name),
                         "rank": 0, "targets": "", "part": "", "seed": 0, "trainable_params": 0,
                         "adapter_params": 0, "head_params": 0, "total_params": None,
                         "train_seconds": 0.0, "steps": 0, "peak_memory_mb": None, "final_train_loss": None})
        elif names is not None:
            raise ValueError(f"{results}: run {name!r}: no runs/{name}/summary.json and no scores/{name}/")
    if not rows:
        raise ValueError(f"{results}: runs: no runs/*/summary.json or scores/*/ found")
    return pd.DataFrame(rows).set_index("run")


def load_scores(results: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Per-target scores of every run and split (long format) with the run's variant columns."""
    frames = []
    for name in runs.index:
        for path in sorted((results / "scores" / name).glob("*.csv")):
            frame = pd.read_csv(path)
            if "chain_id" not in frame.columns or "tm_score" not in frame.columns:
                raise ValueError(f"{path}: columns: need chain_id and tm_score (got {list(frame.columns)})")
            frame = frame.assign(run=name, split=path.stem)
            frames.append(frame)
    if not frames:
        raise ValueError(f"{results}/scores: no <run>/<split>.csv score tables")
    scores = pd.concat(frames, ignore_index=True)
    for metric in METRICS:
        if metric not in scores.columns:
            scores[metric] = np.nan
    return scores.join(runs[VARIANT + ["seed"]], on="run")


def load_curves(results: Path, run_names: list[str]) -> dict[str, pd.DataFrame]:
    """{run: DataFrame(step, train_loss)} from each run's metrics.csv (rows without a train loss dropped)."""
    curves = {}
    for name in run_names:
        path = results / "runs" / name / "metrics.csv"
        if not path.exists():
            continue
        frame = pd.read_csv(path)
        if {"step", "train_loss"} <= set(frame.columns):
            frame = frame[["step", "train_loss"]].dropna()
            if len(frame):
                curves[name] = frame.sort_values("step")
    return curves


# ------------------------------------------------------------------------------------------------- tables
def per_target_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged per-target metrics: one row per split x variant x chain."""
    keys = ["split", *VARIANT, "chain_id"]
    return scores.groupby(keys, sort=False, dropna=False)[list(METRICS)].mean().reset_index()


def _reference(per_target: pd.DataFrame, method: str = REFERENCE_METHOD) -> pd.Series:
    """TM-score of the untuned base (or the head-only control) per (split, chain), indexed by (split, chain_id)."""
    base = per_target[per_target.method == method]
    return base.groupby(["split", "chain_id"])["tm_score"].mean()


def _gain(group: pd.DataFrame, reference: pd.Series, split: str) -> np.ndarray:
    """Per-chain TM gain of `group` (one variant's per-target rows) over `reference` on the same chains."""
    base = reference.reindex(pd.MultiIndex.from_arrays([[split] * len(group), group.chain_id]))
    gain = group["tm_score"].to_numpy() - base.to_numpy()
    return gain[~np.isnan(gain)]


def _group_order(runs: pd.DataFrame) -> dict[str, int]:
    """group label -> its place in the report: the workflow's group order (groups.json), ungrouped first."""
    return {label: int(order) for label, order in zip(runs["group"], runs["group_order"])}


def summary_table(runs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """One row per split x variant: parameters, metric mean/sd/median over targets, training cost, TM gain."""
    per_target = per_target_table(scores)
    reference = _reference(per_target)
    head_reference = _reference(per_target, HEAD_METHOD)
    rows = []
    for key, group in per_target.groupby(["split", *VARIANT], sort=False, dropna=False):
        split, label, method, rank, targets, part = key
        variant_runs = runs[(runs["group"] == label) & (runs.method == method) & (runs["rank"] == rank)
                            & (runs.targets == targets) & (runs.part == part)]
        run_scores = scores[(scores.split == split) & scores.run.isin(variant_runs.index)]
        seed_means = run_scores.groupby("seed")["tm_score"].mean()
        tm = group["tm_score"]
        row = {
            "split": split, "group": label, "method": method, "rank": int(rank), "targets": targets, "part": part,
            "n_seeds": int(variant_runs.seed.nunique()), "n_targets": int(group.chain_id.nunique()),
            "trainable_params": int(variant_runs.trainable_params.mean()),
            "adapter_params": int(variant_runs.adapter_params.mean()),
            "head_params": int(variant_runs.head_params.mean()),
            "steps": int(pd.to_numeric(variant_runs.steps, errors="coerce").fillna(0).mean()),
            "tm_mean": tm.mean(), "tm_sd": tm.std(ddof=1) if len(tm) > 1 else 0.0, "tm_median": tm.median(),
            "tm_seed_sd": seed_means.std(ddof=1) if len(seed_means) > 1 else np.nan,
            "lddt": group["lddt"].mean(), "lddt_ca": group["lddt_ca"].mean(), "gdt_ts": group["gdt_ts"].mean(),
            "rmsd": group["rmsd"].mean(), "plddt": group["mean_plddt"].mean(),
            "train_seconds": variant_runs.train_seconds.mean(),
            "peak_memory_mb": pd.to_numeric(variant_runs.peak_memory_mb, errors="coerce").mean(),
        }
        if len(head_reference) and method not in (REFERENCE_METHOD, HEAD_METHOD) and row["head_params"]:
            gain = _gain(group, head_reference, split)  # the adapter's share on top of the head-only control
            if len(gain):
                row["tm_gain_vs_head"] = gain.mean()
        if len(reference) and method != REFERENCE_METHOD:
            gain = _gain(group, reference, split)
            if len(gain):
                row["tm_gain"] = gain.mean()
                row["frac_improved"] = float((gain > 0).mean())
                params = row["trainable_params"]
                row["tm_gain_per_mparam"] = gain.mean() / (params / 1e6) if params else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("tm_gain", "frac_improved", "tm_gain_per_mparam", "tm_gain_vs_head"):
        if column not in table.columns:
            table[column] = np.nan
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    groups = _group_order(runs)
    table["_order"] = table.method.map(lambda m: order.get(m, len(order)))
    table["_group"] = table["group"].map(lambda g: groups.get(g, len(groups)))
    table = table.sort_values(["split", "_group", "_order", "rank", "targets", "part"]).drop(columns=["_order", "_group"])
    return table.reset_index(drop=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def display_table(summary: pd.DataFrame, split: str, with_gain: bool) -> pd.DataFrame:
    """The human-readable method x rank table of one split."""
    rows = []
    table = summary[summary.split == split].fillna({"targets": "", "part": "", "group": ""})
    many = _many_settings(table)
    many_groups = table["group"].nunique() > 1
    has_heads = "head_params" in table.columns and (table.head_params > 0).any()
    vs_head = "tm_gain_vs_head" in table.columns and table.tm_gain_vs_head.notna().any()
    for row in table.itertuples():
        label = {REFERENCE_METHOD: "none (untuned base)", HEAD_METHOD: "head only (control)"}.get(row.method,
                                                                                                 row.method)
        if many and row.targets:
            label += f" ({row.targets}, {row.part})"
        entry = {"group": row.group} if many_groups else {}
        entry.update({
            "method": label, "rank": row.rank or "–", "trainable params": _fmt(int(row.trainable_params))})
        if has_heads:
            entry["own params"] = _fmt(int(row.adapter_params))
        entry.update({
            "TM-score (mean ± sd)": f"{row.tm_mean:.3f} ± {row.tm_sd:.3f}", "TM median": _fmt(row.tm_median),
            "lDDT": _fmt(row.lddt), "lDDT-CA": _fmt(row.lddt_ca), "GDT-TS": _fmt(row.gdt_ts),
            "RMSD (Å)": _fmt(row.rmsd, 2), "steps": _fmt(int(row.steps)) if getattr(row, "steps", 0) else "–",
        })
        if hasattr(row, "train_seconds"):  # costs: in the report, not in summary.csv
            entry["train (s)"] = _fmt(row.train_seconds, 0) if row.train_seconds else "–"
            entry["peak mem (MB)"] = _fmt(row.peak_memory_mb, 0)
        if with_gain:
            entry["TM gain vs base"] = "–" if math.isnan(row.tm_gain) else f"{row.tm_gain:+.3f}"
            if vs_head:
                entry["gain vs head only"] = ("–" if math.isnan(row.tm_gain_vs_head)
                                              else f"{row.tm_gain_vs_head:+.3f}")
            entry["chains improved"] = "–" if math.isnan(row.frac_improved) else f"{row.frac_improved:.0%}"
            entry["gain / 1M params"] = "–" if math.isnan(row.tm_gain_per_mparam) else f"{row.tm_gain_per_mparam:+.3f}"
        if row.n_seeds > 1:
            entry["seeds"] = f"{row.n_seeds} (sd of mean {row.tm_seed_sd:.3f})"
        rows.append(entry)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------- plots
def _variant_label(group: str, method: str, rank: int, targets: str, part: str, many: bool,
                   many_groups: bool = False) -> str:
    label = {HEAD_METHOD: "head only"}.get(method, method if not rank else f"{method} r{rank}")
    label = f"{label} ({targets}, {part})" if many and targets else label
    return f"{group}: {label}" if many_groups and group else label


def _many_settings(frame: pd.DataFrame) -> bool:
    """Whether the low-rank runs span several (targets, part) settings, so labels must name them."""
    low_rank = frame[frame["rank"] > 0]
    return len(low_rank[["targets", "part"]].drop_duplicates()) > 1


def _method_sort_key(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def plot_pareto(summary: pd.DataFrame, path: Path, splits: list[str]) -> Path:
    """Mean TM-score vs the method's own trainable parameters (log x; the folding head of head-training
    groups not counted), one panel row per group, one line per method over its ranks; the parameter-free
    references (untuned base, ideal helix) and the head-only control as dashed lines."""
    import matplotlib.pyplot as plt

    own = summary.adapter_params if "adapter_params" in summary.columns else summary.trainable_params
    summary = summary.assign(own_params=own, group=summary["group"].fillna("") if "group" in summary else "")
    references = summary.method.isin([REFERENCE_METHOD, HEAD_METHOD, *BASELINE_METHODS.values()])
    groups = list(dict.fromkeys(summary[~references & (summary.own_params > 0)]["group"])) or [""]
    fig, axes = plt.subplots(len(groups), len(splits), figsize=(max(7.0, 5.4 * len(splits)), 4.6 * len(groups) + 0.6),
                             squeeze=False)
    for row_axes, label in zip(axes, groups):
        for ax, split in zip(row_axes, splits):
            table = summary[summary.split == split]
            trained = table[~references.loc[table.index] & (table["group"] == label) & (table.own_params > 0)]
            many = _many_settings(trained)
            heads = bool((trained.head_params > 0).any()) if "head_params" in trained else False
            for (method, targets, part), group in trained.groupby(["method", "targets", "part"], sort=False):
                group = group.sort_values("own_params")
                sem = group.tm_sd / np.sqrt(group.n_targets.clip(lower=1))
                name = method + (f" ({targets}, {part})" if many and targets else "")
                ax.errorbar(group.own_params, group.tm_mean, yerr=sem, marker="o", capsize=3, label=name,
                            color=METHOD_COLORS.get(method))
                for point in group.itertuples():
                    if point.rank:
                        ax.annotate(f"r{point.rank}", (point.own_params, point.tm_mean), textcoords="offset points",
                                    xytext=(4, 4), fontsize=8)
            for point in table[references.loc[table.index]].itertuples():
                name = {REFERENCE_METHOD: "untuned base", HEAD_METHOD: "head only"}.get(point.method, point.method)
                ax.axhline(point.tm_mean, ls="--", lw=1.2, color=METHOD_COLORS.get(point.method, "gray"),
                           label=f"{name} ({point.tm_mean:.3f})")
            ax.set_xscale("log")
            if len(trained):  # at least two decades, so a group at one budget is not a smear of tick labels
                low, high = float(trained.own_params.min()), float(trained.own_params.max())
                if high / low < 100:
                    middle = math.sqrt(low * high)
                    ax.set_xlim(middle / 10, middle * 10)
            ax.set_xlabel("the method's own trainable parameters" + (" (+ the trained head)" if heads else ""))
            ax.set_ylabel("mean TM-score")
            n_chains = int(table.n_targets.max()) if len(table) else 0
            ax.set_title((f"{label} · " if label else "") + f"split: {split} ({n_chains} chain"
                         f"{'s' if n_chains != 1 else ''})", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    fig.suptitle("TM-score vs trainable parameters (error bars: standard error over chains)", fontsize=11)
    return _save(fig, path)


def plot_per_target(per_target: pd.DataFrame, path: Path, splits: list[str]) -> Path | None:
    """Each method's per-target TM-score against the untuned base's, one panel per variant."""
    import matplotlib.pyplot as plt

    reference = _reference(per_target)
    if not len(reference):
        return None
    others = per_target[(per_target.method != REFERENCE_METHOD) & per_target.split.isin(splits)]
    variants = sorted(others.groupby(VARIANT, sort=False).groups,
                      key=lambda v: (v[0], _method_sort_key(v[1]), v[2:]))
    if not variants:
        return None
    many = _many_settings(others)
    many_groups = others["group"].nunique() > 1
    # One scale for every panel, so panels compare at a glance.
    top = float(np.nanmax([others.tm_score.max(), reference.max()]))
    lims = [0.0, max(0.05, min(1.0, top * 1.1))]
    cols = min(3, len(variants))
    nrows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4.0 * nrows), squeeze=False)
    markers = dict(zip(splits, "os^"))
    for ax, variant in zip(axes.flat, variants):
        group = others.set_index(VARIANT).loc[[variant]].reset_index()
        for split in splits:
            part = group[group.split == split]
            base = reference.reindex(pd.MultiIndex.from_arrays([[split] * len(part), part.chain_id])).to_numpy()
            ok = ~np.isnan(base)
            improved = int((part.tm_score.to_numpy()[ok] > base[ok]).sum())
            ax.scatter(base[ok], part.tm_score.to_numpy()[ok], marker=markers.get(split, "o"), alpha=0.8,
                       label=f"{split}: {improved}/{int(ok.sum())} improved")
        ax.plot(lims, lims, color="gray", lw=1, ls=":")
        ax.set_xlim(lims)
        ax.set_ylim(lims)
        ax.set_aspect("equal")
        ax.set_title(_variant_label(*variant, many, many_groups), fontsize=9)
        ax.set_xlabel("untuned base TM-score")
        ax.set_ylabel("method TM-score")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    fig.suptitle("Per-target TM-score vs the untuned base (above the diagonal = better)")
    return _save(fig, path)


def plot_curves(curves: dict[str, pd.DataFrame], runs: pd.DataFrame, path: Path) -> Path | None:
    """Training loss vs step, one panel per method, one line per run (raw, and a moving average)."""
    import matplotlib.pyplot as plt

    if not curves:
        return None
    panels: dict[str, list[str]] = {}
    for name in curves:
        method = runs.loc[name, "method"] if name in runs.index else name
        panels.setdefault("base (from scratch)" if name == "base" else method, []).append(name)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        for index, name in enumerate(names):
            curve = curves[name]
            color = f"C{index}"
            window = max(1, len(curve) // 20)
            ax.plot(curve.step, curve.train_loss, color=color, alpha=0.25, lw=0.8)
            ax.plot(curve.step, curve.train_loss.rolling(window, min_periods=1).mean(), color=color, lw=1.6,
                    label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Training curves (faint: per step; solid: moving average)")
    return _save(fig, path)


def plot_calibration(per_target: pd.DataFrame, path: Path) -> Path | None:
    """Mean pLDDT vs lDDT per target (both 0-100), per method; the diagonal is perfect calibration."""
    import matplotlib.pyplot as plt

    data = per_target[per_target.mean_plddt.notna() & per_target.lddt.notna()
                      & ~per_target.method.isin(list(BASELINE_METHODS.values()))]
    if not len(data):
        return None
    lddt = data.lddt * (100.0 if data.lddt.max() <= 1.0 else 1.0)
    plddt = data.mean_plddt * (100.0 if data.mean_plddt.max() <= 1.0 else 1.0)
    fig, ax = plt.subplots(figsize=(5.4, 5.0))
    for method in [m for m in METHOD_ORDER if m in set(data.method)] + sorted(set(data.method) - set(METHOD_ORDER)):
        mask = (data.method == method).to_numpy()
        r = np.corrcoef(plddt[mask], lddt[mask])[0, 1] if mask.sum() > 2 else np.nan
        label = ("untuned base" if method == REFERENCE_METHOD else method) + (f" (r={r:.2f})" if not np.isnan(r) else "")
        ax.scatter(plddt[mask], lddt[mask], alpha=0.7, s=22, color=METHOD_COLORS.get(method), label=label)
    ax.plot([0, 100], [0, 100], color="gray", ls=":", lw=1)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted mean pLDDT")
    ax.set_ylabel("lDDT vs native (all atom, x100)")
    ax.set_title("pLDDT calibration (one point per chain and split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    # tight_layout ignores a suptitle: keep ~0.45 inch above the panels for it, or it covers their titles
    top = 1.0 - (0.45 / fig.get_figheight() if fig._suptitle is not None else 0.0)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- document
@dataclass
class Document:
    """Blocks rendered both as Markdown and as a self-contained HTML page."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, frame: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", frame, caption))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def markdown(self, root: Path) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                out += [f"## {block[1]}", ""]
            elif kind == "p":
                out += [block[1], ""]
            elif kind == "note":
                out += ["> **Note.** " + block[1].strip(), ""]
            elif kind == "table":
                if block[2]:
                    out += [block[2], ""]
                out += [block[1].to_markdown(index=False), ""]
            elif kind == "img":
                out += [f"![{block[2]}]({block[1].relative_to(root).as_posix()})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                body.append(f"<h2>{_inline_html(block[1])}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "note":
                body.append(f'<div class="note"><strong>Note.</strong> {_inline_html(block[1].strip())}</div>')
            elif kind == "table":
                if block[2]:
                    body.append(f"<p class=caption>{_inline_html(block[2])}</p>")
                body.append(block[1].to_html(index=False, border=0, classes="results", escape=True))
            elif kind == "img":
                payload = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{payload}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        return HTML_TEMPLATE.format(title=html.escape(self.title), body="\n".join(body))


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inline forms the report uses: `code` and **bold**."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.7em; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
table.results {{ border-collapse: collapse; font-size: .88em; margin: .6em 0 1.2em; }}
table.results th, table.results td {{ padding: .3em .6em; border-bottom: 1px solid #e4e4e4; text-align: right; }}
table.results td {{ white-space: nowrap; }}
table.results th {{ background: #f4f4f4; }}
table.results td:first-child, table.results th:first-child {{ text-align: left; }}
.note {{ background: #fff6dd; border-left: 4px solid #e0a800; padding: .6em 1em; margin: 1em 0; }}
figure {{ margin: 1em 0; }} figure img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: .9em; }}
code {{ background: #f2f2f2; padding: 0 .25em; }} .caption {{ color: #444; margin-bottom: .2em; }}
</style></head>
<body>
{body}
</body></html>
"""


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class ReportOptions:
    title: str = "foldtune report"
    disclaimer: str | None = None
    gain_split: str | None = None
    main_split: str | None = None
    max_target_rows: int = 200
    kind: str | None = None  # "fold" or "lm" (the workflow config's training.kind); None: from RESULTS' layout


def _split_order(splits) -> list[str]:
    known = ["train", "val", "test"]
    return [s for s in known if s in set(splits)] + sorted(set(splits) - set(known))


def build_report(results: str | Path, out: str | Path, options: ReportOptions | None = None,
                 runs: list[str] | None = None, groups: dict[str, str] | None = None) -> dict[str, Path]:
    """Read RESULTS, write summary.csv, costs.csv, per_target.csv, plots/*.png, report.md and report.html
    into OUT. `groups`: run -> group label (the workflow's groups.json)."""
    import matplotlib

    matplotlib.use("Agg")
    options = options or ReportOptions()
    results, out = Path(results), Path(out)
    kind = options.kind or ("lm" if (results / "contacts").is_dir() and not (results / "scores").is_dir() else "fold")
    if kind == "lm":  # language models: contact precision instead of structure scores
        from pipeline.report_lm import build_lm_report

        return build_lm_report(results, out, options, runs, groups)
    run_table = load_runs(results, runs, groups)
    scores = load_scores(results, run_table)
    per_target = per_target_table(scores)
    summary = summary_table(run_table, scores)
    splits = _split_order(summary.split.unique())
    main_split = options.main_split or options.gain_split or splits[0]
    if main_split not in splits:
        raise ValueError(f"report.main_split: split {main_split!r} has no scores (have {', '.join(splits)})")
    trained = [n for n in run_table.index if run_table.loc[n, "method"] not in BASELINE_METHODS.values()]
    curve_names = trained + (["base"] if (results / "runs" / "base" / "metrics.csv").exists() else [])
    curves = load_curves(results, curve_names)

    plots = out / "plots"
    written = {
        "summary": out / "summary.csv",
        "costs": out / "costs.csv",
        "per_target": out / "per_target.csv",
        "pareto": plot_pareto(summary, plots / "tm_vs_params.png", splits),
    }
    for key, result in (("per_target_plot", plot_per_target(per_target, plots / "per_target_vs_base.png", splits)),
                        ("curves", plot_curves(curves, run_table, plots / "training_curves.png")),
                        ("calibration", plot_calibration(per_target, plots / "plddt_calibration.png"))):
        if result is not None:
            written[key] = result
    with atomic_path(written["summary"]) as tmp:
        summary.drop(columns=COST_COLUMNS).to_csv(tmp, index=False, float_format="%.6g")
    costs = summary[summary.split == summary.split.iloc[0]][[*VARIANT, "steps", *COST_COLUMNS]]
    with atomic_path(written["costs"]) as tmp:
        costs.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(written["per_target"]) as tmp:
        per_target.to_csv(tmp, index=False, float_format="%.6g")

    doc = Document(options.title)
    if options.disclaimer:
        doc.note(options.disclaimer)
    n_chains = {s: int(per_target[per_target.split == s].chain_id.nunique()) for s in splits}
    methods = sorted(set(run_table.method), key=_method_sort_key)
    doc.text(f"Results: `{results}`. {len(trained)} runs; methods: {', '.join(methods)}; evaluated splits: "
             + ", ".join(f"{s} ({n_chains[s]} chain{'s' if n_chains[s] != 1 else ''})" for s in splits) + ". "
             "TM-score, GDT-TS and RMSD after the TM-score superposition search; lDDT all-atom and CA-only; "
             "per-target values averaged over seeds, then mean ± sd over targets.")
    for split in [main_split] + [s for s in splits if s != main_split]:
        with_gain = summary[summary.split == split].tm_gain.notna().any()
        chains = ", ".join(sorted(per_target[per_target.split == split].chain_id.unique()))
        if split == options.gain_split:
            title = f"Fine-tuned chains (split `{split}`)"
            caption = ("Each method was fine-tuned on these chains. **TM gain vs base**: mean per-chain change of "
                       "TM-score against the untuned base; **chains improved**: fraction of chains whose TM-score "
                       "went up; **gain / 1M params**: TM gain per million trainable parameters"
                       + ("; **own params**: the method's own trainable parameters (trainable params also count "
                          "the folding head where the group trains it); **gain vs head only**: the adapter's share, "
                          "TM gain over the head-only control" if (summary.head_params > 0).any() else "")
                       + ".")
        elif split == main_split:
            title, caption = f"Split `{split}`", ""
        else:
            title = f"Split `{split}`" + (" (held out, for information)" if options.gain_split else "")
            caption = ("Gains here are against the same untuned base on chains no run was fine-tuned on."
                       if with_gain and options.gain_split else "")
        doc.heading(title)
        doc.text(f"Chains: {chains}.")
        doc.table(display_table(summary, split, with_gain), caption)
    doc.heading("Plots")
    captions = {
        "pareto": "TM-score vs trainable parameters (log scale): one line per method over its ranks; dashed: "
                  "the untuned base and the ideal-helix baseline (no trainable parameters).",
        "per_target_plot": "Per-target TM-score of each method against the untuned base.",
        "curves": "Training loss per step of every run (from metrics.csv).",
        "calibration": "Mean pLDDT vs lDDT of each predicted chain: calibrated confidence lies on the diagonal.",
    }
    for key, caption in captions.items():
        if key in written:
            doc.image(written[key], caption)
    doc.heading("Per-target TM-scores")
    many_groups = per_target["group"].nunique() > 1
    wide = per_target.assign(variant=[_variant_label(*v, False, many_groups) for v in
                                      per_target[VARIANT].itertuples(index=False)])
    wide = wide.pivot_table(index=["split", "chain_id"], columns="variant", values="tm_score", sort=False)
    group_rank = _group_order(run_table)
    order = per_target.drop_duplicates(VARIANT).assign(key=lambda f: f.method.map(_method_sort_key),
                                                        gkey=lambda f: f["group"].map(group_rank))
    order = order.sort_values(["gkey", "key", "rank", "targets", "part"])
    columns = [_variant_label(*v, False, many_groups) for v in order[VARIANT].itertuples(index=False)]
    wide = wide[[c for c in dict.fromkeys(columns) if c in wide.columns]]
    wide = wide.reset_index().round(3)
    wide.columns.name = None
    wide["split"] = pd.Categorical(wide["split"], categories=splits, ordered=True)
    wide = wide.sort_values(["split", "chain_id"])
    shown = wide.head(options.max_target_rows)
    doc.table(shown, f"All {len(wide)} rows are in `per_target.csv`." if len(wide) > len(shown)
              else "Seed-averaged; also in `per_target.csv` with every metric.")
    return write_documents(doc, out, written)


def write_documents(doc, out: Path, written: dict[str, Path]) -> dict[str, Path]:
    """report.md and report.html of `doc` into `out` (atomic), added to `written`."""
    written["md"] = out / "report.md"
    written["html"] = out / "report.html"
    atomic_write_text(written["md"], doc.markdown(out))
    atomic_write_text(written["html"], doc.html())
    return written


def options_from_config(config_path: str | Path | None) -> ReportOptions:
    """The `report:` section of a workflow config (missing keys keep their defaults)."""
    if not config_path:
        return ReportOptions()
    import yaml

    path = Path(config_path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: config: cannot read ({exc})") from exc
    section = config.get("report") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: report: expected a mapping")
    known = {"title", "disclaimer", "gain_split", "main_split", "max_target_rows"}
    unknown = set(section) - known
    if unknown:
        raise ValueError(f"{path}: report.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(known))})")
    training = config.get("training")
    kind = training.get("kind", "fold") if isinstance(training, dict) else None
    return ReportOptions(**{k: v for k, v in section.items() if v is not None}, kind=kind)

"""Predicted step peak memory of fine-tuning ESMFold v1 (36 stem layers + 48 trunk blocks), for
`foldtune train --dry-run` and the warning before a run that will not fit the visible GPU.

The numbers come from `benchmarks/bench_memory_plan.py` (CPU measurements at the real widths with 1-3
layers / blocks, per-unit fit, extrapolated; docs/benchmarks.md section 5), stored in
`pipeline/memory_plan.json` as {"precisions": {"fp32" | "bf16": {crop: {"<mode>|<trunk checkpointing on/off>":
GB}}}}. Modes: "lora+stem", "lorta+stem" (adapters on stem and trunk), "lora frozen stem" (adapters on the trunk
only), "full". bf16 = the step under bf16-mixed autocast, measured with CPU autocast (a proxy for CUDA's). Batch 1,
no recycling; GPU framework overhead (CUDA context, fragmentation) not included. No torch import.
"""

from __future__ import annotations

import json
from pathlib import Path

PLAN_FILE = Path(__file__).with_name("memory_plan.json")
V1_LAYERS, V1_BLOCKS = 36, 48


def load_plan(path: Path = PLAN_FILE) -> dict | None:
    """The measured plan, or None when it has not been measured on this checkout."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_esmfold_v1(cfg: dict) -> bool:
    """Whether the config trains an ESMFold-v1-shaped folding model (the only shape the plan measured)."""
    model = cfg.get("model", {})
    if cfg.get("kind", "fold") != "fold":
        return False
    if model.get("source") == "esmfold_pretrained":
        return True
    if model.get("source") == "esm2_stem":
        return "3B" in str(model.get("esm2") or "") and int(model.get("num_blocks") or 0) == V1_BLOCKS
    size = model.get("size") or {}
    trunk = size.get("trunk") or {}
    return (size.get("hidden_size") == 2560 and size.get("num_hidden_layers") == V1_LAYERS
            and trunk.get("num_blocks") == V1_BLOCKS and trunk.get("sequence_state_dim") == 1024
            and trunk.get("pairwise_state_dim") == 128)


def plan_mode(adapter: dict) -> str:
    """The plan's row for an `adapter:` section (trunk-only adapters: the frozen-stem row)."""
    method, part = adapter.get("method", "lorta"), adapter.get("part", "trunk")
    if method == "full":
        return "full"
    if part == "trunk":
        return "lora frozen stem"
    return "lorta+stem" if method == "lorta" else "lora+stem"


def plan_precision(precision: str) -> tuple[str | None, str]:
    """(the plan's precision for a `trainer.precision`, or None; a note for the line).

    The plan is for GPU runs, so `auto` is what it resolves to on a GPU (bf16-mixed where bf16 is supported,
    pipeline.train._precision), whatever machine runs the dry run."""
    precision = str(precision)
    if precision in ("32", "32-true"):
        return "fp32", ""
    if precision == "bf16-mixed":
        return "bf16", ""
    if precision == "auto":
        return "bf16", " (precision auto = bf16-mixed on a GPU)"
    if precision == "16-mixed":
        # fp16 autocast casts the same ops to a 2-byte type; not measured itself
        return "bf16", " (16-mixed not measured: the bf16-mixed row, same autocast casts)"
    return None, f"precision {precision} not measured (fp32 and bf16-mixed only)"


def _quadratic(points: list[tuple[int, float]], crop: int) -> float:
    """The quadratic in L through three (crop, GB) points, at ``crop`` (Lagrange form)."""
    total = 0.0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if j != i:
                term *= (crop - xj) / (xi - xj)
        total += term
    return total


def row_at_crop(table: dict[str, dict], key: str, crop: int) -> tuple[float, str] | None:
    """(GB, how it was read) of ``key`` at ``crop`` from one precision's {crop: {key: GB}}; None above the measured
    crops (no extrapolation) or when the key is missing.

    A measured crop: its row. Below the smallest: the smallest's (memory grows with the crop: an upper bound).
    Between measured crops: the quadratic in L through the two bracketing crops and the next nearest one, since
    every term of the prediction is at most quadratic in L (pair activations L^2, single activations L, weights
    and optimizer state constant), kept between the two bracketing rows (the 'full' rows are a max() with a
    constant floor, which a quadratic can overshoot). With only two measured crops the
    next crop up (an upper bound: a straight line would undershoot the L^2 growth)."""
    rows = {int(c): float(v[key]) for c, v in table.items() if key in v}
    if not rows:
        return None
    measured = sorted(rows)
    if crop in rows:
        return rows[crop], ""
    if crop < measured[0]:
        return rows[measured[0]], f" (measured crop {measured[0]} >= {crop})"
    if crop > measured[-1]:
        return None
    below = max(c for c in measured if c < crop)
    above = min(c for c in measured if c > crop)
    rest = [c for c in measured if c not in (below, above)]
    if not rest:
        return rows[above], f" (measured crop {above} >= {crop})"
    third = min(rest, key=lambda c: abs(c - crop))
    used = sorted((below, above, third))
    low, high = sorted((rows[below], rows[above]))
    value = min(max(_quadratic([(c, rows[c]) for c in used], crop), low), high)  # between its neighbours
    return value, f" (quadratic in L through measured crops {', '.join(map(str, used))})"


def estimate(cfg: dict, plan: dict | None = None) -> tuple[float | None, str]:
    """(predicted peak GB or None, one line saying what it is) for a resolved training config."""
    if not is_esmfold_v1(cfg):
        return None, "memory plan: measured for ESMFold v1 shapes (36 stem layers, 48 blocks) only; none for this model"
    plan = load_plan() if plan is None else plan
    if not plan or not plan.get("precisions"):
        return None, "memory plan: not measured on this checkout (run benchmarks/bench_memory_plan.py --json " \
                     "pipeline/memory_plan.json)"
    precision, precision_note = plan_precision(cfg.get("trainer", {}).get("precision", "auto"))
    if precision is None:
        return None, f"memory plan: {precision_note}"
    table = plan["precisions"].get(precision)
    if not table:
        return None, f"memory plan: {precision} not measured on this checkout"
    crop = int(cfg.get("data", {}).get("crop_size") or 0)
    ckpt = "on" if cfg.get("trainer", {}).get("grad_checkpointing") else "off"
    mode = plan_mode(cfg.get("adapter", {}))
    key = f"{mode}|{ckpt}"
    if not any(key in row for row in table.values()):
        return None, f"memory plan: {mode} with trunk checkpointing {ckpt} not measured ({precision})"
    found = row_at_crop(table, key, crop)
    if found is None:
        measured = sorted(int(c) for c in table)
        return None, (f"memory plan: crop {crop} is above the measured {precision} crops "
                      f"({', '.join(map(str, measured))})")
    gb, crop_note = found
    batch = int(cfg.get("data", {}).get("batch_size") or 1)
    note = "" if batch == 1 else f"; measured for batch 1 (activations grow with the batch of {batch})"
    return gb, (f"memory plan: ESMFold v1, {mode}, crop {crop}{crop_note}, trunk checkpointing {ckpt}, "
                f"{precision}{precision_note}: predicted step peak {gb:.1f} GB (+ CUDA context){note}")

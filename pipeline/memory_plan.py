"""Predicted step peak memory of fine-tuning ESMFold v1 (36 stem layers + 48 trunk blocks), for
`foldtune train --dry-run` and the warning before a run that will not fit the visible GPU.

The numbers come from `benchmarks/bench_memory_plan.py` (CPU measurements at the real widths with 1-3
layers / blocks, per-unit fit, extrapolated; docs/benchmarks.md), stored in `pipeline/memory_plan.json` as
{"crops": {crop: {"<mode>|<trunk checkpointing on/off>": GB}}}. Modes: "lora+stem", "lorta+stem" (adapters on
stem and trunk), "lora frozen stem" (adapters on the trunk only), "full". Batch 1, fp32, no recycling; GPU
framework overhead (CUDA context, fragmentation) not included. No torch import.
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


def estimate(cfg: dict, plan: dict | None = None) -> tuple[float | None, str]:
    """(predicted peak GB or None, one line saying what it is) for a resolved training config."""
    if not is_esmfold_v1(cfg):
        return None, "memory plan: measured for ESMFold v1 shapes (36 stem layers, 48 blocks) only; none for this model"
    plan = load_plan() if plan is None else plan
    if not plan or not plan.get("crops"):
        return None, "memory plan: not measured on this checkout (run benchmarks/bench_memory_plan.py --json " \
                     "pipeline/memory_plan.json)"
    crop = int(cfg.get("data", {}).get("crop_size") or 0)
    measured = sorted(int(c) for c in plan["crops"])
    at_least = [c for c in measured if c >= crop]
    if not at_least:
        return None, f"memory plan: crop {crop} is above the measured crops ({', '.join(map(str, measured))})"
    use = at_least[0]
    ckpt = "on" if cfg.get("trainer", {}).get("grad_checkpointing") else "off"
    mode = plan_mode(cfg.get("adapter", {}))
    table = plan["crops"][str(use)]
    key = f"{mode}|{ckpt}"
    if key not in table:
        return None, f"memory plan: {mode} with trunk checkpointing {ckpt} not measured"
    gb = float(table[key])
    batch = int(cfg.get("data", {}).get("batch_size") or 1)
    note = "" if batch == 1 else f"; measured for batch 1 (activations grow with the batch of {batch})"
    crop_note = "" if use == crop else f" (measured crop {use} >= {crop})"
    return gb, (f"memory plan: ESMFold v1, {mode}, crop {crop}{crop_note}, trunk checkpointing {ckpt}: predicted "
                f"step peak {gb:.1f} GB fp32 (+ CUDA context){note}")

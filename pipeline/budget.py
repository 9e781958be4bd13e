"""Equal-budget mode: pick each low-rank method's rank so that every method trains about the same number of
parameters.

Counting is the one `foldtune params` does: build the base model on the meta device (no memory, no weights),
attach the adapter, count trainable parameters with the adapters module. Counts grow monotonically with the
rank, so a binary search over ranks needs ~log2(max_rank) model builds per method.

Rules (``rule``):
- ``not_above`` (default): the largest rank whose count does not exceed the budget, so no method gets more
  parameters than it was allowed; if even rank 1 exceeds the budget, rank 1 (and the report shows its count).
- ``nearest``: the rank whose count is closest to the budget (ties go to the smaller rank).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

LOW_RANK_METHODS = ("lora", "lorta", "tlora")


@dataclass(frozen=True)
class BudgetChoice:
    method: str
    rank: int
    params: int  # trainable parameters at that rank
    budget: int


def _adapter_dict(adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    from pipeline.config import DEFAULTS

    merged = {**DEFAULTS["adapter"], **adapter_cfg}
    merged["targets"] = list(merged["targets"])
    return merged


def build_meta_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The base model of a `model:` config section on the meta device (shapes only, no memory)."""
    from pipeline.models import build_folding_model

    with torch.device("meta"):
        return build_folding_model(model_cfg)


def count_trainable_params(model_cfg: dict[str, Any], adapter_cfg: dict[str, Any],
                           base_model: torch.nn.Module | None = None) -> int:
    """Trainable parameters of ``model_cfg`` + ``adapter_cfg`` (+ the folding heads if ``model.train_heads``).

    ``base_model``: a model built from ``model_cfg`` to count on instead of rebuilding (it is not modified).
    Without head training this is the adapters module's formula count (`adapters.count_for`, nothing attached);
    with it, the adapter is attached to a copy and the heads unfrozen, exactly as training does, so parameters
    shared by both are counted once.
    """
    import adapters

    config = adapters.config_from_dict(_adapter_dict(adapter_cfg))
    model = base_model if base_model is not None else build_meta_model(model_cfg)
    if not model_cfg.get("train_heads"):
        return int(adapters.count_for(model, config))
    from pipeline.models import head_parameters

    model = copy.deepcopy(model)
    adapters.attach(model, config)
    for parameter in head_parameters(model).values():
        parameter.requires_grad_(True)
    return int(adapters.count_trainable(model))


def rank_for_budget(model_cfg: dict[str, Any], adapter_cfg: dict[str, Any], budget: int,
                    rule: str = "not_above", max_rank: int = 512) -> BudgetChoice:
    """The rank of ``adapter_cfg['method']`` (lora | lorta | tlora) that fits ``budget`` trainable parameters."""
    method = _adapter_dict(adapter_cfg)["method"]
    if method not in LOW_RANK_METHODS:
        raise ValueError(f"grid.budget: method {method!r} has no rank to choose (only {', '.join(LOW_RANK_METHODS)})")
    if rule not in ("not_above", "nearest"):
        raise ValueError(f"grid.budget.rule: {rule!r} is not one of not_above, nearest")
    if budget < 1 or max_rank < 1:
        raise ValueError(f"grid.budget: params ({budget}) and max_rank ({max_rank}) must be >= 1")
    base = build_meta_model(model_cfg)
    counts: dict[int, int] = {}

    def count(rank: int) -> int:
        if rank not in counts:
            counts[rank] = count_trainable_params(model_cfg, {**adapter_cfg, "rank": rank}, base_model=base)
        return counts[rank]

    # Largest rank in [1, max_rank] with count <= budget (0 if none), by bisection on the monotone count.
    low, high = 0, max_rank
    while low < high:
        mid = (low + high + 1) // 2
        if count(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    best = max(low, 1)
    if rule == "nearest" and low < max_rank:
        above = low + 1
        if low == 0 or abs(count(above) - budget) < abs(budget - count(low)):
            best = above
    return BudgetChoice(method=method, rank=best, params=count(best), budget=budget)


def equal_budget_ranks(model_cfg: dict[str, Any], adapter_cfg: dict[str, Any], methods: list[str], budget: int,
                       rule: str = "not_above", max_rank: int = 512) -> dict[str, BudgetChoice]:
    """{method: BudgetChoice} for every low-rank method in ``methods`` (full / none keep their own count)."""
    return {method: rank_for_budget(model_cfg, {**adapter_cfg, "method": method}, budget, rule, max_rank)
            for method in methods if method in LOW_RANK_METHODS}

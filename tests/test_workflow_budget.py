"""Equal-budget mode: the chosen ranks fit the budget by the documented rule, their counts are the ones a real
(non-meta) model has after `adapters.attach`, and the workflow names its runs by those ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import adapters
from pipeline.budget import count_trainable_params, equal_budget_ranks, rank_for_budget
from pipeline.models import build_folding_model, head_parameters

MODEL = {"source": "random", "size": {"trunk": {"num_blocks": 1}}}
ADAPTER = {"alpha": 16, "targets": ["attn", "mlp"], "part": "trunk"}


def attached_count(model_cfg: dict, method: str, rank: int) -> int:
    """Trainable parameters of a real CPU model after attaching, as training counts them."""
    torch.manual_seed(0)
    model = build_folding_model(model_cfg)
    adapters.attach(model, adapters.config_from_dict({**ADAPTER, "method": method, "rank": rank}))
    if model_cfg.get("train_heads"):
        for parameter in head_parameters(model).values():
            parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "lorta", "tlora"])
def test_not_above_rank_is_the_largest_within_budget_and_counts_match_a_real_model(method: str):
    budget = 6000
    choice = rank_for_budget(MODEL, {**ADAPTER, "method": method}, budget, rule="not_above", max_rank=128)
    assert choice.method == method and choice.budget == budget
    assert choice.params == attached_count(MODEL, method, choice.rank)
    assert choice.params <= budget
    assert attached_count(MODEL, method, choice.rank + 1) > budget


def test_nearest_rule_and_train_heads():
    lora_r1 = count_trainable_params(MODEL, {**ADAPTER, "method": "lora", "rank": 1})
    # A budget 40 % of the way from rank 2 to rank 3: not_above -> 2, nearest -> 2; at 60 % nearest -> 3.
    r2, r3 = 2 * lora_r1, 3 * lora_r1  # LoRA counts are linear in the rank: r * (d_in + d_out) per layer
    assert count_trainable_params(MODEL, {**ADAPTER, "method": "lora", "rank": 3}) == r3
    assert rank_for_budget(MODEL, {**ADAPTER, "method": "lora"}, int(r2 + 0.4 * (r3 - r2)), "nearest").rank == 2
    assert rank_for_budget(MODEL, {**ADAPTER, "method": "lora"}, int(r2 + 0.6 * (r3 - r2)), "nearest").rank == 3
    assert rank_for_budget(MODEL, {**ADAPTER, "method": "lora"}, int(r2 + 0.6 * (r3 - r2)), "not_above").rank == 2
    # A budget below rank 1: rank 1 (its count shows the overshoot).
    assert rank_for_budget(MODEL, {**ADAPTER, "method": "lora"}, 10).rank == 1
    heads = {**MODEL, "train_heads": True}
    assert count_trainable_params(heads, {**ADAPTER, "method": "lora", "rank": 2}) == attached_count(heads, "lora", 2)
    ranks = equal_budget_ranks(MODEL, ADAPTER, ["lora", "lorta", "full", "none"], 6000)
    assert set(ranks) == {"lora", "lorta"}
    with pytest.raises(ValueError, match="grid.budget: method 'full'"):
        rank_for_budget(MODEL, {**ADAPTER, "method": "full"}, 6000)


def test_workflow_runs_use_the_budget_ranks(tmp_path: Path):
    from tests.test_workflow_dag import job_counts, micro_config, snakemake

    config = micro_config(tmp_path, **{"grid.methods": ["lora", "lorta", "full"], "grid.seeds": [0],
                                       "grid.budget": {"params": 6000}, "base_training.model": MODEL,
                                       "training.adapter": ADAPTER})
    result = snakemake("--configfile", str(config), "-n", "-p", "--directory", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {m: rank_for_budget(MODEL, {**ADAPTER, "method": m}, 6000).rank for m in ("lora", "lorta")}
    for method, rank in expected.items():
        assert f"output_dir=results/micro/runs/{method}_r{rank}_s0" in result.stdout
        assert f"adapter.method={method}" in result.stdout
    assert job_counts(result.stdout)["train"] == 4  # lora, lorta, full, none
    cached = json.loads((tmp_path / "results/micro/budget.json").read_text())
    assert cached["ranks"]["lora|attn+mlp|trunk"]["rank"] == expected["lora"]
    assert cached["ranks"]["lora|attn+mlp|trunk"]["trainable_params"] <= 6000
    assert yaml.safe_load((tmp_path / "results/micro/workflow_config.yaml").read_text())["grid"]["budget"] == {
        "params": 6000, "rule": "not_above", "max_rank": 512}

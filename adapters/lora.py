"""LoRA (Hu et al. 2021): dW = (alpha / r) * B @ A on every selected Linear."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapters.config import Method, RankConfig, register_method
from adapters.layer import LinearAdapter, install
from adapters.spec import ModelSpec, Site, Stack, roles_for


@dataclass
class LoRAConfig(RankConfig):
    """LoRA: A (r, d_in) kaiming-uniform(a=sqrt 5), B (d_out, r) zero, dropout on the adapter input."""


class LoRALinear(LinearAdapter):
    """x (..., d_in) -> scaling * dropout(x) @ A.T @ B.T  (..., d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scaling: float, dropout: float,
                 out_rows: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        super().__init__(d_in, d_out, out_rows)
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=device))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.rows, rank, device=device))  # (rows, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., r): scaling * dropout(x) @ A.T (scaling on the narrow side)."""
        return (self.dropout(x) @ self.lora_A.T) * self.scaling

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.place_rows(self._hidden(x) @ self.lora_B.T)

    def rank_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.out_rows is not None else (self._hidden(x), self.lora_B.T)

    def get_delta_weight(self) -> torch.Tensor:
        dense = (self.lora_B @ self.lora_A) * self.scaling  # (rows, d_in)
        if self.out_rows is None:
            return dense
        return dense.new_zeros(self.d_out, self.d_in).index_copy(0, self.out_rows, dense)


def selected_rows(stack: Stack, site: Site, roles: frozenset[str]) -> torch.Tensor | None:
    """Output rows of the selected blocks of `site` (None = all rows).

    Only output-long sites (fused qkv, fc1) can be partly selected; for those the row of block s, head h,
    within-head j is s*dim + h*head_dim + j, or h*blocks*head_dim + s*head_dim + j when interleaved.
    """
    keep = site.selected(roles)
    if all(keep):
        return None
    if site.long_axis != "out":
        raise ValueError(f"{site.path}: partial target selection needs an output-split site")
    blocks = len(site.types)
    index = torch.arange(blocks * stack.dim)
    if site.interleaved:
        block_of_row = (index // stack.head_dim) % blocks
    else:
        block_of_row = index // stack.dim
    mask = torch.tensor(keep)[block_of_row]
    return index[mask]


def site_linear(model: nn.Module, path: str) -> nn.Linear:
    return model.get_submodule(path)


def _attach(model: nn.Module, spec: ModelSpec, config: LoRAConfig) -> None:
    roles = roles_for(config.targets)
    for stack in spec.stacks_for(config.part):
        for site in stack.selected_sites(roles):
            linear = site_linear(model, site.path)
            rows = selected_rows(stack, site, roles)
            install(linear, LoRALinear(linear.in_features, linear.out_features, config.rank, config.scaling,
                                       config.dropout, rows, device=linear.weight.device))


def _count(model: nn.Module, spec: ModelSpec, config: LoRAConfig) -> dict[str, int]:
    roles = roles_for(config.targets)
    out = {}
    for stack in spec.stacks_for(config.part):
        total = 0
        for site in stack.selected_sites(roles):
            linear = site_linear(model, site.path)
            rows = selected_rows(stack, site, roles)
            total += config.rank * (linear.in_features + (linear.out_features if rows is None else rows.numel()))
        out[stack.name] = total
    return out


METHOD = register_method(Method("lora", LoRAConfig, _attach, _count, "dW = (alpha/r) B A per Linear"))

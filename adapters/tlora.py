"""TLoRA (Islam et al., arXiv 2504.18735): dW = alpha * A @ B @ C with A, C frozen random, B and alpha trained.

In the `y = x @ dW` convention of the paper: A (d_in, r) and C (r, d_out) are kaiming-normal(a=sqrt 5)
and frozen, B (r, r) starts at zero, alpha is one learnable scalar per adapted Linear (init 1). A and C
are regenerated from a per-module seed (config seed + module path), so they are non-persistent buffers
and adapter files hold only B and alpha. The config's `alpha` is accepted for a uniform config shape but
unused: TLoRA's alpha is learned. Dropout (paper: 0.5) acts on the adapter output.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from adapters.config import Method, RankConfig, register_method
from adapters.layer import LinearAdapter, install
from adapters.lora import selected_rows, site_linear
from adapters.spec import ModelSpec, roles_for


@dataclass
class TLoRAConfig(RankConfig):
    seed: int = 0


def module_seed(seed: int, path: str) -> int:
    """Deterministic per-module seed (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"tlora:{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_projections(d_in: int, rows: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (d_in, r), C (r, rows): kaiming-normal(a=sqrt 5) from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = nn.init.kaiming_normal_(torch.empty(d_in, rank), a=math.sqrt(5), generator=generator)
    c = nn.init.kaiming_normal_(torch.empty(rank, rows), a=math.sqrt(5), generator=generator)
    return a, c


class TLoRALinear(LinearAdapter):
    """x (..., d_in) -> dropout(alpha * x @ A @ B @ C)  (..., d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, seed: int, dropout: float,
                 out_rows: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        super().__init__(d_in, d_out, out_rows)
        self.seed = seed
        self.register_buffer("tlora_A", torch.empty(d_in, rank, device=device), persistent=False)
        self.register_buffer("tlora_C", torch.empty(rank, self.rows, device=device), persistent=False)
        self.tlora_B = nn.Parameter(torch.zeros(rank, rank, device=device))
        self.tlora_alpha = nn.Parameter(torch.ones(1, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.regenerate()

    @torch.no_grad()
    def regenerate(self) -> None:
        """Redraw the frozen A and C from the stored seed (bit-identical on every call)."""
        if self.tlora_A.device.type == "meta":
            return
        a, c = random_projections(self.d_in, self.rows, self.tlora_B.shape[0], self.seed)
        self.tlora_A.copy_(a)
        self.tlora_C.copy_(c)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., r): alpha * x @ A @ B."""
        return (x @ self.tlora_A) @ self.tlora_B * self.tlora_alpha

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.place_rows(self.dropout(self._hidden(x) @ self.tlora_C))

    def rank_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        output_dropout = isinstance(self.dropout, nn.Dropout) and self.training
        if self.out_rows is not None or output_dropout:
            return None
        return self._hidden(x), self.tlora_C

    def get_delta_weight(self) -> torch.Tensor:
        dense = (self.tlora_A @ self.tlora_B @ self.tlora_C * self.tlora_alpha).T  # (rows, d_in)
        if self.out_rows is None:
            return dense
        return dense.new_zeros(self.d_out, self.d_in).index_copy(0, self.out_rows, dense)


def _attach(model: nn.Module, spec: ModelSpec, config: TLoRAConfig) -> None:
    roles = roles_for(config.targets)
    for stack in spec.stacks_for(config.part):
        for site in stack.selected_sites(roles):
            linear = site_linear(model, site.path)
            install(linear, TLoRALinear(linear.in_features, linear.out_features, config.rank,
                                        module_seed(config.seed, site.path), config.dropout,
                                        selected_rows(stack, site, roles), device=linear.weight.device))


def _count(model: nn.Module, spec: ModelSpec, config: TLoRAConfig) -> dict[str, int]:
    roles = roles_for(config.targets)
    return {stack.name: len(stack.selected_sites(roles)) * (config.rank ** 2 + 1)
            for stack in spec.stacks_for(config.part)}


METHOD = register_method(Method("tlora", TLoRAConfig, _attach, _count, "dW = alpha A B C, A/C frozen random"))

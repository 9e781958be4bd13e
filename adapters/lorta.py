"""LoRTA (Hounie et al., arXiv 2410.04060): one rank-r CP tensor per stack, factorised forward.

Per stack, T in R^{d x d_h x H x L x M} = sum_k a_k o b_k o c^H_k o c^L_k o c^M_k with factors
A (d, r), B (r, d_h), C_H (H, r), C_L (L, r), C_M (M, r), all trainable and shared by the stack.
The d x d block of matrix type m in layer l is

    G[l,m][i, h*d_h + j] = scaling * sum_k A[i,k] C_H[h,k] C_L[l,k] C_M[m,k] B[k,j]      (scaling = alpha/r)

where i indexes the "A side" and (h, j) the "head side" of the block. Orientation ("heads", default):
the head side is the block's *output* for q, k, v and fc1 slices (dW_block = G.T) and its *input* for o
and fc2 slices (dW_block = G), so every head's update stays inside that head. "output" / "input" put the
head side on the output / input of every block (the lit-gpt / peft-fork reference conventions).

MLP matrices are cut into dim x dim slices that are extra matrix types (fc1.0..fc1.3, fc2.0..fc2.3 for a
4*dim MLP: attention + MLP gives M = 12). Fused projections map their blocks to q, k, v entries with the
per-head interleaving respected (see `adapters.spec.Site`).

The forward never builds a dense dW: cost per adapted block is that of a rank-r LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapters.config import Method, RankConfig, register_method
from adapters.layer import AdapterModule, LinearAdapter, install
from adapters.lora import site_linear
from adapters.spec import ModelSpec, Site, Stack, roles_for

ORIENTATIONS = ("heads", "output", "input")
FACTORS_ATTR = "lorta_stacks"


@dataclass
class LoRTAConfig(RankConfig):
    init_scale: float = 0.0
    orientation: str = "heads"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation: {self.orientation!r}: expected one of {', '.join(ORIENTATIONS)}")
        self.init_scale = float(self.init_scale)


class LoRTAFactors(AdapterModule):
    """The shared CP factors of one stack."""

    def __init__(self, dim: int, heads: int, layers: int, types: list[str], rank: int, init_scale: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.types = list(types)
        self.A = nn.Parameter(torch.empty(dim, rank, device=device))              # (d, r)
        self.B = nn.Parameter(torch.zeros(rank, self.head_dim, device=device))    # (r, d_h)
        self.C_H = nn.Parameter(torch.empty(heads, rank, device=device))          # (H, r)
        self.C_L = nn.Parameter(torch.empty(layers, rank, device=device))         # (L, r)
        self.C_M = nn.Parameter(torch.empty(len(types), rank, device=device))     # (M, r)
        # As the reference: torch fan_in of an (n, r) tensor is r, so A ~ U(+-1/sqrt r) and, with the
        # default init_scale 0, the C factors ~ U(+-sqrt(6/r)).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        for factor in (self.C_H, self.C_L, self.C_M):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5) * init_scale)


class LoRTALinear(LinearAdapter):
    """One Linear of a stack: `len(block_types)` dim x dim blocks of the stack's CP tensor.

    The factors are a non-registered reference (they are registered once, in `<root>.lorta_stacks`).
    """

    def __init__(self, factors: LoRTAFactors, site: Site, head_axis: str, type_index: list[int],
                 keep: list[bool], scaling: float, dropout: float, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.__dict__["factors"] = factors
        self.layer = site.layer
        self.long_axis = site.long_axis
        self.head_axis = head_axis
        self.interleaved = site.interleaved
        self.scaling = scaling
        self.blocks = len(type_index)
        device = factors.A.device
        self.register_buffer("type_index", torch.tensor(type_index, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.float32, device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _coef(self) -> torch.Tensor:
        """(S, r): C_L[l] * C_M[m_s] * scaling, zero for unselected blocks."""
        f = self.factors
        return f.C_L[self.layer] * f.C_M[self.type_index] * (self.keep * self.scaling)[:, None]

    def _blocks_view(self, t: torch.Tensor) -> torch.Tensor:
        """(..., S*d) -> (..., S, H, d_h) following the site's layout."""
        f = self.factors
        if self.interleaved:
            return t.unflatten(-1, (f.heads, self.blocks, f.head_dim)).transpose(-3, -2)
        return t.unflatten(-1, (-1, f.heads, f.head_dim))

    def _rank_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d_in) -> h (..., S_out, r) and right (r, d): the update's output blocks are h @ right.

        The head-side factors enter as one (r, d) matrix `HB[k, h*d_h + j] = C_H[h, k] B[k, j]`, so both
        sides are plain rank-r matmuls, as in LoRA: cost ~ n * r * (d_in + d_out), no dense dW and no
        (n, H, r) intermediate.
        """
        f = self.factors
        head_mix = (f.C_H.T[:, :, None] * f.B[:, None, :]).flatten(1)  # (r, H * d_h) = (r, d)
        x = self.dropout(x)
        xs = self._blocks_view(x).flatten(-2) if self.long_axis == "in" else x.unsqueeze(-2)  # (..., S_in, d)
        p = xs @ (head_mix.T if self.head_axis == "in" else f.A)   # (..., S_in, r)
        coef = self._coef()                                        # (S, r)
        if self.long_axis == "in":
            q = (p * coef).sum(-2, keepdim=True)                   # (..., 1, r)
        else:
            q = p * coef                                           # (..., S_out, r)
        return q, (head_mix if self.head_axis == "out" else f.A.T)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) -> (..., d_out)."""
        f = self.factors
        h, right = self._rank_space(x)
        y = (h @ right).reshape(*x.shape[:-1], -1, f.heads, f.head_dim)  # (..., S_out, H, d_h)
        if self.long_axis == "out" and self.interleaved:
            y = y.transpose(-3, -2)                              # (..., H, S, d_h)
        return y.flatten(-3)

    def rank_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Interleaved output blocks are (H, S, d_h) in memory, not the (S, H, d_h) order of h @ right.
        if self.long_axis == "out" and self.interleaved:
            return None
        return self._rank_space(x)

    def get_delta_weight(self) -> torch.Tensor:
        """Dense dW (d_out, d_in) from the CP factors (merge and tests only)."""
        f = self.factors
        d = f.dim
        core = torch.einsum("ik,sk,hk,kj->sihj", f.A, self._coef(), f.C_H, f.B).reshape(self.blocks, d, d)
        # core[s, i, (h, j)]: i = A side, (h, j) = head side
        blocks = core.transpose(1, 2) if self.head_axis == "out" else core   # (S, out, in) per block
        if self.long_axis == "out":
            dense = blocks.reshape(self.blocks, f.heads, f.head_dim, d)      # rows (s, h, j)
            if self.interleaved:
                dense = dense.transpose(0, 1)                                # rows (h, s, j)
            return dense.reshape(self.blocks * d, d)
        if self.long_axis == "in":
            dense = blocks.reshape(self.blocks, d, f.heads, f.head_dim)      # cols (s, h, j)
            dense = dense.permute(1, 2, 0, 3) if self.interleaved else dense.permute(1, 0, 2, 3)
            return dense.reshape(d, self.blocks * d)
        return blocks[0]


def head_axis_for(site: Site, orientation: str) -> str:
    return site.head_axis if orientation == "heads" else {"output": "out", "input": "in"}[orientation]


def stack_factors(model: nn.Module, stack: Stack) -> LoRTAFactors | None:
    root = model.get_submodule(stack.root) if stack.root else model
    holder = root._modules.get(FACTORS_ATTR)
    return None if holder is None else holder[stack.name]


def _attach(model: nn.Module, spec: ModelSpec, config: LoRTAConfig) -> None:
    roles = roles_for(config.targets)
    for stack in spec.stacks_for(config.part):
        sites = stack.selected_sites(roles)
        if not sites:
            continue
        types = stack.types(roles)
        first = site_linear(model, sites[0].path)
        factors = LoRTAFactors(stack.dim, stack.heads, stack.layers, types, config.rank, config.init_scale,
                               device=first.weight.device)
        root = model.get_submodule(stack.root) if stack.root else model
        if FACTORS_ATTR not in root._modules:
            root.add_module(FACTORS_ATTR, nn.ModuleDict())
        root._modules[FACTORS_ATTR][stack.name] = factors
        for site in sites:
            linear = site_linear(model, site.path)
            keep = list(site.selected(roles))
            type_index = [types.index(t) if k else 0 for t, k in zip(site.types, keep)]
            install(linear, LoRTALinear(factors, site, head_axis_for(site, config.orientation), type_index, keep,
                                        config.scaling, config.dropout, linear.in_features, linear.out_features))


def _detach(model: nn.Module, spec: ModelSpec, config: LoRTAConfig) -> None:
    for stack in spec.stacks_for(config.part):
        root = model.get_submodule(stack.root) if stack.root else model
        root._modules.pop(FACTORS_ATTR, None)


def stack_count(stack: Stack, config: LoRTAConfig) -> int:
    """r * (d + d_h + H + L + M); 0 when no site of the stack is selected."""
    roles = roles_for(config.targets)
    if not stack.selected_sites(roles):
        return 0
    return config.rank * (stack.dim + stack.head_dim + stack.heads + stack.layers + len(stack.types(roles)))


def _count(model: nn.Module, spec: ModelSpec, config: LoRTAConfig) -> dict[str, int]:
    return {stack.name: stack_count(stack, config) for stack in spec.stacks_for(config.part)}


METHOD = register_method(Method("lorta", LoRTAConfig, _attach, _count, "one CP tensor per stack", detach=_detach))

"""LoRTA forward the reference implementation's way, for benchmarking against foldtune's factorised one.

The reference (`ihounie/lorta`, peft fork `LorTaModel.forward`; see shared docs adapters.md §1.4) rebuilds,
before every forward, the dense update of *every* (layer l, matrix type m) of the CP tensor:

    G[l, m] = cat_h( A @ diag(C_H[h] * C_L[l] * C_M[m]) @ B , dim=1 )      # (d, H*d_h) = (d, d)

(H small matmuls + one cat per matrix, L·M matrices), then each adapted Linear adds x @ ΔWᵀ · scaling
with ΔW = Gᵀ when heads split the output (q, k, v) and ΔW = G when they split the input (o).

`DenseDeltaLoRTA(model)` swaps that in for foldtune's LoRTA math on a model that has foldtune LoRTA
attached (same factors, so both paths train the same parameters and must give the same outputs):
a model forward-pre-hook builds all G[l, m] (with autograd), and each LoRTA adapter's `delta` is replaced
by the dense matmul (and its fused `rank_space` path switched off). Use it as a context manager, or
`install()` / `remove()`.

The reference itself adapts Q, K, V, O only. For attention + MLP (M = 12) the same rule is extended to
foldtune's block-split MLP sites: fc1's four d×d slices stacked along the output (head side on the output,
ΔW_s = G[l, m_s]ᵀ) and fc2's along the input (ΔW_s = G[l, m_s]), i.e. all L·M dense updates per step as
the issue describes. Fused / interleaved projections (ESMFold trunk) are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.layer import adapted_linears
from adapters.lorta import LoRTAFactors, LoRTALinear


def dense_updates(f: LoRTAFactors) -> dict[tuple[int, int], torch.Tensor]:
    """Every G[l, m] (d, d) of one stack, built as the reference does (no scaling applied)."""
    layers, types = f.C_L.shape[0], f.C_M.shape[0]
    out = {}
    for layer in range(layers):
        for m in range(types):
            per_head = [f.A @ torch.diag(f.C_H[h] * f.C_M[m] * f.C_L[layer]) @ f.B for h in range(f.heads)]
            out[layer, m] = torch.cat(per_head, dim=1)
    return out


def _no_rank_space(x: torch.Tensor) -> None:
    """Keeps the adapter hook on `delta` (the dense path) instead of the fused factorised addmm."""
    return None


class DenseDeltaLoRTA:
    """Reference-style dense-ΔW forward for the foldtune LoRTA adapters of `model` (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: list[LoRTALinear] = []
        for path, _, adapter in adapted_linears(model):
            if not isinstance(adapter, LoRTALinear):
                raise ValueError(f"{path}: not a LoRTA adapter ({type(adapter).__name__})")
            if adapter.interleaved:
                raise ValueError(f"{path}: interleaved fused site; the dense reference handles q/k/v/o and "
                                 "block-split MLP Linears only")
            self.adapters.append(adapter)
        if not self.adapters:
            raise ValueError("model: no foldtune LoRTA adapters attached")
        self.factors = list({id(a.factors): a.factors for a in self.adapters}.values())
        self.updates: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self.calls = 0  # dense deltas evaluated (tests check the dense path really ran)

    @property
    def n_adapted(self) -> int:
        return len(self.adapters)

    def _build_all(self, module: nn.Module, args: tuple) -> None:
        self.updates = {id(f): dense_updates(f) for f in self.factors}

    def _dense_weight(self, adapter: LoRTALinear) -> torch.Tensor:
        """ΔW (d_out, d_in) of one adapted Linear from the prebuilt G[l, m], scaling and block selection applied."""
        updates = self.updates[id(adapter.factors)]
        blocks = []
        for s, m in enumerate(adapter.type_index.tolist()):
            g = updates[adapter.layer, m]
            blocks.append((g.T if adapter.head_axis == "out" else g) * (adapter.scaling * adapter.keep[s]))
        if adapter.long_axis is None:
            return blocks[0]
        return torch.cat(blocks, dim=0 if adapter.long_axis == "out" else 1)

    def _dense_delta(self, adapter: LoRTALinear):
        def delta(x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return F.linear(adapter.dropout(x), self._dense_weight(adapter))

        return delta

    def install(self) -> None:
        if self._hook is not None:
            return
        self._hook = self.model.register_forward_pre_hook(self._build_all)
        for adapter in self.adapters:
            adapter.delta = self._dense_delta(adapter)  # instance attributes shadow LoRTALinear's methods
            adapter.rank_space = _no_rank_space

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        for adapter in self.adapters:
            del adapter.delta
            del adapter.rank_space
        self.updates = {}

    def __enter__(self) -> DenseDeltaLoRTA:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

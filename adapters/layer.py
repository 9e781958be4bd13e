"""Adapter layers: modules that live *inside* an adapted `nn.Linear` and add to its output.

The base Linear is never replaced, so base parameter names (and checkpoints keyed by them) do not change:
the adapter is registered as the child `<linear>.adapter` and a forward hook adds `adapter(x)` to the
Linear's output. Adapter parameters stay fp32 whatever dtype the base is cast to, and the adapter branch
runs in fp32 (autocast off) and is cast back to the output dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

ADAPTER_ATTR = "adapter"


class AdapterModule(nn.Module):
    """Any module owning adapter parameters; its floating parameters and buffers always stay fp32."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        for tensor in [*self.parameters(recurse=False), *self.buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on the device of `x` (so the adapter math stays fp32 under bf16/fp16 autocast)."""
    if x.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class LinearAdapter(AdapterModule):
    """An adapter on one Linear with weight `(d_out, d_in)`.

    Subclasses implement `delta(x)`: `(..., d_in)` fp32 -> `(..., d_out)` fp32, the adapter's contribution
    `x @ dW.T`, and `get_delta_weight()` -> dense `dW` `(d_out, d_in)` fp32 (merge and tests only).

    `out_rows` (optional, LoRA/TLoRA): the adapter only writes these output rows (e.g. the q and v rows of
    a fused qkv projection when targets = qv); other rows get 0.
    """

    def __init__(self, d_in: int, d_out: int, out_rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.merged = False
        self.register_buffer("out_rows", out_rows, persistent=False)

    @property
    def rows(self) -> int:
        return self.d_out if self.out_rows is None else int(self.out_rows.numel())

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def place_rows(self, y: torch.Tensor) -> torch.Tensor:
        """(..., rows) -> (..., d_out), zeros outside `out_rows`."""
        if self.out_rows is None:
            return y
        return y.new_zeros(*y.shape[:-1], self.d_out).index_copy(-1, self.out_rows, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_region(x):
            return self.delta(x.float())

    def rank_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(h, right)` with `delta(x).reshape(-1, w) == h.reshape(-1, k) @ right`, right `(k, w)`.

        Subclasses whose update ends in one small matmul return it so `add_to` can fuse it with the sum;
        None (the default) means "not expressible here" (row selection, output dropout, interleaving).
        """
        return None

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`output + delta(x)`: the Linear's output (..., d_out) plus this adapter's, in output's dtype.

        In fp32 without autocast the last adapter matmul and the sum are one GEMM with beta = 1
        (`addmm`): no (n, d_out) temporary and no separate add, forward or backward.
        """
        if output.dtype == torch.float32 and x.dtype == torch.float32 and not torch.is_autocast_enabled(
            x.device.type
        ):
            factors = self.rank_space(x)
            if factors is not None:
                h, right = factors
                flat = torch.addmm(output.reshape(-1, right.shape[1]), h.reshape(-1, right.shape[0]), right)
                return flat.view(output.shape)
        return output + self(x).to(output.dtype)

    @torch.no_grad()
    def merge(self, linear: nn.Linear) -> None:
        if not self.merged:
            linear.weight.copy_((linear.weight.float() + self.get_delta_weight()).to(linear.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self, linear: nn.Linear) -> None:
        if self.merged:
            linear.weight.copy_((linear.weight.float() - self.get_delta_weight()).to(linear.weight.dtype))
            self.merged = False


def _add_adapter_output(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    adapter = linear._modules[ADAPTER_ATTR]
    if adapter.merged:
        return output
    return adapter.add_to(output, args[0])


def install(linear: nn.Linear, adapter: LinearAdapter) -> None:
    """Register `adapter` as `linear.adapter` and hook it into the Linear's forward."""
    if ADAPTER_ATTR in linear._modules:
        raise ValueError(f"{type(linear).__name__} already has an adapter attached")
    linear.add_module(ADAPTER_ATTR, adapter)
    adapter.__dict__["hook"] = linear.register_forward_hook(_add_adapter_output)  # not a submodule


def uninstall(linear: nn.Linear) -> LinearAdapter:
    """Undo `install`: remove the hook and the `linear.adapter` child; returns the removed adapter."""
    adapter = linear._modules.pop(ADAPTER_ATTR)
    adapter.__dict__.pop("hook").remove()
    return adapter


def adapted_linears(model: nn.Module) -> list[tuple[str, nn.Linear, LinearAdapter]]:
    """Every (path, linear, adapter) of `model`, in module order."""
    return [(name, module, module._modules[ADAPTER_ATTR]) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and isinstance(module._modules.get(ADAPTER_ATTR), LinearAdapter)]

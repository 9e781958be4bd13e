"""attach / merge / unmerge / counting: the method-independent entry points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapters.config import AdapterConfig, RankConfig, get_method
from adapters.layer import AdapterModule, adapted_linears, uninstall
from adapters.provenance import fingerprint
from adapters.spec import ModelSpec, roles_for, spec_for, validate_spec

STATE_ATTR = "foldtune_adapter"


@dataclass
class AttachState:
    """What `attach` did to a model (kept on the model as `model.foldtune_adapter`)."""

    config: AdapterConfig
    spec: ModelSpec
    base: dict[str, Any] = field(default_factory=dict)      # {"source": ..., "fingerprint": ...} of the base
    requires_grad: dict[str, bool] = field(default_factory=dict)  # before attach, restored by detach
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # base values `load` overwrote (keep_base)


def attached(model: nn.Module) -> AttachState | None:
    return model.__dict__.get(STATE_ATTR)


def attach(model: nn.Module, config: AdapterConfig, base_source: Any = None) -> nn.Module:
    """Freeze the base model and add the adapters of `config`, in place; returns `model`.

    Records the base (`base_source`: where it came from, any JSON value; and a fingerprint of its weights,
    see adapters.provenance) so `adapters.save` can write it. Works on the meta device (no weights are
    touched). Raises ValueError if adapters are already attached or the model has no spec / not the part.
    """
    if attached(model) is not None:
        raise ValueError(f"model already has adapters attached (method {attached(model).config.method}); "
                         f"call adapters.detach first (or build a fresh model)")
    method = get_method(config.method)
    if not isinstance(config, method.config_cls):
        raise TypeError(f"config: {type(config).__name__} is not a {method.config_cls.__name__}")
    spec = spec_for(model)
    validate_spec(model, spec)
    spec.stacks_for(config.part)  # validates part
    base = {"source": base_source, "fingerprint": fingerprint(model)}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    method.attach(model, spec, config)
    model.__dict__[STATE_ATTR] = AttachState(config, spec, base, requires_grad)
    return model


def detach(model: nn.Module, keep_merged: bool = False) -> nn.Module:
    """Remove the attached adapters, in place, leaving the base model as it was before `attach`.

    Merged adapters are unmerged first (unless `keep_merged`: the weights keep the merged update, as for an
    export of the merged model); base values `adapters.load(..., keep_base=True)` overwrote (trained
    heads, method=full weights) are put back; requires_grad flags are restored. Parameter names are those
    of the base again, so another adapter can be attached (many adapters, one base).
    """
    state = attached(model)
    if state is None:
        raise ValueError("model has no adapters attached")
    if not keep_merged:
        unmerge(model)
    for _, linear, _ in adapted_linears(model):
        uninstall(linear)
    method = get_method(state.config.method)
    if method.detach is not None:
        method.detach(model, state.spec, state.config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.replaced.items():
            params[name].copy_(value)
    for name, flag in state.requires_grad.items():
        params[name].requires_grad_(flag)
    del model.__dict__[STATE_ATTR]
    return model


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with requires_grad (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_total(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_for(model: nn.Module, config: AdapterConfig, per_stack: bool = False) -> int | dict[str, int]:
    """What `config` would train on `model`, from the formulas (nothing is attached; meta device is fine).

    With `per_stack=True` returns {stack name (or part for method=full): count}.
    """
    method = get_method(config.method)
    spec = spec_for(model)
    counts = method.count(model, spec, config)
    return counts if per_stack else sum(counts.values())


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then skips the adapter branch)."""
    for _, linear, adapter in adapted_linears(model):
        adapter.merge(linear)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight again (exact up to float rounding)."""
    for _, linear, adapter in adapted_linears(model):
        adapter.unmerge(linear)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters owned by adapter modules (factors, A/B, ...), in model order."""
    owned = {id(p) for m in model.modules() if isinstance(m, AdapterModule) for p in m.parameters(recurse=False)}
    return [name for name, p in model.named_parameters() if id(p) in owned]


def spec_summary(spec: ModelSpec, config: AdapterConfig) -> dict[str, Any]:
    """The spec as recorded in adapter_config.json: model kind, stack dims (L, H, M, d) and head layout."""
    stacks = []
    roles = roles_for(config.targets) if isinstance(config, RankConfig) else None
    for stack in spec.stacks_for(config.part):
        sites = stack.sites if roles is None else stack.selected_sites(roles)
        types = sorted({t for s in stack.sites for t in s.types}) if roles is None else stack.types(roles)
        stacks.append({
            "name": stack.name, "part": stack.part, "root": stack.root,
            "dim": stack.dim, "heads": stack.heads, "head_dim": stack.head_dim, "layers": stack.layers,
            "types": types, "sites": len(sites),
            "fused": sorted({s.path.split(".")[-1] for s in sites if s.interleaved}),
        })
    return {"model_kind": spec.kind, "parts": list(spec.parts), "stacks": stacks,
            "head_layout": "blocks (S, H, d_h) along the long axis; fused projections per-head interleaved (H, S, d_h)"}

"""attach / merge / unmerge / counting: the method-independent entry points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from adapters.config import AdapterConfig, RankConfig, get_method
from adapters.layer import AdapterModule, adapted_linears
from adapters.spec import ModelSpec, roles_for, spec_for, validate_spec

STATE_ATTR = "foldtune_adapter"


@dataclass
class AttachState:
    """What `attach` did to a model (kept on the model as `model.foldtune_adapter`)."""

    config: AdapterConfig
    spec: ModelSpec


def attached(model: nn.Module) -> AttachState | None:
    return model.__dict__.get(STATE_ATTR)


def attach(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze the base model and add the adapters of `config`, in place; returns `model`.

    Works on the meta device (no weights are touched). Raises ValueError if adapters are already attached
    or the model has no spec / not the requested part.
    """
    if attached(model) is not None:
        raise ValueError(f"model already has adapters attached (method {attached(model).config.method}); "
                         f"build a fresh model to attach another")
    method = get_method(config.method)
    if not isinstance(config, method.config_cls):
        raise TypeError(f"config: {type(config).__name__} is not a {method.config_cls.__name__}")
    spec = spec_for(model)
    validate_spec(model, spec)
    spec.stacks_for(config.part)  # validates part
    model.requires_grad_(False)
    method.attach(model, spec, config)
    model.__dict__[STATE_ATTR] = AttachState(config, spec)
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

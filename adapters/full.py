"""method=full (every parameter of the selected part trains) and method=none (everything frozen).

They have no adapter layers; they exist so the pipeline treats every method alike (attach, count, save).
On ESMFold, part="stem" = parameters under `esm.`, part="trunk" = every parameter outside the stem
(trunk, structure module, heads), part="all" = everything. On a language model the whole model is the stem.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adapters.config import AdapterConfig, Method, register_method
from adapters.spec import ModelSpec, check_part


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning of the selected part."""


@dataclass
class NoneConfig(AdapterConfig):
    """No training at all (base-model reference)."""


def in_part(name: str, spec: ModelSpec, part: str) -> bool:
    """Does parameter `name` belong to `part` of the model?"""
    if part == "all" or spec.stem_prefix is None:
        return True
    in_stem = name.startswith(spec.stem_prefix + ".")
    return in_stem if part == "stem" else not in_stem


def part_parameters(model: nn.Module, spec: ModelSpec, part: str) -> dict[str, nn.Parameter]:
    check_part(spec, part)
    return {name: p for name, p in model.named_parameters() if in_part(name, spec, part)}


def _attach_full(model: nn.Module, spec: ModelSpec, config: FullConfig) -> None:
    for param in part_parameters(model, spec, config.part).values():
        param.requires_grad_(True)


def _count_full(model: nn.Module, spec: ModelSpec, config: FullConfig) -> dict[str, int]:
    check_part(spec, config.part)
    parts = spec.parts if config.part == "all" else (config.part,)
    return {part: sum(p.numel() for p in part_parameters(model, spec, part).values()) for part in parts}


def _attach_none(model: nn.Module, spec: ModelSpec, config: NoneConfig) -> None:
    check_part(spec, config.part)


def _count_none(model: nn.Module, spec: ModelSpec, config: NoneConfig) -> dict[str, int]:
    check_part(spec, config.part)
    return {}


FULL = register_method(Method("full", FullConfig, _attach_full, _count_full, "all parameters of the part",
                             adds_params=False))
NONE = register_method(Method("none", NoneConfig, _attach_none, _count_none, "nothing trains", adds_params=False))

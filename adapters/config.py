"""Adapter configs and the method registry (name -> config class + attach/count logic)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from adapters.spec import PARTS, TARGET_ROLES

if TYPE_CHECKING:
    from torch import nn

    from adapters.spec import ModelSpec


@dataclass
class AdapterConfig:
    """Fields every method shares. `part`: "stem" | "trunk" | "all" (stem/trunk only exist on ESMFold)."""

    method: ClassVar[str] = ""
    part: str = "all"

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part: {self.part!r}: expected one of {', '.join(PARTS)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class RankConfig(AdapterConfig):
    """Base of the low-rank methods: rank, alpha (scaling alpha/rank), targets, dropout."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn",)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in self.targets.split(",") if t)
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {self.rank!r}")
        if not self.targets:
            raise ValueError("targets: empty; expected any of " + ", ".join(TARGET_ROLES))
        for target in self.targets:
            if target not in TARGET_ROLES:
                raise ValueError(f"targets: {target!r}: expected any of {', '.join(TARGET_ROLES)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class Method:
    """One adapter method: its config class and how to attach it / count what it trains."""

    name: str
    config_cls: type[AdapterConfig]
    attach: Callable[["nn.Module", "ModelSpec", AdapterConfig], None]
    count: Callable[["nn.Module", "ModelSpec", AdapterConfig], dict[str, int]]  # per stack (or part)
    docs: str = ""
    adds_params: bool = True  # False for full/none: they train existing parameters
    # removes what `attach` added besides the per-Linear adapters (e.g. LoRTA's shared factors); None = nothing
    detach: Callable[["nn.Module", "ModelSpec", AdapterConfig], None] | None = None


METHODS: dict[str, Method] = {}
# keys full/none accept (and ignore) so one pipeline config shape serves every method
_SHARED_KEYS = ("rank", "alpha", "targets", "dropout")


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} registered twice")
    method.config_cls.method = method.name
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"method: {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def _load_builtin_methods() -> None:
    from adapters import full, lora, lorta, tlora  # noqa: F401  (each registers itself)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build a config from a plain dict (YAML/JSON); unknown keys raise ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"adapter config: expected a mapping, got {type(data).__name__}")
    if "method" not in data:
        raise ValueError("method: missing (expected one of lora, lorta, tlora, full, none)")
    method = get_method(str(data["method"]))
    names = {f.name for f in dataclasses.fields(method.config_cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key in names:
            kwargs[key] = tuple(value) if key == "targets" and isinstance(value, list) else value
        elif key not in _SHARED_KEYS:
            raise ValueError(f"{key}: unknown key for method {method.name} (known: {', '.join(sorted(names))})")
    return method.config_cls(**kwargs)


def copy_config(config: AdapterConfig, **changes: Any) -> AdapterConfig:
    return dataclasses.replace(config, **changes)


__all__ = ["AdapterConfig", "RankConfig", "Method", "METHODS", "register_method", "get_method",
           "config_from_dict", "copy_config"]

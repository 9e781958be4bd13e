"""Model specs: which linear layers of a model form a *stack* and what each of them is.

A stack is a set of linear layers of one width `dim` = `heads * head_dim`, indexed by a layer index
(0..layers-1) and a matrix type (q, k, v, o, fc1.s, fc2.s, ...). LoRTA shares one CP tensor per stack;
LoRA/TLoRA only use the list of sites. Adding a model = one `register_spec(kind, matches, build)` call
with a builder that lists its sites; the methods never look at module names.

A `Site` is one `nn.Linear`, cut into `len(types)` square `dim x dim` blocks along its long axis:

- q, k, v (and fc1 slices): heads split the *output* (natural head axis "out");
- o (and fc2 slices): heads split the *input* (natural head axis "in");
- `interleaved=True`: the long axis is laid out per head, `(heads, blocks, head_dim)`, as in
  ESMFold's fused `seq_attention.proj` whose output is viewed as (..., heads, 3*head_dim) then chunked
  into q|k|v; otherwise blocks are contiguous, `(blocks, heads, head_dim)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

PARTS = ("stem", "trunk", "all")
# target name -> roles it selects
TARGET_ROLES: dict[str, frozenset[str]] = {
    "attn": frozenset({"q", "k", "v", "o"}),
    "qv": frozenset({"q", "v"}),
    "mlp": frozenset({"fc1", "fc2"}),
    "trimul": frozenset({"trimul"}),
    "sm": frozenset({"sm"}),
}


@dataclass(frozen=True)
class Site:
    """One adaptable `nn.Linear` (weight `(d_out, d_in)`) of a stack."""

    path: str                  # module path from the model root
    layer: int                 # index along the stack's layer mode
    types: tuple[str, ...]     # matrix type of each dim x dim block, in order along the long axis
    roles: tuple[str, ...]     # role of each block ("q", "k", "v", "o", "fc1", "fc2", "trimul")
    long_axis: str | None      # "out" / "in": axis holding len(types) blocks; None for one square block
    head_axis: str             # natural head axis: "out" (q, k, v, fc1) or "in" (o, fc2)
    interleaved: bool = False  # long axis laid out (heads, blocks, head_dim) instead of (blocks, heads, head_dim)

    def selected(self, roles: frozenset[str]) -> tuple[bool, ...]:
        return tuple(role in roles for role in self.roles)


@dataclass(frozen=True)
class Stack:
    """Linear layers of one width sharing the (layer, matrix type, head) structure."""

    name: str                  # e.g. "stem", "trunk_seq", "trunk_pair"
    part: str                  # "stem" or "trunk"
    root: str                  # module path owning shared factors ("" = model root)
    dim: int
    heads: int
    layers: int
    sites: tuple[Site, ...]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def selected_sites(self, roles: frozenset[str]) -> list[Site]:
        return [site for site in self.sites if any(site.selected(roles))]

    def types(self, roles: frozenset[str]) -> list[str]:
        """Matrix types of the selected blocks, in first-seen order (the LoRTA M mode)."""
        seen: dict[str, None] = {}
        for site in self.sites:
            for kind, role in zip(site.types, site.roles):
                if role in roles:
                    seen.setdefault(kind)
        return list(seen)


@dataclass(frozen=True)
class ModelSpec:
    kind: str                  # e.g. "fair_esm2", "hf_esm", "hf_esmfold"
    stacks: tuple[Stack, ...]
    stem_prefix: str | None    # module prefix of the stem for method=full; None = the whole model is the stem
    parts: tuple[str, ...] = ("stem",)  # parts the model has ("stem", "trunk")

    def stacks_for(self, part: str) -> list[Stack]:
        check_part(self, part)
        return [s for s in self.stacks if part == "all" or s.part == part]


def check_part(spec: ModelSpec, part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part: {part!r}: expected one of {', '.join(PARTS)}")
    if part != "all" and part not in spec.parts:
        raise ValueError(f"part: {part!r}: model kind {spec.kind} has no {part} (parts: {', '.join(spec.parts)})")


def roles_for(targets: Iterable[str]) -> frozenset[str]:
    roles: set[str] = set()
    for target in targets:
        if target not in TARGET_ROLES:
            raise ValueError(f"targets: {target!r}: expected any of {', '.join(TARGET_ROLES)}")
        roles |= TARGET_ROLES[target]
    return frozenset(roles)


# ----------------------------------------------------------------------------- site builders

def attention_sites(layer: int, q: str, k: str, v: str, o: str, prefix: str = "") -> list[Site]:
    """Separate q/k/v projections (heads split the output) and the output projection (heads split the input)."""
    sites = [Site(path, layer, (prefix + role,), (role,), None, "out") for role, path in (("q", q), ("k", k), ("v", v))]
    sites.append(Site(o, layer, (prefix + "o",), ("o",), None, "in"))
    return sites


def fused_qkv_site(layer: int, path: str, prefix: str = "") -> Site:
    """A fused dim -> 3*dim projection whose output is per-head interleaved [q|k|v]."""
    return Site(path, layer, tuple(prefix + r for r in "qkv"), ("q", "k", "v"), "out", "out", interleaved=True)


def mlp_sites(layer: int, fc1: str, fc2: str, slices: int, prefix: str = "") -> list[Site]:
    """fc1 (dim -> slices*dim) as `slices` output blocks and fc2 (slices*dim -> dim) as `slices` input blocks."""
    return [
        Site(fc1, layer, tuple(f"{prefix}fc1.{s}" for s in range(slices)), ("fc1",) * slices,
             "out" if slices > 1 else None, "out"),
        Site(fc2, layer, tuple(f"{prefix}fc2.{s}" for s in range(slices)), ("fc2",) * slices,
             "in" if slices > 1 else None, "in"),
    ]


def square_site(layer: int, path: str, kind: str, role: str) -> Site:
    return Site(path, layer, (kind,), (role,), None, "out")


def mlp_slices(d_model: int, d_ff: int, where: str) -> int:
    if d_ff % d_model:
        raise ValueError(f"{where}: MLP width {d_ff} is not a multiple of the model width {d_model}")
    return d_ff // d_model


# ----------------------------------------------------------------------------- registry

SpecBuilder = Callable[[nn.Module], ModelSpec]
_SPECS: list[tuple[str, Callable[[nn.Module], bool], SpecBuilder]] = []


def register_spec(kind: str, matches: Callable[[nn.Module], bool], build: SpecBuilder) -> None:
    """Register a model spec; earlier registrations win when several match."""
    _SPECS.append((kind, matches, build))


def spec_for(model: nn.Module) -> ModelSpec:
    """The spec of `model`, detected from its class."""
    from adapters import esm_specs  # noqa: F401  (registers the ESM family)

    for _, matches, build in _SPECS:
        if matches(model):
            return build(model)
    known = ", ".join(kind for kind, _, _ in _SPECS)
    raise ValueError(f"model: {type(model).__name__}: no adapter spec for this class (known: {known}); "
                     f"see docs/adapters.md, 'Adding a model'")


def validate_spec(model: nn.Module, spec: ModelSpec) -> None:
    """Check every site exists and is a Linear whose shape fits its blocks (a spec bug, not a user error)."""
    modules = dict(model.named_modules())
    for stack in spec.stacks:
        if stack.dim % stack.heads:
            raise ValueError(f"spec {spec.kind}: stack {stack.name}: dim {stack.dim} not divisible by heads {stack.heads}")
        for site in stack.sites:
            linear = modules.get(site.path)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"spec {spec.kind}: {site.path}: not an nn.Linear in this model")
            blocks = len(site.types)
            want = {"out": (blocks * stack.dim, stack.dim), "in": (stack.dim, blocks * stack.dim),
                    None: (stack.dim, stack.dim)}[site.long_axis]
            if (linear.out_features, linear.in_features) != want:
                raise ValueError(f"spec {spec.kind}: {site.path}: weight {(linear.out_features, linear.in_features)}, "
                                 f"spec expects {want}")

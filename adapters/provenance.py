"""Which base an adapter belongs to: a cheap fingerprint of the base weights, the base's source, the version.

`fingerprint(model)` hashes, over every parameter of the (still unadapted) model in name order,

- `structure`: the names and shapes (dtype excluded: the same base may be cast to bf16 for prediction);
- `content`: a sample of each tensor's values (`SAMPLES_PER_TENSOR` elements at evenly spaced flat
  positions, rounded to bfloat16 so an fp32 and a bf16/fp16 copy of one base agree), or None on the meta
  device. Reading ~16 numbers per tensor is microseconds even for ESM-2 3B; two bases of one architecture
  trained or initialised differently disagree on virtually every sampled value.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

SAMPLES_PER_TENSOR = 16


def _sample(tensor: torch.Tensor) -> bytes:
    """Up to SAMPLES_PER_TENSOR values of `tensor` at evenly spaced flat positions, as bf16 bytes."""
    flat = tensor.detach().reshape(-1)
    count = min(SAMPLES_PER_TENSOR, flat.numel())
    index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).long() if count else flat.new_zeros(0).long()
    # float32 linspace rounds n - 1 up to n for n above 2^24 (an ESMFold v1 stem weight has 26.2 M entries)
    index = index.clamp_(max=max(flat.numel() - 1, 0))
    values = flat[index].to("cpu", torch.float32).to(torch.bfloat16)
    return values.view(torch.int16).numpy().tobytes()


def fingerprint(model: nn.Module, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """{"structure", "content" (None on meta), "tensors", "params"} of `model`'s parameters not in `skip`."""
    structure, content = hashlib.sha256(), hashlib.sha256()
    on_meta = False
    tensors = params = 0
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name in skip:
            continue
        tensors += 1
        params += param.numel()
        structure.update(f"{name}:{tuple(param.shape)};".encode())
        if param.device.type == "meta":
            on_meta = True
        else:
            content.update(name.encode() + _sample(param))
    return {"structure": structure.hexdigest()[:16], "content": None if on_meta else content.hexdigest()[:16],
            "tensors": tensors, "params": params}


def same_base(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Do two fingerprints describe the same base? (content is compared only when both have one)"""
    if saved.get("structure") != current.get("structure"):
        return False
    return saved.get("content") is None or current.get("content") is None or saved["content"] == current["content"]


def foldtune_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("foldtune")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def describe(source: Any) -> str:
    """A one-line description of a recorded base source (dict or string) for error messages."""
    if isinstance(source, dict):
        return ", ".join(f"{key}={value}" for key, value in source.items() if value not in (None, {}, []))
    return str(source) if source else "unrecorded base"

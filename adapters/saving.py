"""save / load in the peft layout: `adapter_config.json` + `adapter_model.safetensors`.

The safetensors file holds every adapter parameter under its model path (e.g. `lorta_stacks.stem.A`,
`layers.0.fc1.adapter.lora_A`) plus every other parameter with requires_grad=True (unfrozen heads, or all
trained parameters for method=full) under its module path. TLoRA's frozen projections are not stored:
they are regenerated from the seed in the config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.config import config_from_dict
from adapters.core import adapter_parameter_names, attach, attached, spec_summary
from adapters.layer import adapted_linears
from data.io import atomic_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "foldtune-adapter/1"


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `path/adapter_config.json` and `path/adapter_model.safetensors` (atomically, weights first)."""
    state = attached(model)
    if state is None:
        raise ValueError("model has no adapters attached (call adapters.attach first)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    adapter_names = adapter_parameter_names(model)
    adapter_set = set(adapter_names)
    params = dict(model.named_parameters())
    extra = [name for name, p in params.items() if p.requires_grad and name not in adapter_set]
    tensors = {name: params[name].detach().to("cpu").contiguous() for name in [*adapter_names, *extra]}
    config: dict[str, Any] = {
        **state.config.to_dict(),
        "format": FORMAT,
        "spec": spec_summary(state.spec, state.config),
        "adapter_params": adapter_names,
        "extra_params": extra,
    }
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "method": state.config.method})
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The saved adapter_config.json as a dict (ValueError naming the file when missing or corrupt)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{file}: not found (not an adapters.save directory)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: corrupt or truncated JSON ({exc})") from exc
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"{file}: method: missing (not an adapter config)")
    return data


def _first_mismatch(saved: Any, current: Any, where: str) -> str | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            if key not in saved or key not in current:
                return f"{where}.{key}: saved {saved.get(key)!r}, model {current.get(key)!r}"
            found = _first_mismatch(saved[key], current[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list):
        if len(saved) != len(current):
            return f"{where}: saved {len(saved)} entries, model {len(current)}"
        for i, (a, b) in enumerate(zip(saved, current)):
            found = _first_mismatch(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if saved == current else f"{where}: saved {saved!r}, model {current!r}"


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into `model`; attach it from the saved config first if none is attached.

    Refuses (ValueError naming the file and the first mismatch) a model whose attached config, spec or
    parameter shapes differ from the saved ones. Restored non-adapter params get requires_grad=True again.
    """
    directory = Path(path)
    saved = read_config(directory)
    config_file = directory / CONFIG_NAME
    config_keys = {k: v for k, v in saved.items() if k not in ("format", "spec", "adapter_params", "extra_params")}
    try:
        config = config_from_dict(config_keys)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{config_file}: {exc}") from exc
    state = attached(model)
    if state is None:
        attach(model, config)
        state = attached(model)
    else:
        mismatch = _first_mismatch(config.to_dict(), state.config.to_dict(), "config")
        if mismatch:
            raise ValueError(f"{config_file}: attached adapter differs: {mismatch}")
    if "spec" in saved:
        mismatch = _first_mismatch(saved["spec"], spec_summary(state.spec, state.config), "spec")
        if mismatch:
            raise ValueError(f"{config_file}: model does not match the saved spec: {mismatch}")

    weights_file = directory / WEIGHTS_NAME
    if not weights_file.is_file():
        raise ValueError(f"{weights_file}: not found")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{weights_file}: corrupt or truncated safetensors file ({exc})") from exc

    if any(adapter.merged for _, _, adapter in adapted_linears(model)):
        raise ValueError(f"{directory}: cannot load into a merged model (call adapters.unmerge first)")
    params = dict(model.named_parameters())
    adapter_names = adapter_parameter_names(model)
    for name in adapter_names:
        if name not in tensors:
            raise ValueError(f"{weights_file}: {name}: adapter parameter missing from the file")
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"{weights_file}: {name}: no such parameter in the model")
        if tuple(params[name].shape) != tuple(value.shape):
            raise ValueError(f"{weights_file}: {name}: shape {tuple(value.shape)} in the file, "
                             f"{tuple(params[name].shape)} in the model")
    adapter_set = set(adapter_names)
    for _, _, adapter in adapted_linears(model):
        regenerate = getattr(adapter, "regenerate", None)  # TLoRA: frozen projections from the seed
        if regenerate is not None:
            regenerate()
    with torch.no_grad():
        for name, value in tensors.items():
            target = params[name]
            if target.device.type == "meta":
                continue
            target.copy_(value.to(device=target.device, dtype=target.dtype))
            if name not in adapter_set:
                target.requires_grad_(True)
    return model

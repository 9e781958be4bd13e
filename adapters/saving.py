"""save / load in foldtune's format: `adapter_config.json` + `adapter_model.safetensors` (peft's file names).

The file names are peft's, the contents are not (`"format": "foldtune"` in the config says so): LoRTA and
TLoRA have no peft type, and foldtune stores trained heads and partial fused projections peft cannot
express. LoRA adapters on transformers models convert to and from peft's own format with
`adapters.peft_interop` (`foldtune export` / `foldtune import-peft`); `load` also accepts a peft directory.

The safetensors file holds every adapter parameter under its model path (e.g. `lorta_stacks.stem.A`,
`layers.0.fc1.adapter.lora_A`) plus every other parameter with requires_grad=True (unfrozen heads, or all
trained parameters for method=full) under its module path. TLoRA's frozen projections are not stored:
they are regenerated from the seed in the config. Its bytes depend only on the tensors (one metadata key:
safetensors writes a multi-key metadata map in a random order).

The config records the base the adapter was trained on (`base.source`, `base.fingerprint`, see
adapters.provenance) and the foldtune version; `load` refuses another base unless `force=True`.
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
from adapters.core import adapter_parameter_names, attach, attached, detach, spec_summary
from adapters.layer import adapted_linears
from adapters.provenance import describe, foldtune_version, same_base
from data.io import atomic_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "foldtune"
FORMAT_VERSION = 2  # 1: "format": "foldtune-adapter/1", no base record
# keys of adapter_config.json that describe the file, not the method's config
RECORD_KEYS = ("format", "format_version", "spec", "adapter_params", "extra_params", "base", "foldtune_version")


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
        "format_version": FORMAT_VERSION,
        "spec": spec_summary(state.spec, state.config),
        "adapter_params": adapter_names,
        "extra_params": extra,
        "base": state.base,
        "foldtune_version": foldtune_version(),
    }
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
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
    if isinstance(data, dict) and "peft_type" in data and "method" not in data:
        return data  # a peft adapter directory (adapters.peft_interop reads it)
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"{file}: method: missing (not an adapter config)")
    return data


def is_peft(saved: dict[str, Any]) -> bool:
    return "peft_type" in saved and "method" not in saved


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


def load(model: nn.Module, path: str | os.PathLike, base_source: Any = None, force: bool = False,
         keep_base: bool = False) -> nn.Module:
    """Load a saved adapter (foldtune or peft format) into `model`; attach it from the saved config first
    if none is attached.

    Refuses (ValueError naming the file and the first mismatch) a model whose attached config, spec or
    parameter shapes differ from the saved ones, non-finite weights, and a base whose fingerprint differs
    from the recorded one (naming both bases; `force=True` loads anyway). `base_source` describes this
    model's base (recorded if it is attached here, named in errors). `keep_base=True` keeps a copy of the
    base values the file overwrites so `adapters.detach` can restore them. Restored non-adapter params get
    requires_grad=True again.
    """
    directory = Path(path)
    saved = read_config(directory)
    if is_peft(saved):
        from adapters.peft_interop import load_peft

        return load_peft(model, directory, base_source=base_source, keep_base=keep_base, force=force)
    config_file = directory / CONFIG_NAME
    config_keys = {k: v for k, v in saved.items() if k not in RECORD_KEYS}
    try:
        config = config_from_dict(config_keys)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{config_file}: {exc}") from exc
    attached_here = attached(model) is None
    if attached_here:
        attach(model, config, base_source)
    state = attached(model)
    try:
        _check_attached(saved, config, state, config_file, attached_here, force, base_source)
        return _load_weights(model, directory, keep_base)
    except Exception:
        if attached_here:  # leave the model as it came
            detach(model)
        raise


def _check_attached(saved: dict[str, Any], config: Any, state: Any, config_file: Path, attached_here: bool,
                    force: bool, base_source: Any) -> None:
    if not attached_here:
        mismatch = _first_mismatch(config.to_dict(), state.config.to_dict(), "config")
        if mismatch:
            raise ValueError(f"{config_file}: attached adapter differs: {mismatch}")
    if "spec" in saved:
        mismatch = _first_mismatch(saved["spec"], spec_summary(state.spec, state.config), "spec")
        if mismatch:
            raise ValueError(f"{config_file}: model does not match the saved spec: {mismatch}")
    recorded = (saved.get("base") or {}).get("fingerprint")
    if recorded and not force and not same_base(recorded, state.base["fingerprint"]):
        here = base_source if base_source is not None else state.base.get("source")
        raise ValueError(
            f"{config_file}: adapter was trained on another base: {describe((saved.get('base') or {}).get('source'))} "
            f"(fingerprint {recorded.get('content') or recorded.get('structure')}), this model is {describe(here)} "
            f"(fingerprint {state.base['fingerprint'].get('content') or state.base['fingerprint'].get('structure')}); "
            f"pass --force (force=True) to load it anyway")


def _load_weights(model: nn.Module, directory: Path, keep_base: bool) -> nn.Module:
    weights_file = directory / WEIGHTS_NAME
    tensors = read_weights(weights_file)
    return load_tensors(model, tensors, weights_file, keep_base)


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], weights_file: Path,
                 keep_base: bool = False) -> nn.Module:
    """Copy `tensors` (keyed by model parameter names) into the attached `model` after checking that every
    adapter parameter is given, every name and shape fits and every value is finite (errors name the file)."""
    if any(adapter.merged for _, _, adapter in adapted_linears(model)):
        raise ValueError(f"{weights_file.parent}: cannot load into a merged model (call adapters.unmerge first)")
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
    check_finite(tensors, weights_file)
    adapter_set = set(adapter_names)
    state = attached(model)
    if keep_base:
        state.replaced.update({name: params[name].detach().clone() for name in tensors
                               if name not in adapter_set and name not in state.replaced})
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


def read_weights(weights_file: Path) -> dict[str, torch.Tensor]:
    if not weights_file.is_file():
        raise ValueError(f"{weights_file}: not found")
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{weights_file}: corrupt or truncated safetensors file ({exc})") from exc


def check_finite(tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """ValueError naming the first tensor holding NaN/inf (a diverged run's weights must not be used)."""
    for name, value in tensors.items():
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"{weights_file}: {name}: {bad} of {value.numel()} values are NaN/inf "
                                 f"(did training diverge?); refusing to load")

"""LoRA adapters in peft's own format, both ways (transformers `EsmModel`/`EsmFor*`, `EsmForProteinFolding`).

peft's layout (read from peft 0.21, `utils/save_and_load.py`, `tuners/lora/config.py`):

- `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha` (scaling lora_alpha / r, as foldtune's),
  `lora_dropout`, `target_modules` (a list: a module matches when its path equals an entry or ends with
  `"." + entry`; a string: `re.fullmatch` on the path), `modules_to_save` (whole modules stored as they
  are, for foldtune's trained heads), `base_model_name_or_path`, ...;
- `adapter_model.safetensors`: `base_model.model.<path>.lora_A.weight` (r, d_in) and
  `base_model.model.<path>.lora_B.weight` (d_out, r), `base_model.model.<module>.<param>` for
  modules_to_save.

What peft cannot express, and `save_peft` refuses with a message: LoRTA and TLoRA (no peft type: keep
foldtune's format), LoRA on part of a fused projection (targets `qv` on ESMFold's `seq_attention.proj`
writes only the q and v rows; peft adapts whole Linears), fair-esm models (not transformers models), and
trained parameters that are not whole leaf modules. `load_peft` accepts what maps onto a foldtune LoRA
config (targets x part); other target sets (one layer only, rank_pattern, DoRA, rsLoRA, bias) are refused.
The base record (source, fingerprint, version) goes in `foldtune_base.json` beside the peft files: peft
warns about unknown keys in its config.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adapters.core import attach, attached, detach
from adapters.layer import adapted_linears
from adapters.lora import LoRAConfig, LoRALinear, selected_rows
from adapters.provenance import describe, foldtune_version, same_base
from adapters.saving import CONFIG_NAME, WEIGHTS_NAME, load_tensors, read_weights
from adapters.spec import PARTS, TARGET_ROLES, roles_for, spec_for
from data.io import atomic_path

PREFIX = "base_model.model."
BASE_RECORD = "foldtune_base.json"
PEFT_KINDS = ("hf_esm", "hf_esmfold")
# peft LoraConfig fields that change the math; anything but these values has no foldtune equivalent
_PLAIN_LORA = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
               "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
               "layer_replication": None, "target_parameters": None, "lora_bias": False,
               "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None}


def save_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the attached LoRA adapter of `model` as a peft adapter directory (ValueError if not expressible)."""
    state = attached(model)
    if state is None or not isinstance(state.config, LoRAConfig):
        method = state.config.method if state else "none attached"
        raise ValueError(f"peft export: method {method}: only LoRA has a peft type (LoRTA/TLoRA stay in "
                         f"foldtune's format; `foldtune export --merged` writes a plain transformers model)")
    if state.spec.kind not in PEFT_KINDS:
        raise ValueError(f"peft export: model kind {state.spec.kind}: peft adapts transformers models "
                         f"({', '.join(PEFT_KINDS)}), not fair-esm")
    config = state.config
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for site_path, _, adapter in adapted_linears(model):
        if adapter.out_rows is not None:
            raise ValueError(f"peft export: {site_path}: LoRA on {adapter.rows} of {adapter.d_out} rows of a fused "
                             f"projection (targets {','.join(config.targets)}) has no peft equivalent; train with "
                             f"targets covering the whole projection (attn) or use `foldtune export --merged`")
        targets.append(site_path)
        tensors[f"{PREFIX}{site_path}.lora_A.weight"] = adapter.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{site_path}.lora_B.weight"] = adapter.lora_B.detach().cpu().contiguous()
    modules_to_save = _whole_modules(model, _extra_names(model))
    for module_path in modules_to_save:
        for name, value in model.get_submodule(module_path).state_dict().items():
            tensors[f"{PREFIX}{module_path}.{name}"] = value.detach().cpu().contiguous()
    source = base_model_name_or_path
    if source is None:
        recorded = state.base.get("source")
        source = recorded if isinstance(recorded, str) else describe(recorded) if recorded else None
    peft_config = {
        "peft_type": "LORA", "task_type": None, "auto_mapping": None, "inference_mode": True,
        "base_model_name_or_path": source, "revision": None,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": targets, "exclude_modules": None, "modules_to_save": modules_to_save or None,
        "init_lora_weights": True, **_PLAIN_LORA,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    record = {"method": "lora", "targets": list(config.targets), "part": config.part, "base": state.base,
              "foldtune_version": foldtune_version()}
    with atomic_path(out / BASE_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _extra_names(model: nn.Module) -> list[str]:
    """Trainable parameters outside the adapters (trained heads), in model order."""
    owned = {id(p) for _, _, adapter in adapted_linears(model) for p in adapter.parameters()}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]


def _whole_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The leaf modules owning `names`; ValueError if one of them also holds state that is not trained."""
    modules: dict[str, None] = {}
    for name in names:
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else "")
    wanted = set(names)
    for module_path in modules:
        if not module_path:
            root_params = [n for n in names if "." not in n]
            raise ValueError(f"peft export: {root_params[0]} is a parameter of the model itself (train_heads "
                             f"trains it); peft's modules_to_save stores whole submodules only")
        held = {f"{module_path}.{key}" for key in model.get_submodule(module_path).state_dict()}
        if not held <= wanted:
            raise ValueError(f"peft export: module {module_path} is only partly trained; peft's "
                             f"modules_to_save stores whole modules")
    return list(modules)


# ------------------------------------------------------------------------------------------ import

def _matches(target_modules: Any, path: str) -> bool:
    """peft's target rule: a string is a regex on the full path, a list matches the path or a suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _config_for(model: nn.Module, matched: set[str], rank: int, alpha: float, dropout: float,
                where: Path) -> LoRAConfig:
    """The foldtune LoRA config (targets x part) adapting exactly the Linears in `matched`, whole."""
    spec = spec_for(model)
    parts = [p for p in PARTS if p == "all" or p in spec.parts]
    names = list(TARGET_ROLES)
    for size in range(1, len(names) + 1):
        for targets in itertools.combinations(names, size):
            roles = roles_for(targets)
            for part in parts:
                sites = [(stack, site) for stack in spec.stacks_for(part) for site in stack.selected_sites(roles)]
                if {site.path for _, site in sites} == matched and all(
                        selected_rows(stack, site, roles) is None for stack, site in sites):
                    return LoRAConfig(rank=rank, alpha=alpha, targets=targets, dropout=dropout, part=part)
    known = {site.path for stack in spec.stacks for site in stack.sites}
    outside = sorted(matched - known)
    detail = f"{outside[0]} is not an adaptable site" if outside else "the set of adapted layers"
    raise ValueError(f"{where}: target_modules: {detail} does not correspond to a foldtune LoRA config "
                     f"(targets {', '.join(names)} x part {', '.join(parts)}, every layer); not importable")


def read_peft_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    data = json.loads(file.read_text(encoding="utf-8"))
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type: {data.get('peft_type')!r}: only LORA adapters convert to foldtune")
    for key, plain in _PLAIN_LORA.items():
        value = data.get(key, plain)
        unset = value is None or (isinstance(value, (dict, list)) and not value)
        if not unset and value != plain:
            raise ValueError(f"{file}: {key}: {value!r} has no foldtune equivalent (plain LoRA only)")
    if data.get("exclude_modules"):
        raise ValueError(f"{file}: exclude_modules: not supported on import")
    return data


def load_peft(model: nn.Module, path: str | os.PathLike, base_source: Any = None, keep_base: bool = False,
              force: bool = False) -> nn.Module:
    """Attach a foldtune LoRA equal to the peft LoRA adapter in `path` and load its weights (+ modules_to_save)."""
    directory = Path(path)
    data = read_peft_config(directory)
    if attached(model) is not None:
        raise ValueError(f"{directory}: a peft adapter loads into a model without adapters (call adapters.detach)")
    config = import_config(model, directory, data)
    record_file = directory / BASE_RECORD
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    attach(model, config, base_source if base_source is not None else data.get("base_model_name_or_path"))
    try:
        recorded = (record.get("base") or {}).get("fingerprint")
        current = attached(model).base["fingerprint"]
        if recorded and not force and not same_base(recorded, current):
            raise ValueError(f"{record_file}: adapter was trained on another base: "
                             f"{describe(record['base'].get('source'))}, this model is "
                             f"{describe(attached(model).base.get('source'))}; pass --force to load it anyway")
        weights_file = directory / WEIGHTS_NAME
        tensors = _to_foldtune_names(model, read_weights(weights_file), data.get("modules_to_save") or [],
                                     weights_file)
        return load_tensors(model, tensors, weights_file, keep_base)
    except Exception:
        detach(model)
        raise


def _in_modules_to_save(name: str, modules_to_save: list[str]) -> bool:
    """peft's rule: a module is saved whole when its path ends with an entry; here for any owner of `name`."""
    parts = name.split(".")
    owners = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(owner.endswith(m) for owner in owners for m in modules_to_save)


def _to_foldtune_names(model: nn.Module, tensors: dict[str, torch.Tensor], modules_to_save: list[str],
                       weights_file: Path) -> dict[str, torch.Tensor]:
    """peft keys -> foldtune parameter names (`<path>.adapter.lora_A`, `<module>.<param>`)."""
    adapters_at = {path for path, _, adapter in adapted_linears(model) if isinstance(adapter, LoRALinear)}
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights_file}: {key}: not a peft key (expected the prefix {PREFIX})")
        name = key[len(PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.default)?\.weight", name)
        if match and match.group(1) in adapters_at:
            out[f"{match.group(1)}.adapter.{match.group(2)}"] = value
        elif name in params and _in_modules_to_save(name, modules_to_save):
            out[name] = value
        else:
            raise ValueError(f"{weights_file}: {key}: neither a LoRA factor of a targeted module nor a "
                             f"parameter of modules_to_save")
    return out


def import_config(model: nn.Module, directory: str | os.PathLike, data: dict[str, Any] | None = None) -> LoRAConfig:
    """The foldtune LoRA config a peft adapter directory corresponds to on `model` (nothing is attached)."""
    directory = Path(directory)
    data = read_peft_config(directory) if data is None else data
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matched = {name for name in linears if _matches(data.get("target_modules") or [], name)}
    if not matched:
        raise ValueError(f"{directory / CONFIG_NAME}: target_modules: no Linear of this model matches")
    return _config_for(model, matched, int(data["r"]), float(data["lora_alpha"]),
                       float(data.get("lora_dropout") or 0.0), directory / CONFIG_NAME)

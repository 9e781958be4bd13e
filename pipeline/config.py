"""The training config: defaults, loading (file + section + dotted overrides) and validation.

The schema is the one in `briefs/train_config.md` / `docs/training.md`. Every error raised here is a
`ConfigError` whose message starts with the dotted key at fault, so a bad config fails before any model
is built.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml

KINDS = ("fold", "lm")
SOURCES = ("random", "esmfold_pretrained", "esm2_stem")
METHODS = ("lora", "lorta", "tlora", "full", "none")
PARTS = ("stem", "trunk", "all")
TARGETS = ("attn", "mlp", "qv", "trimul", "sm")  # = adapters.spec.TARGET_ROLES (a test checks)
FOLD_ONLY_TARGETS = ("trimul", "sm")  # the trunk's triangle multiplications, the structure module
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
LOSS_TERMS = ("fape_bb", "fape_sc", "distogram", "plddt", "chi")

DEFAULTS: dict[str, Any] = {
    "kind": "fold",
    "model": {
        "source": "random",
        "path": None,
        "esm2": None,
        "num_blocks": 0,
        "size": {},
        "base_run": None,
        "train_heads": False,
    },
    "adapter": {
        "method": "lorta",
        "rank": 8,
        "alpha": 16,
        "targets": ["attn", "mlp"],
        "part": "trunk",
        "dropout": 0.0,
    },
    "data": {
        "dataset": "results/demo/dataset",
        "splits": "results/demo/splits.csv",
        "train_split": "train",
        "val_split": "val",
        "crop_size": 64,
        "batch_size": 2,
        "max_tokens": None,
        "num_workers": 0,
    },
    "trainer": {
        "max_steps": 1000,
        "max_time_s": None,
        "lr": 1.0e-3,
        "weight_decay": 0.0,
        "warmup_steps": 10,
        "schedule": "cosine",
        "grad_clip": 1.0,
        "accumulate": 1,
        "precision": "auto",
        "devices": "auto",
        "num_nodes": 1,
        "strategy": "auto",
        "grad_checkpointing": False,
        "recycles": [0, 1],
        "val_every_n_steps": 50,
        "checkpoint_every_n_steps": 100,
        "max_bad_steps": 5,
        "seed": 0,
        "threads": None,
    },
    # Term weights, and AF2's options: FAPE clamped at 10 Å in this fraction of batches (the rest unclamped,
    # drawn per global batch from trainer.seed), pLDDT loss only on chains with resolution in [min, max] Å.
    "loss": {"fape_bb": 0.5, "fape_sc": 0.5, "distogram": 0.3, "plddt": 0.01, "chi": 1.0,
             "fape_clamp_fraction": 0.9, "plddt_resolution": [0.1, 3.0]},
    "output_dir": "results/demo/runs/lorta_r8_s0",
}

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; accept it (and `-1E5`, `.5e2`) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# Mappings whose keys are free-form (not checked against DEFAULTS).
_OPEN_MAPPINGS = {"model.size"}


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


def _deep_merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in out and prefix.rstrip(".") not in _OPEN_MAPPINGS:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(out))})")
        if isinstance(out.get(key), dict) and dotted not in _OPEN_MAPPINGS:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
            out[key] = _deep_merge(out[key], value, prefix=f"{dotted}.")
        elif dotted in _OPEN_MAPPINGS and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge_open(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(mapping: dict, prefix: str = "", keep_empty: bool = False) -> dict:
    """`{"trunk": {"num_blocks": 2}}` -> `{"trunk.num_blocks": 2}` (the inverse of `_nest`). An empty mapping
    is a value of its own with `keep_empty` (comparing two configs), else it leaves no key."""
    flat: dict = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and (value or not keep_empty):
            flat.update(flatten(value, f"{prefix}{key}.", keep_empty))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(mapping: dict) -> dict:
    """`{"trunk.num_blocks": 2}` -> `{"trunk": {"num_blocks": 2}}` (both spellings are accepted in model.size)."""
    out: dict = {}
    for key, value in mapping.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        leaf = _nest(value) if isinstance(value, dict) else copy.deepcopy(value)
        if isinstance(leaf, dict) and isinstance(node.get(parts[-1]), dict):
            leaf = _merge_open(node[parts[-1]], leaf)
        node[parts[-1]] = leaf
    return out


def _merge_open(base: dict, update: dict) -> dict:
    """Merge a free-form mapping key by key, so that `model.size.trunk.num_blocks=4` keeps the file's
    `trunk.max_recycles`. A dotted key and its nested spelling name the same setting: with either present
    on both sides, both are nested first, so the update wins."""
    if any("." in str(k) for k in (*base, *update)) and base and update:
        base, update = _nest(base), _nest(update)
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge_open(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["adapter.rank=4", "trainer.recycles=[0,3]"]` -> nested dict; values parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: override must look like key=value (dotted key)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{item}: empty key in override")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from exc
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, section: str | None = None,
                overrides: list[str] | None = None) -> dict:
    """Defaults <- FILE[section] <- overrides, validated. Raises ConfigError naming the bad key."""
    user: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = _yaml_load(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        loaded = loaded or {}
        if section is not None:
            if not isinstance(loaded, dict) or section not in loaded:
                raise ConfigError(f"{path}: {section}: section not found")
            loaded = loaded[section] or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        user = loaded
    cfg = _deep_merge(DEFAULTS, user)
    if overrides:
        cfg = _deep_merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def resolve(cfg: dict) -> dict:
    """Merge a partial config over the defaults and validate it (for configs built in Python)."""
    merged = _deep_merge(DEFAULTS, cfg)
    validate(merged)
    return merged


# ---------------------------------------------------------------- validation

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check(cond: bool, key: str, message: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}, got {value!r}")


def _int(cfg: dict, key: str, minimum: int | None = None, optional: bool = False) -> None:
    section, name = key.split(".") if "." in key else (None, key)
    value = cfg[section][name] if section else cfg[name]
    if optional and value is None:
        return
    _check(_is_int(value), key, "expected an integer" + (" or null" if optional else ""), value)
    if minimum is not None:
        _check(value >= minimum, key, f"must be >= {minimum}", value)


def _number(cfg: dict, key: str, minimum: float | None = None, optional: bool = False) -> None:
    section, name = key.split(".")
    value = cfg[section][name]
    if optional and value is None:
        return
    _check(_is_number(value), key, "expected a number" + (" or null" if optional else ""), value)
    if minimum is not None:
        _check(value >= minimum, key, f"must be >= {minimum}", value)


def _choice(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"must be one of {', '.join(map(str, choices))}", value)


def _str(value: Any, key: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    _check(isinstance(value, str) and value != "", key, "expected a non-empty string", value)


def validate(cfg: dict) -> None:
    """Check types and values of a merged config; raise ConfigError naming the first bad key."""
    _choice(cfg["kind"], "kind", KINDS)

    model = cfg["model"]
    _choice(model["source"], "model.source", SOURCES)
    _str(model["path"], "model.path", optional=True)
    _str(model["esm2"], "model.esm2", optional=True)
    _int(cfg, "model.num_blocks", minimum=0)
    _check(isinstance(model["size"], dict), "model.size", "expected a mapping", model["size"])
    _str(model["base_run"], "model.base_run", optional=True)
    _check(isinstance(model["train_heads"], bool), "model.train_heads", "expected true/false",
           model["train_heads"])
    if cfg["kind"] == "fold":
        if model["source"] == "esmfold_pretrained":
            _check(model["path"] is not None, "model.path",
                   "source esmfold_pretrained needs a local save_pretrained directory or a hub id", None)
        if model["source"] == "esm2_stem":
            _check(model["esm2"] is not None, "model.esm2",
                   "source esm2_stem needs a fair-esm model name or a local .pt checkpoint", None)
    if model["size"]:
        from pipeline.models import check_size_overrides  # local import: models imports torch
        check_size_overrides(model["size"])

    adapter = cfg["adapter"]
    _choice(adapter["method"], "adapter.method", METHODS)
    if cfg["kind"] == "lm":
        _check(adapter["part"] != "trunk", "adapter.part",
               "a language model has no trunk (use stem or all with kind lm)", adapter["part"])
        _check(not model["train_heads"], "model.train_heads", "only for kind fold", model["train_heads"])
    _int(cfg, "adapter.rank", minimum=1)
    _number(cfg, "adapter.alpha")
    _check(isinstance(adapter["targets"], (list, tuple)) and len(adapter["targets"]) > 0,
           "adapter.targets", "expected a non-empty list", adapter["targets"])
    for target in adapter["targets"]:
        _choice(target, "adapter.targets", TARGETS)
        if target in FOLD_ONLY_TARGETS:
            _check(cfg["kind"] == "fold" and adapter["part"] != "stem", "adapter.targets",
                   f"{target} is in ESMFold's trunk: needs kind fold and part trunk or all", target)
    _choice(adapter["part"], "adapter.part", PARTS)
    _number(cfg, "adapter.dropout", minimum=0.0)
    _check(adapter["dropout"] < 1.0, "adapter.dropout", "must be < 1", adapter["dropout"])

    data = cfg["data"]
    _str(data["dataset"], "data.dataset")
    _str(data["splits"], "data.splits", optional=cfg["kind"] == "lm")
    _str(data["train_split"], "data.train_split")
    _str(data["val_split"], "data.val_split", optional=True)
    _int(cfg, "data.crop_size", minimum=8, optional=True)
    _int(cfg, "data.batch_size", minimum=1)
    _int(cfg, "data.max_tokens", minimum=1, optional=True)
    _int(cfg, "data.num_workers", minimum=0)

    trainer = cfg["trainer"]
    _int(cfg, "trainer.max_steps", minimum=0)
    _number(cfg, "trainer.max_time_s", minimum=0.0, optional=True)
    _number(cfg, "trainer.lr", minimum=0.0)
    _check(trainer["lr"] > 0, "trainer.lr", "must be > 0", trainer["lr"])
    _number(cfg, "trainer.weight_decay", minimum=0.0)
    _int(cfg, "trainer.warmup_steps", minimum=0)
    _choice(trainer["schedule"], "trainer.schedule", SCHEDULES)
    _number(cfg, "trainer.grad_clip", minimum=0.0, optional=True)
    _int(cfg, "trainer.accumulate", minimum=1)
    _choice(str(trainer["precision"]), "trainer.precision", PRECISIONS)
    devices = trainer["devices"]
    _check(devices == "auto" or (_is_int(devices) and devices >= 1)
           or (isinstance(devices, list) and all(_is_int(d) and d >= 0 for d in devices)),
           "trainer.devices", "expected 'auto', a count >= 1 or a list of device ids", devices)
    _int(cfg, "trainer.num_nodes", minimum=1)
    _choice(trainer["strategy"], "trainer.strategy", ("auto", "ddp"))  # the tested ones (tests/test_train_ddp.py)
    _check(isinstance(trainer["grad_checkpointing"], bool), "trainer.grad_checkpointing",
           "expected true/false", trainer["grad_checkpointing"])
    recycles = trainer["recycles"]
    _check(isinstance(recycles, (list, tuple)) and len(recycles) == 2 and all(_is_int(r) for r in recycles)
           and 0 <= recycles[0] <= recycles[1], "trainer.recycles",
           "expected [min, max] with 0 <= min <= max", recycles)
    _int(cfg, "trainer.val_every_n_steps", minimum=1)
    _int(cfg, "trainer.checkpoint_every_n_steps", minimum=1)
    _int(cfg, "trainer.max_bad_steps", minimum=1)
    _int(cfg, "trainer.seed", minimum=0)
    _int(cfg, "trainer.threads", minimum=1, optional=True)

    loss = cfg["loss"]
    for term in LOSS_TERMS:
        _number(cfg, f"loss.{term}", minimum=0.0)
    _number(cfg, "loss.fape_clamp_fraction", minimum=0.0)
    _check(loss["fape_clamp_fraction"] <= 1.0, "loss.fape_clamp_fraction", "must be <= 1 (a fraction of batches)",
           loss["fape_clamp_fraction"])
    window = loss["plddt_resolution"]
    _check(window is None or (isinstance(window, (list, tuple)) and len(window) == 2
                              and all(_is_number(v) for v in window) and 0 <= window[0] <= window[1]),
           "loss.plddt_resolution", "expected null or [min, max] Å with 0 <= min <= max", window)

    _str(cfg["output_dir"], "output_dir")


def dump_config(cfg: dict) -> str:
    """YAML text of a resolved config (keys in schema order)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)

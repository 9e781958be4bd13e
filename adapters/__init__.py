"""foldtune's adapter module: LoRA, LoRTA, TLoRA (+ full / none) on ESM-2 and ESMFold.

    import adapters
    cfg = adapters.LoRTAConfig(rank=8, alpha=16, targets=("attn", "mlp"), part="all")
    adapters.attach(model, cfg)            # in place: freezes the base, adds adapters
    adapters.count_trainable(model); adapters.merge(model); adapters.unmerge(model)
    adapters.save(model, "run/adapter"); adapters.load(fresh_model, "run/adapter")
    adapters.detach(model)                 # the base again: attach / load another adapter on it
    adapters.save_peft(model, "out/peft"); adapters.load(fresh_model, "out/peft")   # peft's LoRA format

See docs/adapters.md.
"""

from adapters.config import METHODS, AdapterConfig, Method, RankConfig, config_from_dict, get_method, register_method
from adapters.core import (
    adapter_parameter_names,
    attach,
    attached,
    detach,
    count_for,
    count_total,
    count_trainable,
    merge,
    unmerge,
)
from adapters.full import FullConfig, NoneConfig
from adapters.lora import LoRAConfig
from adapters.lorta import LoRTAConfig
from adapters.peft_interop import load_peft, save_peft
from adapters.provenance import fingerprint
from adapters.saving import CONFIG_NAME, WEIGHTS_NAME, load, read_config, save
from adapters.spec import ModelSpec, Site, Stack, register_spec, spec_for
from adapters.tlora import TLoRAConfig

__all__ = [
    "AdapterConfig", "RankConfig", "LoRAConfig", "LoRTAConfig", "TLoRAConfig", "FullConfig", "NoneConfig",
    "Method", "METHODS", "register_method", "get_method", "config_from_dict",
    "attach", "attached", "detach", "count_trainable", "count_total", "count_for", "merge", "unmerge",
    "save_peft", "load_peft", "fingerprint",
    "adapter_parameter_names", "save", "load", "read_config", "CONFIG_NAME", "WEIGHTS_NAME",
    "ModelSpec", "Stack", "Site", "register_spec", "spec_for",
]

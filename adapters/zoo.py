"""Named architectures built on the meta device (shapes only: no weights, no download).

`build_meta_model(name)` serves `foldtune params` and the workflow's equal-budget rank selection.
Names: every fair-esm ESM-2 release, `esmfold_v1` (transformers `EsmForProteinFolding` with the ESMFold v1
config), and the tiny test models `tiny_esm2` / `tiny_esmfold` (also buildable with real weights via
`build_model(name)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# fair-esm ESM-2 releases: name -> (layers, embed_dim, attention heads)
FAIR_ESM2: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}

# facebook/esmfold_v1: ESM-2 3B stem + default trunk (48 blocks, seq 1024 / 32 heads, pair 128 / 4 heads)
ESMFOLD_V1_STEM: dict[str, Any] = {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 40,
                                   "intermediate_size": 10240}
ESMFOLD_V1_TRUNK: dict[str, Any] = {
    "num_blocks": 48, "sequence_state_dim": 1024, "pairwise_state_dim": 128, "sequence_head_width": 32,
    "pairwise_head_width": 32, "position_bins": 32, "max_recycles": 4, "chunk_size": None,
    "structure_module": {"sequence_dim": 384, "pairwise_dim": 128, "ipa_dim": 16, "resnet_dim": 128,
                         "num_heads_ipa": 12, "num_qk_points": 4, "num_v_points": 8, "num_blocks": 8},
}
TINY_STEM: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 64}
TINY_TRUNK: dict[str, Any] = {
    "num_blocks": 2, "sequence_state_dim": 64, "pairwise_state_dim": 32, "sequence_head_width": 16,
    "pairwise_head_width": 16, "max_recycles": 1, "chunk_size": None,
    "structure_module": {"sequence_dim": 64, "pairwise_dim": 32, "ipa_dim": 8, "resnet_dim": 16,
                         "num_heads_ipa": 2, "num_qk_points": 2, "num_v_points": 2, "num_blocks": 2},
}

MODEL_NAMES: tuple[str, ...] = (*FAIR_ESM2, "esmfold_v1")
EXTRA_NAMES: tuple[str, ...] = ("tiny_esm2", "tiny_esmfold")


def esmfold_config(stem: dict[str, Any], trunk: dict[str, Any]):
    """An `EsmConfig` for `EsmForProteinFolding`: ESM-2 alphabet (33 tokens), rotary positions, fp32 stem."""
    from transformers import EsmConfig
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    return EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary",
                     is_folding_model=True, vocab_list=list(get_default_vocab_list()),
                     esmfold_config={"fp16_esm": False, "trunk": trunk}, **stem)


def fair_esm2(layers: int, dim: int, heads: int) -> nn.Module:
    import esm
    from esm.model.esm2 import ESM2

    return ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads,
                alphabet=esm.Alphabet.from_architecture("ESM-1b"))


def build_model(name: str) -> nn.Module:
    """Build `name` with (random) weights on the current default device."""
    if name in FAIR_ESM2:
        return fair_esm2(*FAIR_ESM2[name])
    if name == "tiny_esm2":
        return fair_esm2(2, 32, 4)
    from transformers.models.esm.modeling_esmfold import EsmForProteinFolding

    if name == "esmfold_v1":
        return EsmForProteinFolding(esmfold_config(ESMFOLD_V1_STEM, ESMFOLD_V1_TRUNK))
    if name == "tiny_esmfold":
        return EsmForProteinFolding(esmfold_config(TINY_STEM, TINY_TRUNK))
    raise ValueError(f"model: {name!r}: unknown (expected one of {', '.join(MODEL_NAMES + EXTRA_NAMES)})")


def build_meta_model(name: str) -> nn.Module:
    """`name` on the meta device: every shape, no memory, well under a second even for ESM-2 15B."""
    from transformers.initialization import no_init_weights  # init kernels are pure cost on meta tensors

    with torch.device("meta"), no_init_weights():
        return build_model(name)


def param_summary(model: nn.Module, config) -> dict[str, Any]:
    """Trainable / total parameter counts of `model` + `config` (from the formulas; nothing is attached).

    Returns {"trainable_params", "total_params", "base_params", "trainable_percent", "stacks": {name: {...}}}.
    Method full also gives "parts": {part: trainable}.
    """
    from adapters.config import RankConfig, get_method
    from adapters.core import count_for, count_total
    from adapters.spec import roles_for, spec_for

    method = get_method(config.method)
    per_stack = count_for(model, config, per_stack=True)
    trainable = sum(per_stack.values())
    base = count_total(model)
    total = base + trainable if method.adds_params else base
    spec = spec_for(model)
    roles = roles_for(config.targets) if isinstance(config, RankConfig) else None
    stacks: dict[str, Any] = {}
    for stack in spec.stacks_for(config.part):
        entry: dict[str, Any] = {"dim": stack.dim, "heads": stack.heads, "head_dim": stack.head_dim,
                                 "layers": stack.layers}
        if roles is not None:
            entry["types"] = len(stack.types(roles))
            entry["sites"] = len(stack.selected_sites(roles))
            entry["trainable"] = per_stack.get(stack.name, 0)
        stacks[stack.name] = entry
    out = {"trainable_params": trainable, "total_params": total, "base_params": base,
           "trainable_percent": 100.0 * trainable / total if total else 0.0, "stacks": stacks}
    if roles is None:
        out["parts"] = per_stack
    return out

"""Specs of the ESM family: fair-esm ESM-2, transformers `EsmModel` (+ task heads) and `EsmForProteinFolding`.

Module names were read from fair-esm 2.0 (`esm/modules.py`, `esm/multihead_attention.py`) and
transformers 5.23 (`models/esm/modeling_esm.py`, `modeling_esmfold.py`). Full module paths are listed,
so `output.dense` never matches `attention.output.dense`.
"""

from __future__ import annotations

from torch import nn

from adapters.spec import (
    ModelSpec,
    Site,
    Stack,
    attention_sites,
    fused_qkv_site,
    mlp_sites,
    mlp_slices,
    register_spec,
    square_site,
)


def _is_fair_esm2(model: nn.Module) -> bool:
    try:
        from esm.model.esm2 import ESM2
    except ImportError:  # pragma: no cover - fair-esm is a dependency
        return False
    return isinstance(model, ESM2)


def fair_esm2_spec(model: nn.Module) -> ModelSpec:
    """fair-esm `ESM2`: `layers.{l}.self_attn.{q,k,v,out}_proj`, `layers.{l}.fc1`, `layers.{l}.fc2`."""
    dim, heads, n_layers = model.embed_dim, model.attention_heads, len(model.layers)
    slices = mlp_slices(dim, model.layers[0].fc1.out_features, "fair-esm ESM2 fc1")
    sites: list[Site] = []
    for layer in range(n_layers):
        p = f"layers.{layer}"
        sites += attention_sites(layer, f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                                 f"{p}.self_attn.v_proj", f"{p}.self_attn.out_proj")
        sites += mlp_sites(layer, f"{p}.fc1", f"{p}.fc2", slices)
    return ModelSpec("fair_esm2", (Stack("stem", "stem", "", dim, heads, n_layers, tuple(sites)),), None)


def hf_esm_stack(esm_model: nn.Module, prefix: str) -> Stack:
    """Stack of a transformers `EsmModel` found at module path `prefix` ("" = the model itself)."""
    config = esm_model.config
    dim, heads, n_layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    slices = mlp_slices(dim, config.intermediate_size, "EsmConfig.intermediate_size")
    root = f"{prefix}." if prefix else ""
    sites: list[Site] = []
    for layer in range(n_layers):
        p = f"{root}encoder.layer.{layer}"
        sites += attention_sites(layer, f"{p}.attention.self.query", f"{p}.attention.self.key",
                                 f"{p}.attention.self.value", f"{p}.attention.output.dense")
        sites += mlp_sites(layer, f"{p}.intermediate.dense", f"{p}.output.dense", slices)
    return Stack("stem", "stem", prefix, dim, heads, n_layers, tuple(sites))


def _hf_esm_prefix(model: nn.Module) -> str | None:
    try:
        from transformers import EsmModel
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, EsmModel):
        return ""
    if isinstance(getattr(model, "esm", None), EsmModel):
        return "esm"
    return None


def _is_hf_esmfold(model: nn.Module) -> bool:
    from transformers.models.esm.modeling_esmfold import EsmForProteinFolding

    return isinstance(model, EsmForProteinFolding)


def hf_esm_spec(model: nn.Module) -> ModelSpec:
    prefix = _hf_esm_prefix(model)
    return ModelSpec("hf_esm", (hf_esm_stack(dict(model.named_modules())[prefix], prefix),), None)


TRIMUL_LINEARS = ("linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g", "linear_g", "linear_z")


def structure_module_stack(structure_module: nn.Module, root: str) -> Stack:
    """The structure module's square single-representation Linears (target "sm"): `linear_in` and each
    transition layer's `linear_{1,2,3}` (sequence_dim x sequence_dim).

    One layer: the module's weights are shared by all its iterations, so there is no layer mode to factor.
    The IPA projections are not square (sequence_dim -> heads * ipa_dim) and stay out, for every method,
    so LoRA, LoRTA and TLoRA adapt the same matrices. Heads: the IPA's, for LoRTA's head mode.
    """
    dim = structure_module.linear_in.in_features
    sites = [square_site(0, f"{root}.linear_in", "in", "sm")]
    for i, _ in enumerate(structure_module.transition.layers):
        sites += [square_site(0, f"{root}.transition.layers.{i}.linear_{j}", f"tr{i}.{j}", "sm") for j in (1, 2, 3)]
    return Stack("sm", "trunk", root, dim, structure_module.ipa.num_heads, 1, tuple(sites))


def hf_esmfold_spec(model: nn.Module) -> ModelSpec:
    """`EsmForProteinFolding`: the ESM-2 stem at `esm.` and two trunk stacks.

    - trunk_seq (width sequence_state_dim): fused `seq_attention.proj` (per-head interleaved q|k|v),
      `seq_attention.o_proj`, `mlp_seq.mlp.{1,3}`;
    - trunk_pair (width pairwise_state_dim): `tri_att_{start,end}.mha.linear_{q,k,v,o}` as types
      start.q ... end.o, `mlp_pair.mlp.{1,3}`, and (target "trimul") the 6 square linears of
      `tri_mul_{out,in}`;
    - sm (width structure_module.sequence_dim, target "sm"): see `structure_module_stack`.
    """
    stem = hf_esm_stack(model.esm, "esm")
    blocks = model.trunk.blocks
    stacks = [stem]
    if len(blocks):
        first = blocks[0]
        seq_dim = first.seq_attention.embed_dim
        seq_heads = first.seq_attention.num_heads
        pair_dim = first.tri_att_start.c_in
        pair_heads = first.tri_att_start.no_heads
        seq_slices = mlp_slices(seq_dim, first.mlp_seq.mlp[1].out_features, "trunk mlp_seq")
        pair_slices = mlp_slices(pair_dim, first.mlp_pair.mlp[1].out_features, "trunk mlp_pair")
        seq_sites: list[Site] = []
        pair_sites: list[Site] = []
        for i in range(len(blocks)):
            p = f"trunk.blocks.{i}"
            seq_sites.append(fused_qkv_site(i, f"{p}.seq_attention.proj"))
            seq_sites.append(Site(f"{p}.seq_attention.o_proj", i, ("o",), ("o",), None, "in"))
            seq_sites += mlp_sites(i, f"{p}.mlp_seq.mlp.1", f"{p}.mlp_seq.mlp.3", seq_slices)
            for side in ("start", "end"):
                m = f"{p}.tri_att_{side}.mha"
                pair_sites += attention_sites(i, f"{m}.linear_q", f"{m}.linear_k", f"{m}.linear_v",
                                              f"{m}.linear_o", prefix=f"{side}.")
            pair_sites += mlp_sites(i, f"{p}.mlp_pair.mlp.1", f"{p}.mlp_pair.mlp.3", pair_slices)
            for mul in ("out", "in"):
                for name in TRIMUL_LINEARS:
                    pair_sites.append(square_site(i, f"{p}.tri_mul_{mul}.{name}", f"mul_{mul}.{name[7:]}", "trimul"))
        stacks.append(Stack("trunk_seq", "trunk", "trunk", seq_dim, seq_heads, len(blocks), tuple(seq_sites)))
        stacks.append(Stack("trunk_pair", "trunk", "trunk", pair_dim, pair_heads, len(blocks), tuple(pair_sites)))
    stacks.append(structure_module_stack(model.trunk.structure_module, "trunk.structure_module"))
    return ModelSpec("hf_esmfold", tuple(stacks), "esm", ("stem", "trunk"))


register_spec("fair_esm2", _is_fair_esm2, fair_esm2_spec)
register_spec("hf_esmfold", _is_hf_esmfold, hf_esmfold_spec)  # before hf_esm: it also has an `esm` attribute
register_spec("hf_esm", lambda model: _hf_esm_prefix(model) is not None, hf_esm_spec)

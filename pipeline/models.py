"""Folding models: HF `EsmForProteinFolding` with a trainable-stem forward, and its three builders.

`build_folding_model(model_cfg)` dispatches on `model_cfg["source"]`:

- ``random``: the tiny config of docs/folding.md §1.5 (~0.5 M params), with ``size`` overrides;
- ``esmfold_pretrained``: ``from_pretrained`` of a local directory (or the hub id when online);
- ``esm2_stem``: a fair-esm ESM-2 checkpoint mapped into the HF ``EsmModel`` stem plus a freshly
  initialised folding head (``num_blocks: 0`` = structure-module only).

It also works under ``with torch.device("meta"):`` (no weights are read, only shapes).

Inputs of the folding model are AF2-order residue indices (``ARNDCQEGHILKMFPSTWYV``, X = 20), not ESM
token ids; the model maps them to the ESM alphabet itself.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import EsmConfig
from transformers.models.esm.configuration_esm import get_default_vocab_list
from transformers.models.esm.modeling_esmfold import (
    EsmFoldLinear,
    EsmForProteinFolding,
    EsmForProteinFoldingOutput,
    categorical_lddt,
)
from transformers.models.esm.openfold_utils import (
    compute_predicted_aligned_error,
    compute_tm,
    make_atom14_masks,
)

from adapters.zoo import FAIR_ESM2
from pipeline.config import flatten

HUB_ESMFOLD = "facebook/esmfold_v1"
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
FAIR_ESM_REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{name}-contact-regression.pt"

# fair-esm ESM-2 releases: name -> (layers, embed_dim, heads), one table shared with `foldtune params`.
# Used to size a model on the meta device without downloading it, and to validate names early.
FAIR_ESM2_MODELS = FAIR_ESM2

TINY_STEM: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
TINY_TRUNK: dict[str, Any] = {
    "num_blocks": 2,
    "sequence_state_dim": 64,
    "pairwise_state_dim": 32,
    "sequence_head_width": 16,
    "pairwise_head_width": 16,
    "max_recycles": 1,
    "chunk_size": None,
    "structure_module": {
        "sequence_dim": 64,
        "pairwise_dim": 32,
        "ipa_dim": 8,
        "resnet_dim": 16,
        "num_heads_ipa": 2,
        "num_qk_points": 2,
        "num_v_points": 2,
        "num_blocks": 2,
    },
}
# Trunk of a fresh folding head on a real ESM-2 stem: ESMFold v1 widths (docs/folding.md §1.2).
ESMFOLD_TRUNK: dict[str, Any] = {
    "sequence_state_dim": 1024,
    "pairwise_state_dim": 128,
    "sequence_head_width": 32,
    "pairwise_head_width": 32,
    "max_recycles": 4,
    "chunk_size": None,
    "structure_module": {"sequence_dim": 384, "pairwise_dim": 128},
}
STEM_KEYS = tuple(TINY_STEM)
TRUNK_KEYS = ("num_blocks", "sequence_state_dim", "pairwise_state_dim", "sequence_head_width",
              "pairwise_head_width", "position_bins", "max_recycles", "chunk_size", "dropout")
STRUCTURE_MODULE_KEYS = ("sequence_dim", "pairwise_dim", "ipa_dim", "resnet_dim", "num_heads_ipa",
                         "num_qk_points", "num_v_points", "num_blocks", "dropout_rate")

# Modules outside the stem and the trunk blocks that `model.train_heads` makes trainable and saves: the
# input projection of the language-model features (layer mixture, MLP, amino-acid embedding), the structure
# module with its projections, and the output heads.
HEAD_MODULES = ("esm_s_combine", "esm_s_mlp", "embedding", "distogram_head", "ptm_head", "lddt_head", "lm_head",
                "trunk.structure_module", "trunk.trunk2sm_s", "trunk.trunk2sm_z")


class ModelSourceError(RuntimeError):
    """A model cannot be obtained (offline hub id, missing file); the message says what to pass instead."""


# ------------------------------------------------------------------------------------ the model

def _wrap_forward(module: torch.nn.Module, wrapper, enabled: bool) -> None:
    """Route `module.forward` through `wrapper(plain_forward, ...)` (enabled) or back to the plain forward;
    idempotent either way. An instance attribute, so parameter names and state dicts are unchanged."""
    plain = module.__dict__.get("_plain_forward")
    if enabled and plain is None:
        module._plain_forward = module.forward
        module.forward = functools.partial(wrapper, module._plain_forward)
    elif not enabled and plain is not None:
        module.forward = plain
        del module._plain_forward


def _checkpointed_call(forward, *args, **kwargs):
    """Run `forward` under activation checkpointing when a graph is being built."""
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _fp32_structure_call(forward, evoformer_output_dict: dict, aatype: torch.Tensor,
                         mask: torch.Tensor | None = None, **kwargs):
    """Run the structure module with autocast off and fp32 inputs (single (B, L, C_s), pair (B, L, L, C_z)):
    rigid-frame composition and IPA point distances lose Å-scale precision in bf16."""
    with torch.autocast(device_type=aatype.device.type, enabled=False):
        inputs = {key: value.float() for key, value in evoformer_output_dict.items()}
        return forward(inputs, aatype, None if mask is None else mask.float(), **kwargs)


class FoldingModel(EsmForProteinFolding):
    """`EsmForProteinFolding` whose ESM-2 stem can be trained.

    Upstream freezes the stem and `.detach()`es its output, so stem adapters get no gradient. Here, when
    any stem parameter requires grad, the language-model features stay in the graph; otherwise the stem
    runs under `torch.no_grad()` (the upstream fast path: no activations kept for the 3B LM).
    """

    @property
    def stem_trainable(self) -> bool:
        return any(p.requires_grad for p in self.esm.parameters())

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing around each `trunk.blocks[i]` (module names are unchanged)."""
        for block in self.trunk.blocks:
            _wrap_forward(block, _checkpointed_call, enabled)

    def set_fp32_structure_module(self, enabled: bool) -> None:
        """Keep the structure module in fp32 under autocast (bf16 prediction); module names are unchanged."""
        _wrap_forward(self.trunk.structure_module, _fp32_structure_call, enabled)

    def language_model_features(self, esmaa: torch.Tensor) -> torch.Tensor:
        """Stacked ESM-2 hidden states `(B, L, n_layers + 1, C)` in the trunk's dtype.

        Differentiable iff the stem has trainable parameters (adapters or method=full on the stem).
        """
        if self.stem_trainable:
            esm_s = self.compute_language_model_representations(esmaa)
        else:
            with torch.no_grad():
                esm_s = self.compute_language_model_representations(esmaa)
        return esm_s.to(self.esm_s_combine.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        masking_pattern: torch.Tensor | None = None,
        num_recycles: int | None = None,
        output_hidden_states: bool | None = False,
        **kwargs,
    ) -> EsmForProteinFoldingOutput:
        """Fold a batch.

        input_ids: (B, L) AF2-order residue indices; attention_mask: (B, L) 1 = residue;
        position_ids: (B, L) residue numbers; num_recycles: n gives n + 1 trunk passes, None upstream's
        default of `max_recycles` passes (`default_recycles`; one pass for max_recycles 0, where upstream
        would run none and fail).
        Output fields as upstream (positions (n_sm, B, L, 14, 3) Å, plddt (B, L, 37) in [0, 1], ...).
        """
        cfg = self.config.esmfold_config
        aa = input_ids
        batch, length = aa.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(aa)
        if position_ids is None:
            position_ids = torch.arange(length, device=aa.device).expand_as(aa)
        if num_recycles is None and cfg.trunk.max_recycles == 0:
            num_recycles = 0  # upstream's default runs max_recycles trunk passes: none at all for 0

        esmaa = self.af2_idx_to_esm_idx(aa, attention_mask)
        mlm_targets = None
        masked_aa = aa
        if masking_pattern is not None:
            masked_aa, esmaa, mlm_targets = self.bert_mask(aa, esmaa, attention_mask, masking_pattern)

        esm_s = self.language_model_features(esmaa)
        if cfg.esm_ablate_sequence:
            esm_s = esm_s * 0
        # (B, L, n_layers + 1, C) -> (B, L, C): learned softmax mixture over layers.
        esm_s = (self.esm_s_combine.softmax(0).unsqueeze(0) @ esm_s).squeeze(2)
        s_s_0 = self.esm_s_mlp(esm_s)
        if cfg.embed_aa:
            s_s_0 = s_s_0 + self.embedding(masked_aa)
        s_z_0 = s_s_0.new_zeros(batch, length, length, cfg.trunk.pairwise_state_dim)

        structure = self.trunk(s_s_0, s_z_0, aa, position_ids, attention_mask, no_recycles=num_recycles)
        keep = ("s_z", "s_s", "frames", "sidechain_frames", "unnormalized_angles", "angles", "positions",
                "states")
        out = {k: structure[k] for k in keep}
        if mlm_targets is not None:
            out["mlm_targets"] = mlm_targets

        distogram = self.distogram_head(out["s_z"])
        out["distogram_logits"] = (distogram + distogram.transpose(1, 2)) / 2
        out["lm_logits"] = self.lm_head(out["s_s"])
        out["aatype"] = aa
        make_atom14_masks(out)
        for key in ("atom14_atom_exists", "atom37_atom_exists"):
            out[key] = out[key] * attention_mask.unsqueeze(-1)
        out["residue_index"] = position_ids

        states = out["states"]
        out["lddt_head"] = self.lddt_head(states).reshape(states.shape[0], batch, length, -1, self.lddt_bins)
        out["plddt"] = categorical_lddt(out["lddt_head"][-1], bins=self.lddt_bins)
        out["ptm_logits"] = self.ptm_head(out["s_z"])
        out["ptm"] = compute_tm(out["ptm_logits"], max_bin=31, no_bins=self.distogram_bins)
        out.update(compute_predicted_aligned_error(out["ptm_logits"], max_bin=31, no_bins=self.distogram_bins))
        return EsmForProteinFoldingOutput(**out)


# ------------------------------------------------------------------------- initialisation

_SOFTPLUS_INVERSE_1 = math.log(math.e - 1.0)  # softplus(x) = 1: IPA head weights start at 1 (AF2 Alg. 22)


def _init_esmfold_linear(layer: EsmFoldLinear) -> None:
    """AF2 supplement 1.11.4 initialisers, chosen by the layer's `init` tag (as openfold's Linear)."""
    weight, bias = layer.weight, layer.bias
    fan_in = max(1, weight.shape[1])
    if layer.init_fn is not None:
        layer.init_fn(weight, bias)
        return
    if layer.init == "default":  # LeCun normal
        torch.nn.init.normal_(weight, std=math.sqrt(1.0 / fan_in))
    elif layer.init == "relu":  # He normal
        torch.nn.init.normal_(weight, std=math.sqrt(2.0 / fan_in))
    elif layer.init == "glorot":
        torch.nn.init.xavier_uniform_(weight, gain=1.0)
    elif layer.init in ("gating", "final"):
        torch.nn.init.zeros_(weight)
    elif layer.init == "normal":
        torch.nn.init.kaiming_normal_(weight, nonlinearity="linear")
    if bias is not None:
        torch.nn.init.constant_(bias, 1.0 if layer.init == "gating" else 0.0)


def init_folding_head(model: FoldingModel) -> None:
    """Initialise every parameter outside the ESM-2 stem as ESMFold/AlphaFold do.

    Upstream `EsmForProteinFolding` derives from `EsmPreTrainedModel`, so `post_init` gives every layer of
    the trunk and structure module BERT's N(0, 0.02) and never applies the ESMFold initialisers of
    `EsmFoldPreTrainedModel`: the backbone update (`init="final"`, zero: all frames start at the identity)
    and the residual output projections start random instead of zero, and the structure module barely
    learns from scratch (backbone FAPE stuck at ~0.88 on one chain). Here: `EsmFoldLinear` by its tag
    (AF2 1.11.4), other Linear / Embedding / LayerNorm layers with PyTorch defaults (the fair-esm trunk),
    IPA head weights softplus^-1(1), zero residual outputs of each trunk block, and recycling bin 0 = 0.
    """
    from transformers.models.esm.modeling_esmfold import (
        EsmFoldInvariantPointAttention,
        EsmFoldTriangularSelfAttentionBlock,
    )

    with torch.no_grad():
        for name, module in model.named_modules():
            if name == "esm" or name.startswith("esm."):
                continue
            if isinstance(module, EsmFoldLinear):
                _init_esmfold_linear(module)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)):
                module.reset_parameters()
            if isinstance(module, EsmFoldInvariantPointAttention):
                module.head_weights.fill_(_SOFTPLUS_INVERSE_1)
        for block in model.trunk.blocks:
            assert isinstance(block, EsmFoldTriangularSelfAttentionBlock)
            zero = [block.tri_mul_in.linear_z, block.tri_mul_out.linear_z, block.tri_att_start.mha.linear_o,
                    block.tri_att_end.mha.linear_o, block.sequence_to_pair.o_proj, block.pair_to_sequence.linear,
                    block.seq_attention.o_proj, block.mlp_seq.mlp[-2], block.mlp_pair.mlp[-2]]
            for layer in zero:
                torch.nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    torch.nn.init.zeros_(layer.bias)
        model.trunk.recycle_disto.weight[0].zero_()


def head_parameters(model: FoldingModel) -> dict[str, torch.nn.Parameter]:
    """Parameters of the folding head outside the trunk blocks (what `model.train_heads` trains): the
    stem-feature projection (`esm_s_combine`, `esm_s_mlp`, `embedding`), structure module and output heads.

    Adapter parameters attached inside these modules (target `sm`: the structure module) are the adapter's,
    not the head's, so they are left out.
    """
    import adapters

    own = set(adapters.adapter_parameter_names(model))
    params: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if name not in own and any(name == m or name.startswith(m + ".") for m in HEAD_MODULES):
            params[name] = param
    return params


# ------------------------------------------------------------------------------- configs

def _on_meta_device() -> bool:
    return torch.empty(0).device.type == "meta"


def check_size_overrides(size: dict) -> None:
    """Validate `model.size` keys (flat `trunk.x` / `trunk.structure_module.x` or nested); raise ValueError."""
    from pipeline.config import ConfigError

    for key, value in flatten(size).items():
        parts = key.split(".")
        ok = ((len(parts) == 1 and parts[0] in STEM_KEYS)
              or (len(parts) == 2 and parts[0] == "trunk" and parts[1] in TRUNK_KEYS)
              or (len(parts) == 3 and parts[:2] == ["trunk", "structure_module"]
                  and parts[2] in STRUCTURE_MODULE_KEYS))
        if not ok:
            raise ConfigError(f"model.size.{key}: unknown size key (stem: {', '.join(STEM_KEYS)}; "
                              f"trunk.<{'|'.join(TRUNK_KEYS)}>; trunk.structure_module.<...>)")
        if parts[-1] == "chunk_size" and value is None:
            continue
        if parts[-1] == "dropout" or parts[-1] == "dropout_rate":
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"model.size.{key}: expected a number in [0, 1), got {value!r}")
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if parts[-1] in ("num_blocks", "max_recycles") else 1):
            raise ConfigError(f"model.size.{key}: expected a positive integer, got {value!r}")


def _apply_overrides(target: dict, size: dict) -> dict:
    out = copy.deepcopy(target)
    for key, value in flatten(size).items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def esm_config(stem: dict, trunk: dict, **extra: Any) -> EsmConfig:
    """An `EsmConfig` for a folding model: ESM-2 alphabet, rotary positions, fp32 stem."""
    if trunk["sequence_state_dim"] % trunk["sequence_head_width"]:
        raise ValueError("model.size.trunk.sequence_state_dim: must be divisible by sequence_head_width")
    if trunk["pairwise_state_dim"] % 2 or trunk["pairwise_state_dim"] % trunk["pairwise_head_width"]:
        raise ValueError("model.size.trunk.pairwise_state_dim: must be even and divisible by pairwise_head_width")
    if stem["hidden_size"] % stem["num_attention_heads"]:
        raise ValueError("model.size.hidden_size: must be divisible by num_attention_heads")
    return EsmConfig(
        vocab_size=33,
        pad_token_id=1,
        mask_token_id=32,
        position_embedding_type="rotary",
        is_folding_model=True,
        vocab_list=list(get_default_vocab_list()),
        esmfold_config={"fp16_esm": False, "trunk": trunk},
        **stem,
        **extra,
    )


def tiny_config(size: dict | None = None) -> EsmConfig:
    """The tiny random folding config (docs/folding.md §1.5) with `size` overrides applied."""
    size = size or {}
    check_size_overrides(size)
    merged = _apply_overrides({**TINY_STEM, "trunk": TINY_TRUNK}, size)
    trunk = merged.pop("trunk")
    return esm_config(merged, trunk)


# ------------------------------------------------------------------------------- builders

def _require_network(host: str, what: str, hint: str) -> None:
    """Fail fast (3 s) instead of letting a hub client retry for a minute when offline."""
    try:
        with socket.create_connection((host, 443), timeout=3):
            return
    except OSError as exc:
        raise ModelSourceError(f"{what}: cannot reach {host} ({exc.__class__.__name__}); {hint}") from exc


def build_esmfold_pretrained(path: str, size: dict | None = None) -> FoldingModel:
    """`FoldingModel.from_pretrained` of a local directory, or of a hub id when the hub is reachable."""
    if size:
        raise ValueError("model.size: not used with source esmfold_pretrained (sizes come from the checkpoint)")
    local = Path(path).expanduser()
    hint = (f"pass model.path=/local/dir holding a save_pretrained copy (config.json + weights), e.g. made "
            f"on a machine with network by `EsmForProteinFolding.from_pretrained('{HUB_ESMFOLD}')"
            f".save_pretrained(DIR)`")
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"model.path: {local}: no config.json; {hint}")
        source = str(local)
        kwargs: dict[str, Any] = {"local_files_only": True}
    else:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ModelSourceError(f"model.path: {path!r} is not a local directory and HF_HUB_OFFLINE is set; {hint}")
        if "/" not in str(path) or str(path).startswith((".", "/", "~")):
            raise ModelSourceError(f"model.path: {path}: no such directory; {hint}")
        _require_network("huggingface.co", f"model.path: {path!r}", hint)
        source, kwargs = str(path), {}
    config = EsmConfig.from_pretrained(source, **kwargs)
    if _on_meta_device():
        return FoldingModel(config)
    # fp16_esm (esmfold_v1: true) makes upstream's __init__ halve the stem before the weights load, which
    # rounds the fp32 checkpoint to fp16 (up to 5e-4 per weight). Build with an fp32 stem so the weights load
    # exactly, then restore the directory's flag (kept for save_pretrained / export); autocast picks the
    # compute dtype (`foldtune predict --precision`).
    fp16_esm = config.esmfold_config.fp16_esm
    config.esmfold_config.fp16_esm = False
    model = FoldingModel.from_pretrained(source, config=config, dtype=torch.float32, **kwargs)
    model.config.esmfold_config.fp16_esm = fp16_esm
    # from_pretrained leaves every weight trainable, undoing EsmForProteinFolding's frozen stem: the stem
    # would then build a graph in plain forwards and `adapters.detach` would restore it as trainable.
    model.esm.requires_grad_(False)
    model.esm.float()  # a checkpoint stored in fp16: fp32 parameters all the same
    return model


def _cfg_get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def _torch_load(path: Path) -> Any:
    """`torch.load` on CPU, memory-mapped when the file is a zip archive (the legacy non-zip serialization
    of older torch versions cannot be mapped and is read whole)."""
    import zipfile

    return torch.load(str(path), map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))


def regression_path(checkpoint: Path) -> Path:
    """fair-esm's location of a checkpoint's contact regression: `<stem>-contact-regression.pt` next to it."""
    return checkpoint.with_name(f"{checkpoint.stem}-contact-regression.pt")


def _read_regression(path: Path, source: str) -> dict[str, torch.Tensor]:
    data = _torch_load(path)
    state = data.get("model") if isinstance(data, dict) else None
    keys = {"contact_head.regression.weight", "contact_head.regression.bias"}
    if not isinstance(state, dict) or set(state) != keys:
        raise ValueError(f"model.esm2: {path}: not a fair-esm contact regression (expected 'model' with "
                         f"{sorted(keys)}) for {source}")
    return dict(state)


def read_fair_esm_checkpoint(source: str, weights: bool = True) -> tuple[dict, tuple[int, int, int], bool]:
    """Load a fair-esm ESM-2 checkpoint (local `.pt` or release name).

    Returns (state_dict with fair-esm module names, (layers, embed_dim, heads), token_dropout). The state
    includes `contact_head.regression.*` when the release's separate `<name>-contact-regression.pt` is found
    (next to a local file; in the torch hub cache or downloaded for a name), as fair-esm loads it.
    With `weights=False` a release name is sized from `FAIR_ESM2_MODELS` without any download.
    """
    path = Path(source).expanduser()
    regression: Path | None = None
    if path.suffix == ".pt" or path.exists():
        if not path.is_file():
            raise ModelSourceError(f"model.esm2: {path}: no such file")
        data = _torch_load(path)
        regression = regression_path(path)
    else:
        if source not in FAIR_ESM2_MODELS:
            raise ModelSourceError(f"model.esm2: {source!r}: not a file and not a fair-esm ESM-2 name "
                                   f"({', '.join(FAIR_ESM2_MODELS)})")
        if not weights:
            return {}, FAIR_ESM2_MODELS[source], True
        cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{source}.pt"
        if cached.is_file():
            data = _torch_load(cached)
        else:
            _require_network("dl.fbaipublicfiles.com", f"model.esm2: {source!r}",
                             f"download {FAIR_ESM_URL.format(name=source)} elsewhere and pass model.esm2=/path/{source}.pt")
            import esm.pretrained
            data = esm.pretrained.load_hub_workaround(FAIR_ESM_URL.format(name=source))
            esm.pretrained.load_hub_workaround(FAIR_ESM_REGRESSION_URL.format(name=source))  # into the hub cache
        regression = regression_path(cached)
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"model.esm2: {source}: not a fair-esm checkpoint (expected a dict with 'model')")
    if "cfg" in data:
        cfg = _cfg_get(data["cfg"], "model")
        dims = (_cfg_get(cfg, "encoder_layers"), _cfg_get(cfg, "encoder_embed_dim"),
                _cfg_get(cfg, "encoder_attention_heads"))
        token_dropout = bool(_cfg_get(cfg, "token_dropout"))
    elif "args" in data:
        args = data["args"]
        dims = (_cfg_get(args, "layers"), _cfg_get(args, "embed_dim"), _cfg_get(args, "attention_heads"))
        token_dropout = bool(getattr(args, "token_dropout", True) if not isinstance(args, dict)
                             else args.get("token_dropout", True))
    else:
        raise ValueError(f"model.esm2: {source}: checkpoint has neither 'cfg' nor 'args'")
    state = {}
    for name, tensor in data["model"].items():
        for prefix in ("encoder.sentence_encoder.", "encoder."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        state[name] = tensor
    if regression is not None and regression.is_file() and not any(k.startswith("contact_head.") for k in state):
        state.update(_read_regression(regression, source))
    return state, tuple(int(d) for d in dims), token_dropout


def has_contact_regression(state: dict[str, torch.Tensor]) -> bool:
    """Whether a fair-esm state dict carries the trained contact regression (else the head is random)."""
    return "contact_head.regression.weight" in state


_LAYER_MAP = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}


def fair_esm_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a fair-esm ESM-2 state dict to HF `EsmModel` names (no copies).

    Dropped: rotary `inv_freq` buffers (recomputed by HF from the head size) and the LM head (the
    folding stem has none).
    """
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("rot_emb.inv_freq") or name.startswith("lm_head"):
            continue
        if name == "embed_tokens.weight":
            mapped["embeddings.word_embeddings.weight"] = tensor
        elif name.startswith("emb_layer_norm_after."):
            mapped["encoder." + name] = tensor
        elif name.startswith("contact_head."):
            mapped[name] = tensor
        elif name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            if module not in _LAYER_MAP:
                raise ValueError(f"fair-esm key {name}: no HF counterpart")
            mapped[f"encoder.layer.{layer}.{_LAYER_MAP[module]}.{leaf}"] = tensor
        else:
            raise ValueError(f"fair-esm key {name}: no HF counterpart")
    return mapped


def esm2_stem_config(dims: tuple[int, int, int], token_dropout: bool, num_blocks: int,
                     size: dict | None = None) -> EsmConfig:
    layers, embed_dim, heads = dims
    size = size or {}
    check_size_overrides(size)
    stem_keys = [k for k in flatten(size) if "." not in k]
    if stem_keys:
        raise ValueError(f"model.size.{stem_keys[0]}: stem sizes come from the ESM-2 checkpoint (source esm2_stem)")
    trunk_size = {k[len("trunk."):]: v for k, v in flatten(size).items() if k.startswith("trunk.")}
    trunk = _apply_overrides({**ESMFOLD_TRUNK, "num_blocks": num_blocks}, trunk_size)
    stem = {"hidden_size": embed_dim, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * embed_dim}
    # ESM-2 has no dropout (fair-esm's layers have none); HF's EsmConfig defaults to 0.1 on both.
    return esm_config(stem, trunk, token_dropout=token_dropout, emb_layer_norm_before=False, layer_norm_eps=1e-5,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_esm2_stem(source: str, num_blocks: int, size: dict | None = None) -> FoldingModel:
    """A fair-esm ESM-2 stem (weights mapped into HF names) + a fresh folding head of `num_blocks` blocks."""
    meta = _on_meta_device()
    state, dims, token_dropout = read_fair_esm_checkpoint(source, weights=not meta)
    model = FoldingModel(esm2_stem_config(dims, token_dropout, num_blocks, size))
    if meta:
        return model
    init_folding_head(model)  # the folding head is fresh: ESMFold's initialisers (see init_folding_head)
    mapped = fair_esm_to_hf(state)
    expected = set(model.esm.state_dict())
    missing = sorted(k for k in expected - set(mapped)
                     if not k.endswith("inv_freq") and not k.startswith("contact_head"))
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected:
        raise ValueError(f"model.esm2: {source}: checkpoint does not fit an ESM-2 of {dims}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.esm.load_state_dict(mapped, strict=False)
    return model


INIT_SEED = 0  # fresh weights (random models, new folding heads) are a function of the config alone


def build_folding_model(model_cfg: dict) -> FoldingModel:
    """Build the base folding model of a `model:` config section (see docs/training.md).

    Freshly initialised weights are drawn under a fixed seed (global RNG state restored afterwards), so
    training and prediction rebuild bit-identical base weights from the same config.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return _build_folding_model(model_cfg)


def _build_folding_model(model_cfg: dict) -> FoldingModel:
    source = model_cfg.get("source", "random")
    size = model_cfg.get("size") or {}
    if source == "random":
        model = FoldingModel(tiny_config(size))
        if not _on_meta_device():
            init_folding_head(model)
        return model
    if source == "esmfold_pretrained":
        if not model_cfg.get("path"):
            raise ValueError("model.path: source esmfold_pretrained needs a local directory or hub id")
        return build_esmfold_pretrained(model_cfg["path"], size)
    if source == "esm2_stem":
        if not model_cfg.get("esm2"):
            raise ValueError("model.esm2: source esm2_stem needs a fair-esm name or a local .pt")
        return build_esm2_stem(model_cfg["esm2"], int(model_cfg.get("num_blocks", 0)), size)
    raise ValueError(f"model.source: unknown source {source!r} (random, esmfold_pretrained, esm2_stem)")


def max_recycles(model: FoldingModel) -> int:
    return int(model.config.esmfold_config.trunk.max_recycles)


def default_recycles(model: FoldingModel) -> int:
    """Recycles of a forward with `num_recycles=None`, as upstream `EsmForProteinFolding`: `max_recycles`
    trunk passes, i.e. max_recycles - 1 recycles (0 for max_recycles 0: a single pass)."""
    return max(max_recycles(model) - 1, 0)

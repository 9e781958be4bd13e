"""Folding-model builders, the fair-esm -> HF stem mapping and the trainable-stem forward."""

from __future__ import annotations

import time

import pytest
import torch
from esm.data import Alphabet
from esm.model.esm2 import ESM2
from transformers.models.esm.modeling_esmfold import EsmForProteinFolding

import adapters
from pipeline.losses import folding_loss
from pipeline.models import (
    ModelSourceError,
    build_folding_model,
    fair_esm_to_hf,
    head_parameters,
)
from pipeline.train import attach_method

STEM_LORTA = {"method": "lorta", "rank": 4, "alpha": 8, "targets": ["attn", "mlp"], "part": "stem", "dropout": 0.0}


def _batch(length: int = 12, batch: int = 2, seed: int = 0) -> dict:
    """A synthetic batch with an extended-chain backbone (CA 3.8 Å apart) so every loss term is defined."""
    g = torch.Generator().manual_seed(seed)
    aatype = torch.randint(0, 20, (batch, length), generator=g)
    pos = torch.zeros(batch, length, 37, 3)
    x = torch.arange(length, dtype=torch.float32) * 3.8
    pos[..., 0, 0], pos[..., 1, 0], pos[..., 2, 0] = x[None] - 1.2, x[None], x[None] + 1.2
    pos[..., 0, 1], pos[..., 2, 1] = 0.8, 0.8
    pos[..., 4, 0], pos[..., 4, 1] = x[None] + 1.6, 1.9  # O (atom37 order N, CA, C, CB, O)
    pos[..., 3, 2] = 1.5  # CB
    pos[..., 3, 0] = x[None]
    mask37 = torch.zeros(batch, length, 37)
    mask37[..., :5] = 1
    return {"aatype": aatype, "residue_index": torch.arange(length).expand(batch, -1).clone(),
            "mask": torch.ones(batch, length), "atom37_positions": pos, "atom37_mask": mask37,
            "chain_id": [f"c{i}" for i in range(batch)]}


def _tiny_fair_esm(tmp_path):
    torch.manual_seed(3)
    model = ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet=Alphabet.from_architecture("ESM-1b"),
                 token_dropout=True).eval()
    path = tmp_path / "tiny_esm2.pt"
    # fair-esm release layout: {"model": state_dict with "encoder." prefixes, "cfg": {"model": ...}}
    state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "cfg": {"model": {"encoder_layers": 2, "encoder_embed_dim": 32,
                                                   "encoder_attention_heads": 4, "token_dropout": True}}}, path)
    return model, path


def test_fair_esm_stem_maps_to_identical_hidden_states(tmp_path):
    fair, path = _tiny_fair_esm(tmp_path)
    model = build_folding_model({"source": "esm2_stem", "esm2": str(path), "num_blocks": 0,
                                 "size": {"trunk.sequence_state_dim": 64, "trunk.pairwise_state_dim": 32,
                                          "trunk.sequence_head_width": 16, "trunk.pairwise_head_width": 16,
                                          "trunk.structure_module.sequence_dim": 32,
                                          "trunk.structure_module.pairwise_dim": 32}}).eval()
    assert len(model.trunk.blocks) == 0  # structure-module-only head
    abc = Alphabet.from_architecture("ESM-1b")
    _, _, tokens = abc.get_batch_converter()([("a", "MKTAYIAKQRQISFVKSHFSRQ"), ("b", "GSHMLE")])
    with torch.no_grad():
        ref = fair(tokens, repr_layers=[0, 1, 2])["representations"]
        hf = model.esm(tokens, attention_mask=tokens != abc.padding_idx, output_hidden_states=True)["hidden_states"]
    real = (tokens != abc.padding_idx)[..., None]
    for layer in range(3):
        diff = ((hf[layer] - ref[layer]) * real).abs().max().item()
        assert diff < 1e-5, f"layer {layer}: max |HF - fair-esm| = {diff}"
    # the whole model folds with the mapped stem
    out = model(torch.randint(0, 20, (1, 9)), num_recycles=0)
    assert out.positions.shape == (model.config.esmfold_config.trunk.structure_module.num_blocks, 1, 9, 14, 3)


def test_fair_esm_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="layers.0.self_attn.bias_k"):
        fair_esm_to_hf({"layers.0.self_attn.bias_k.weight": torch.zeros(1)})


def test_save_pretrained_directory_round_trip(tmp_path):
    model = build_folding_model({"source": "random"}).eval()
    model.save_pretrained(tmp_path / "esmfold_tiny")
    loaded = build_folding_model({"source": "esmfold_pretrained", "path": str(tmp_path / "esmfold_tiny")}).eval()
    aa = torch.randint(0, 20, (1, 10))
    with torch.no_grad():
        a, b = model(aa, num_recycles=1), loaded(aa, num_recycles=1)
    assert torch.equal(a.positions, b.positions)
    assert type(loaded).__name__ == "FoldingModel"


def test_offline_sources_fail_fast_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(ModelSourceError, match="model.path.*local"):
        build_folding_model({"source": "esmfold_pretrained", "path": "facebook/esmfold_v1"})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached fair-esm weights
    monkeypatch.setattr("pipeline.models.socket.create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ModelSourceError, match="model.esm2.*esm2_t6_8M_UR50D.pt"):
        build_folding_model({"source": "esm2_stem", "esm2": "esm2_t6_8M_UR50D"})
    with pytest.raises(ModelSourceError, match="not a file and not a fair-esm"):
        build_folding_model({"source": "esm2_stem", "esm2": "esm2_bogus"})
    assert time.time() - started < 5


def test_meta_device_build_counts_like_the_real_model():
    real = build_folding_model({"source": "random", "size": {"trunk": {"num_blocks": 3}}})
    with torch.device("meta"):
        meta = build_folding_model({"source": "random", "size": {"trunk": {"num_blocks": 3}}})
        big = build_folding_model({"source": "esm2_stem", "esm2": "esm2_t36_3B_UR50D", "num_blocks": 48})
    assert next(meta.parameters()).device.type == "meta"
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    # ESMFold v1 geometry: 3525.0 M parameters (docs/folding.md §1.2)
    assert round(sum(p.numel() for p in big.parameters()) / 1e6, 1) == 3525.0


def test_random_base_is_a_function_of_the_config():
    torch.manual_seed(123)
    a = build_folding_model({"source": "random"})
    state = torch.get_rng_state()
    b = build_folding_model({"source": "random"})
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _stem_adapter_grads(model) -> list[float]:
    batch = _batch()
    out = model(batch["aatype"], attention_mask=batch["mask"].long(), position_ids=batch["residue_index"],
                num_recycles=0)
    folding_loss(out, batch)[0].backward()
    names = adapters.adapter_parameter_names(model)  # part=stem: every adapter parameter is a stem one
    params = dict(model.named_parameters())
    assert names, "no stem adapter parameters found"
    return [0.0 if params[n].grad is None else params[n].grad.abs().sum().item() for n in names]


def test_stem_adapters_receive_gradient_unlike_upstream():
    ours = build_folding_model({"source": "random"})
    upstream = EsmForProteinFolding(ours.config)
    upstream.load_state_dict(ours.state_dict())
    for model in (ours, upstream):
        attach_method(model, STEM_LORTA)
        # B = 0 at init, so only B gets gradient at step 0; give it a value so every factor can
        for name, p in model.named_parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    ours_grads, upstream_grads = _stem_adapter_grads(ours), _stem_adapter_grads(upstream)
    assert all(g > 0 for g in ours_grads), ours_grads
    assert all(g == 0 for g in upstream_grads), upstream_grads  # upstream .detach()es the stem output


def test_frozen_stem_runs_without_graph_and_heads_are_selected():
    model = build_folding_model({"source": "random"})
    attach_method(model, {**STEM_LORTA, "part": "trunk"}, train_heads=True)
    assert not model.stem_trainable
    esm_s = model.language_model_features(torch.randint(4, 24, (1, 8)))
    assert not esm_s.requires_grad
    heads = head_parameters(model)
    assert any(n.startswith("trunk.structure_module.") for n in heads) and "distogram_head.weight" in heads
    assert all(p.requires_grad for p in heads.values())
    assert not any(n.startswith("trunk.blocks.") for n in heads)


@pytest.mark.parametrize("train_heads", [False, True])
def test_structure_module_adapters_count_as_the_adapters_not_the_head(train_heads):
    """Target sm puts adapter parameters inside trunk.structure_module: they are the method's own."""
    from pipeline.train import trainable_head_params

    model = build_folding_model({"source": "random"})
    attach_method(model, {"method": "lora", "rank": 2, "targets": ["sm"], "part": "trunk"}, train_heads=train_heads)
    own = adapters.adapter_parameter_names(model)
    assert own and all(n.startswith("trunk.structure_module.") for n in own)
    assert not set(own) & set(head_parameters(model))
    sm_width = model.trunk.structure_module.linear_in.in_features
    assert sum(dict(model.named_parameters())[n].numel() for n in own) == 4 * 2 * 2 * sm_width
    heads = sum(p.numel() for p in head_parameters(model).values())
    assert trainable_head_params(model) == (heads if train_heads else 0)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for enabled in (False, True):
        model = build_folding_model({"source": "random"})
        torch.manual_seed(0)  # same adapter initialisation in both models
        attach_method(model, {**STEM_LORTA, "part": "all"}, train_heads=True)
        model.set_grad_checkpointing(enabled)
        batch = _batch(length=10, batch=1, seed=1)
        out = model(batch["aatype"], attention_mask=batch["mask"].long(), position_ids=batch["residue_index"],
                    num_recycles=0)
        folding_loss(out, batch)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)

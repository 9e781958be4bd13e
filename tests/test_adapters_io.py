"""adapters.save / adapters.load: round trips, extra trainable params, TLoRA regeneration, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.layer import adapted_linears
from adapters.tlora import random_projections
from adapters.zoo import fair_esm2
from tests.test_adapters_math import (
    cfg,
    esm_logits,
    esm_tokens,
    randomize_adapters,
    stem_and_trunk,
    tiny_esm2,
    tiny_esmfold,
)


@pytest.mark.parametrize("method", ["lora", "lorta", "tlora", "full"])
def test_round_trip_esm2(tmp_path, method):
    model = tiny_esm2()
    config = cfg(method, 4, ("attn", "mlp")) if method != "full" else adapters.config_from_dict({"method": "full"})
    adapters.attach(model, config)
    if method == "full":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    else:
        randomize_adapters(model)
    tokens = esm_tokens()
    with torch.no_grad():
        want = esm_logits(model, tokens)
    adapters.save(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / adapters.CONFIG_NAME).read_text())
    assert saved["method"] == method and saved["spec"]["model_kind"] == "fair_esm2"
    stored = load_file(str(tmp_path / "adapter" / adapters.WEIGHTS_NAME))
    assert sum(v.numel() for v in stored.values()) == adapters.count_trainable(model)

    fresh = tiny_esm2()  # same base weights (same seed), no adapters: load attaches from the saved config
    adapters.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = esm_logits(fresh, tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert adapters.count_trainable(fresh) == adapters.count_trainable(model)


@pytest.mark.parametrize("part", ["stem", "trunk", "all"])
def test_round_trip_esmfold_parts_with_extra_trainable_heads(tmp_path, part):
    model = tiny_esmfold()
    adapters.attach(model, cfg("lorta", 3, ("attn", "mlp"), part=part))
    randomize_adapters(model)
    for p in model.distogram_head.parameters():  # an unfrozen head is saved beside the adapter
        p.requires_grad_(True)
        with torch.no_grad():
            p.add_(0.5)
    want = stem_and_trunk(model)
    want_head = model.distogram_head.weight.detach().clone()
    adapters.save(model, tmp_path)
    saved = json.loads((tmp_path / adapters.CONFIG_NAME).read_text())
    assert saved["extra_params"] == ["distogram_head.weight", "distogram_head.bias"]
    stacks = {s["name"]: s for s in saved["spec"]["stacks"]}
    if part != "stem":
        assert stacks["trunk_seq"]["types"] == ["q", "k", "v", "o"] + [f"fc{i}.{s}" for i in (1, 2) for s in range(4)]
        assert stacks["trunk_seq"]["fused"] == ["proj"]
    fresh = tiny_esmfold()
    adapters.attach(fresh, cfg("lorta", 3, ("attn", "mlp"), part=part))  # load into an attached model
    adapters.load(fresh, tmp_path)
    for a, b in zip(stem_and_trunk(fresh), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(fresh.distogram_head.weight, want_head) and fresh.distogram_head.weight.requires_grad


def test_tlora_regeneration_is_bit_identical_and_file_holds_only_b_and_alpha(tmp_path):
    model = tiny_esm2()
    adapters.attach(model, cfg("tlora", 4, ("qv",), seed=7))
    randomize_adapters(model)
    adapters.save(model, tmp_path)
    keys = load_file(str(tmp_path / adapters.WEIGHTS_NAME)).keys()
    assert keys and all(k.endswith(("tlora_B", "tlora_alpha")) for k in keys)
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (B, alpha)
    fresh = tiny_esm2()
    adapters.load(fresh, tmp_path)
    pairs = list(zip(adapted_linears(model), adapted_linears(fresh)))
    for (_, _, a), (_, _, b) in pairs:
        assert torch.equal(a.tlora_A, b.tlora_A) and torch.equal(a.tlora_C, b.tlora_C)
        assert torch.equal(a.get_delta_weight(), b.get_delta_weight())
    # projections differ between modules and with the seed; their scale follows kaiming-normal(a=sqrt 5)
    first, second = pairs[0][0][2], pairs[1][0][2]
    assert not torch.equal(first.tlora_A, second.tlora_A)
    other = tiny_esm2()
    adapters.attach(other, cfg("tlora", 4, ("qv",), seed=8))
    assert not torch.equal(adapted_linears(other)[0][2].tlora_A, first.tlora_A)
    big = random_projections(512, 512, 64, seed=1)[0]
    assert abs(big.std().item() - 1 / (3 * 64) ** 0.5) < 0.002


def test_load_refuses_a_different_attached_config(tmp_path):
    model = tiny_esm2()
    adapters.attach(model, cfg("lorta", 4))
    adapters.save(model, tmp_path)
    other = tiny_esm2()
    adapters.attach(other, cfg("lorta", 8))
    with pytest.raises(ValueError, match=r"adapter_config.json.*config\.rank: saved 4, model 8"):
        adapters.load(other, tmp_path)


def test_load_refuses_a_model_with_another_shape(tmp_path):
    model = tiny_esm2()
    adapters.attach(model, cfg("lora", 4))
    adapters.save(model, tmp_path)
    torch.manual_seed(0)
    wider = fair_esm2(2, 48, 4)
    with pytest.raises(ValueError, match=r"spec\.stacks\[0\]\.dim: saved 32, model 48"):
        adapters.load(wider, tmp_path)
    deeper = fair_esm2(3, 32, 4)
    with pytest.raises(ValueError, match=r"spec\.stacks\[0\]\.layers: saved 2, model 3"):
        adapters.load(deeper, tmp_path)
    with pytest.raises(ValueError, match="model_kind: saved 'fair_esm2', model 'hf_esmfold'"):
        adapters.load(tiny_esmfold(), tmp_path)


def test_load_refuses_tampered_shapes_and_corrupt_files(tmp_path):
    model = tiny_esm2()
    adapters.attach(model, cfg("lorta", 4))
    adapters.save(model, tmp_path)
    weights = tmp_path / adapters.WEIGHTS_NAME
    tensors = load_file(str(weights))
    tensors["lorta_stacks.stem.A"] = torch.zeros(32, 5)
    from safetensors.torch import save_file

    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"lorta_stacks\.stem\.A: shape \(32, 5\) in the file, \(32, 4\) in the model"):
        adapters.load(tiny_esm2(), tmp_path)

    payload = weights.read_bytes()
    weights.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: corrupt or truncated"):
        adapters.load(tiny_esm2(), tmp_path)

    config = tmp_path / adapters.CONFIG_NAME
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=r"adapter_config\.json: corrupt or truncated JSON"):
        adapters.load(tiny_esm2(), tmp_path)
    with pytest.raises(ValueError, match="not found"):
        adapters.load(tiny_esm2(), tmp_path / "missing")


def test_save_is_atomic_and_requires_an_attached_adapter(tmp_path):
    with pytest.raises(ValueError, match="no adapters attached"):
        adapters.save(tiny_esm2(), tmp_path)
    model = tiny_esm2()
    adapters.attach(model, cfg("lora", 2))
    adapters.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [adapters.CONFIG_NAME, adapters.WEIGHTS_NAME]

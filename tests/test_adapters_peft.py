"""LoRA in peft's own format, both ways, checked with the installed peft (the oracle) on transformers ESM models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adapters
from pipeline.cli import main
from tests._adapter_runs import make_run
from tests.test_adapters_math import cfg, randomize_adapters

peft = pytest.importorskip("peft", reason="peft (a dev dependency) is not installed")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import EsmConfig, EsmForMaskedLM  # noqa: E402
from transformers.models.esm.modeling_esmfold import EsmForProteinFolding  # noqa: E402


def tiny_masked_lm(seed: int = 0) -> EsmForMaskedLM:
    torch.manual_seed(seed)
    config = EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary")
    return EsmForMaskedLM(config).eval()


def tokens() -> torch.Tensor:
    return torch.randint(4, 24, (2, 11), generator=torch.Generator().manual_seed(1))


def upstream_esmfold(seed: int = 0) -> EsmForProteinFolding:
    """Upstream's class (not foldtune's FoldingModel) with the weights of foldtune's tiny random base."""
    from pipeline.models import build_folding_model

    source = build_folding_model({"source": "random"})
    model = EsmForProteinFolding(source.config)
    model.load_state_dict(source.state_dict())
    return model.eval()


def fold_positions(model, sequence: str = "MKTAYIAKQRQISFVKSHFSRQ") -> torch.Tensor:
    with torch.no_grad():
        return model.infer(sequence)["positions"][-1]


def test_export_to_peft_loads_in_peft_with_equal_logits_and_peft_keys(tmp_path):
    model = tiny_masked_lm()
    adapters.attach(model, cfg("lora", 3, ("attn", "mlp")))
    randomize_adapters(model)
    with torch.no_grad():
        for param in model.lm_head.dense.parameters():  # a trained head: peft's modules_to_save
            param.requires_grad_(True)
            param.add_(0.3)
        want = model(tokens()).logits
    adapters.save_peft(model, tmp_path / "ours", base_model_name_or_path="esm-tiny")

    loaded = PeftModel.from_pretrained(tiny_masked_lm(), tmp_path / "ours").eval()
    with torch.no_grad():
        got = loaded(tokens()).logits
        untuned = tiny_masked_lm()(tokens()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - untuned).abs().max() > 1e-2  # the adapter does something

    # peft's own save of the same targets: same config fields, same keys and shapes
    saved = json.loads((tmp_path / "ours" / adapters.CONFIG_NAME).read_text())
    assert saved["base_model_name_or_path"] == "esm-tiny" and saved["modules_to_save"] == ["lm_head.dense"]
    reference = get_peft_model(tiny_masked_lm(), LoraConfig(r=3, lora_alpha=saved["lora_alpha"],
                                                            target_modules=saved["target_modules"],
                                                            modules_to_save=["lm_head.dense"]))
    reference.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / adapters.CONFIG_NAME).read_text())
    assert (theirs["peft_type"], theirs["r"], theirs["lora_alpha"]) == (saved["peft_type"], 3, saved["lora_alpha"])
    assert sorted(theirs["target_modules"]) == sorted(saved["target_modules"])
    ours = load_file(str(tmp_path / "ours" / adapters.WEIGHTS_NAME))
    peft_tensors = load_file(str(tmp_path / "peft" / adapters.WEIGHTS_NAME))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in peft_tensors.items()}
    assert "base_model.model.esm.encoder.layer.0.attention.self.query.lora_A.weight" in ours


def test_import_from_peft_gives_peft_outputs(tmp_path):
    reference = get_peft_model(tiny_masked_lm(), LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    reference.eval()
    with torch.no_grad():
        want = reference(tokens()).logits
    reference.save_pretrained(tmp_path)

    model = tiny_masked_lm()
    adapters.load(model, tmp_path)
    state = adapters.attached(model)
    assert state.config.method == "lora" and state.config.targets == ("qv",) and state.config.rank == 2
    assert state.config.alpha == 5
    with torch.no_grad():
        got = model(tokens()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_import_refuses_what_foldtune_cannot_express(tmp_path):
    one_layer = get_peft_model(tiny_masked_lm(), LoraConfig(r=2, target_modules=["query"], layers_to_transform=[0]))
    one_layer.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="layers_to_transform"):
        adapters.load(tiny_masked_lm(), tmp_path / "a")
    query_only = get_peft_model(tiny_masked_lm(), LoraConfig(r=2, target_modules=["query"]))
    query_only.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="does not correspond to a foldtune LoRA config"):
        adapters.load(tiny_masked_lm(), tmp_path / "b")


def test_esmfold_run_exports_to_peft_and_back(tmp_path):
    run = make_run(tmp_path, "lora", {"method": "lora", "rank": 2, "targets": ["attn", "mlp"], "part": "all"})
    from pipeline.predict import load_run_model

    want = fold_positions(load_run_model(run))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "peft")]) == 0
    saved = json.loads((tmp_path / "peft" / adapters.CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA" and saved["modules_to_save"] is None
    assert "trunk.blocks.0.seq_attention.proj" in saved["target_modules"]  # fused qkv, whole rows

    loaded = PeftModel.from_pretrained(upstream_esmfold(), tmp_path / "peft").eval()
    got = fold_positions(loaded.base_model.model)
    assert float((got - want).abs().max()) <= 1e-4
    assert float((got - fold_positions(upstream_esmfold())).abs().max()) > 1e-3  # the adapter moved atoms

    back = upstream_esmfold()  # and back into foldtune: the same model again
    adapters.load(back, tmp_path / "peft")
    assert float((fold_positions(back) - want).abs().max()) <= 1e-4


def test_esmfold_trained_head_module_travels_as_modules_to_save(tmp_path):
    model = upstream_esmfold()
    adapters.attach(model, cfg("lora", 2, ("attn",), part="trunk"))
    randomize_adapters(model, seed=4)
    with torch.no_grad():
        for param in model.distogram_head.parameters():
            param.requires_grad_(True)
            param.add_(0.2)
        model.lddt_head[0].weight.requires_grad_(True)  # half a module: not expressible
    with pytest.raises(ValueError, match="lddt_head.0 is only partly trained"):
        adapters.save_peft(model, tmp_path)
    model.lddt_head[0].weight.requires_grad_(False)
    adapters.save_peft(model, tmp_path)
    want = model.eval()(torch.tensor([[1, 2, 3, 4, 5, 6]]))["distogram_logits"]
    loaded = PeftModel.from_pretrained(upstream_esmfold(), tmp_path).eval()
    got = loaded.base_model.model(torch.tensor([[1, 2, 3, 4, 5, 6]]))["distogram_logits"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_train_heads_runs_have_no_peft_form(tmp_path, capsys):
    run = make_run(tmp_path, "heads", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"},
                   model={"train_heads": True})
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "peft")]) == 2
    assert "esm_s_combine" in capsys.readouterr().err


def test_qv_on_the_fused_trunk_projection_has_no_peft_form(tmp_path, capsys):
    run = make_run(tmp_path, "qv", {"method": "lora", "rank": 2, "targets": ["qv"], "part": "trunk"})
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err
    assert "seq_attention.proj" in err and "no peft equivalent" in err and "Traceback" not in err
    lorta = make_run(tmp_path, "lorta", {"method": "lorta", "rank": 2, "targets": ["attn"], "part": "trunk"})
    assert main(["export", "--run", str(lorta), "--out", str(tmp_path / "peft2")]) == 2
    assert "only LoRA has a peft type" in capsys.readouterr().err


def test_import_peft_command_writes_a_run_that_predict_reads(tmp_path):
    reference = get_peft_model(upstream_esmfold(), LoraConfig(r=2, lora_alpha=4, target_modules=[
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    want = fold_positions(reference.base_model.model.eval())
    reference.save_pretrained(tmp_path / "peft")
    config = tmp_path / "base.yaml"
    config.write_text("model:\n  source: random\n")
    assert main(["import-peft", "--adapter", str(tmp_path / "peft"), "--config", str(config),
                 "--out", str(tmp_path / "run")]) == 0
    saved = adapters.read_config(tmp_path / "run" / "adapter")
    assert (saved["method"], saved["targets"], saved["part"]) == ("lora", ["attn"], "stem")
    from pipeline.predict import load_run_model

    got = fold_positions(load_run_model(tmp_path / "run"))
    assert float((got - want).abs().max()) <= 1e-4

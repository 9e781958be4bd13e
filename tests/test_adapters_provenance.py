"""Adapters record their base and refuse another one; NaN weights, a run/adapter mismatch and TLoRA seeds."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import adapters
from adapters.provenance import fingerprint
from pipeline.cli import main
from pipeline.predict import load_run_model
from tests._adapter_runs import make_run
from tests.test_adapters_math import cfg, randomize_adapters, tiny_esm2, tiny_esmfold


def test_identical_saves_give_identical_bytes(tmp_path):
    # safetensors writes a metadata map in a random order: with two keys, 6 equal files had p = 1/32
    contents = set()
    for i in range(6):
        model = tiny_esmfold()
        adapters.attach(model, cfg("lorta", 3, ("attn", "mlp")), base_source={"source": "random"})
        randomize_adapters(model)
        adapters.save(model, tmp_path / str(i))
        contents.add(((tmp_path / str(i) / adapters.WEIGHTS_NAME).read_bytes(),
                      (tmp_path / str(i) / adapters.CONFIG_NAME).read_bytes()))
    assert len(contents) == 1


def test_config_records_base_source_fingerprint_and_version(tmp_path):
    model = tiny_esm2()
    adapters.attach(model, cfg("lora", 2, ("attn",)), base_source={"source": "esm2_t6_8M_UR50D"})
    adapters.save(model, tmp_path)
    saved = json.loads((tmp_path / adapters.CONFIG_NAME).read_text())
    assert saved["format"] == "foldtune" and "peft_type" not in saved
    assert saved["base"]["source"] == {"source": "esm2_t6_8M_UR50D"}
    assert saved["base"]["fingerprint"] == fingerprint(tiny_esm2())
    assert saved["foldtune_version"] not in ("", None)


def test_fingerprint_ignores_dtype_but_not_weights():
    base = fingerprint(tiny_esm2(seed=0))
    assert fingerprint(tiny_esm2(seed=0).to(torch.bfloat16)) == base  # a bf16 copy is the same base
    other = fingerprint(tiny_esm2(seed=1))
    assert other["structure"] == base["structure"] and other["content"] != base["content"]
    assert fingerprint(tiny_esm2(layers=3))["structure"] != base["structure"]
    with torch.device("meta"):
        meta = fingerprint(tiny_esm2())
    assert meta["content"] is None and meta["structure"] == base["structure"]


def test_load_onto_another_base_names_both_and_force_overrides(tmp_path):
    model = tiny_esm2(seed=0)
    adapters.attach(model, cfg("lora", 2, ("attn",)), base_source="base A")
    randomize_adapters(model)
    adapters.save(model, tmp_path)
    other = tiny_esm2(seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match=r"another base: base A .*this model is base B.*--force"):
        adapters.load(other, tmp_path, base_source="base B")
    assert adapters.attached(other) is None  # the failed load left the model as it was
    adapters.load(other, tmp_path, force=True)
    assert adapters.attached(other) is not None


def test_nan_adapter_weights_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_esm2()
    adapters.attach(model, cfg("lorta", 2, ("attn",)))
    adapters.save(model, tmp_path)
    tensors = load_file(str(tmp_path / adapters.WEIGHTS_NAME))
    tensors["lorta_stacks.stem.B"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / adapters.WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: lorta_stacks.stem.B: 1 of \d+ values are NaN"):
        adapters.load(tiny_esm2(), tmp_path)


def test_predict_refuses_an_adapter_that_does_not_match_the_run_config(tmp_path, capsys):
    run = make_run(tmp_path, "run", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"})
    load_run_model(run)  # consistent: loads
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["adapter"]["rank"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"adapter_config.json: rank: 2, but .*config.yaml says adapter.rank=4"):
        load_run_model(run)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    assert main(["predict", "--run", str(run), "--fasta", str(fasta), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("foldtune predict: ") and "rank" in err and "Traceback" not in err


def test_predict_names_both_bases_when_the_run_config_builds_another_base(tmp_path, capsys):
    run = make_run(tmp_path, "run", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"})
    # same shapes, other weights: the base run's full fine-tune replaces the random base
    base_run = make_run(tmp_path, "full", {"method": "full", "part": "all"})
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["base_run"] = str(base_run)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    args = ["predict", "--run", str(run), "--fasta", str(fasta), "--out", str(tmp_path / "p"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "another base: kind=fold, source=random" in err and f"base_run={base_run.resolve()}" in err
    assert main(args + ["--force"]) == 0


def test_tlora_projections_follow_the_run_seed(tmp_path):
    runs = [make_run(tmp_path, f"s{seed}", {"method": "tlora", "rank": 2, "targets": ["attn"], "part": "trunk"},
                     seed=seed) for seed in (0, 1)]
    saved = [adapters.read_config(run / "adapter") for run in runs]
    assert [s["seed"] for s in saved] == [0, 1]  # recorded
    projections = []
    for run in runs:
        model = load_run_model(run)
        linear = model.get_submodule("trunk.blocks.0.seq_attention.o_proj")
        projections.append(linear.adapter.tlora_A.clone())
        again = load_run_model(run).get_submodule("trunk.blocks.0.seq_attention.o_proj").adapter.tlora_A
        assert torch.equal(again, projections[-1])  # regenerated bit-identically
    assert not torch.allclose(projections[0], projections[1])

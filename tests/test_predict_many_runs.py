"""`foldtune predict --run A B C ...`: one base per group of runs, adapters switched, outputs as one at a time."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import adapters
import pipeline.predict as predict
from pipeline.cli import main
from tests._adapter_runs import make_run
from tests.test_adapters_math import tiny_esmfold

RUNS = {
    "lora_heads": ({"method": "lora", "rank": 2, "targets": ["attn", "mlp"], "part": "all"}, {"train_heads": True}),
    "lorta": ({"method": "lorta", "rank": 2, "targets": ["attn"], "part": "trunk"}, {}),
    "full_trunk": ({"method": "full", "part": "trunk"}, {}),  # overwrites base weights: detach restores them
    "tlora": ({"method": "tlora", "rank": 2, "targets": ["attn"], "part": "trunk"}, {}),
    "other_base": ({"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"},
                   {"size": {"trunk": {"num_blocks": 1}}}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    fasta = root / "seqs.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nGSHMLEDPVDAFQLAL\n")
    return root, fasta, [make_run(root, name, adapter, model) for name, (adapter, model) in RUNS.items()]


def test_many_runs_equal_one_at_a_time_and_build_each_base_once(runs, monkeypatch):
    root, fasta, run_dirs = runs
    for run in run_dirs:
        assert main(["predict", "--run", str(run), "--fasta", str(fasta), "--out", str(root / "one" / run.name),
                     "--no-progress"]) == 0
    built = []
    real = predict.load_base_model
    monkeypatch.setattr(predict, "load_base_model", lambda cfg: built.append(cfg["model"]) or real(cfg))
    assert main(["predict", "--run", *map(str, run_dirs), "--fasta", str(fasta),
                 "--out", str(root / "many" / "{run}" / "test"), "--no-progress"]) == 0
    assert len(built) == 2  # the tiny base (4 runs) and the 1-block base
    for run in run_dirs:
        one = pd.read_csv(root / "one" / run.name / "predictions.csv")
        many = pd.read_csv(root / "many" / run.name / "test" / "predictions.csv")
        pd.testing.assert_frame_equal(one.drop(columns="pdb"), many.drop(columns="pdb"), check_exact=True)
        for chain in one["chain_id"]:
            assert (root / "one" / run.name / f"{chain}.pdb").read_bytes() == \
                   (root / "many" / run.name / "test" / f"{chain}.pdb").read_bytes()
    plddt = {run.name: pd.read_csv(root / "one" / run.name / "predictions.csv")["mean_plddt"].tolist()
             for run in run_dirs}
    assert len({tuple(v) for v in plddt.values()}) == len(run_dirs)  # every run predicts differently


def test_out_directories_for_several_runs(runs):
    from pipeline.commands.predict import run_out_dirs

    assert run_out_dirs(["x/a"], "p") == ["p"]
    assert run_out_dirs(["x/a", "y/b"], "p") == ["p/a", "p/b"]
    assert run_out_dirs(["x/a", "y/b"], "p/{run}/test") == ["p/a/test", "p/b/test"]
    with pytest.raises(ValueError, match="same directory"):
        run_out_dirs(["x/a", "y/a"], "p")


def test_detach_restores_the_base_exactly():
    model = tiny_esmfold()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for method in ("lora", "lorta", "tlora"):
        adapters.attach(model, adapters.config_from_dict({"method": method, "rank": 2, "targets": ["attn", "mlp"]}))
        adapters.merge(model)
        adapters.detach(model)
        assert set(model.state_dict()) == set(before)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not any(isinstance(m, adapters.layer.AdapterModule) for m in model.modules())
    assert not model.trunk.blocks[0].seq_attention.proj._forward_hooks

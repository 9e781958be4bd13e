"""The training loop on real chains: overfitting, exact resume, NaN handling and the run directory."""

from __future__ import annotations

import json

import lightning.pytorch as pl

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from data.dataset import FoldingDataset, collate
from pipeline.cli import main
from pipeline.config import resolve
from pipeline.losses import folding_loss
from pipeline.predict import load_run_model
from pipeline.train import FoldingTask, _build, structure_quality, train
from tests._train_helpers import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 1l2y (20 res) + 1vii (36) train, 1psm (38) val
    root = tmp_path_factory.mktemp("ds")
    return make_dataset(root / "dataset", [("1l2y.pdb", "train"), ("1vii.pdb", "train"), ("1psm.cif", "val")])


def _cfg(dataset, out, **trainer) -> dict:
    ds, splits = dataset
    return resolve({
        "adapter": {"method": "lorta", "rank": 4, "alpha": 8, "part": "stem"},
        "model": {"train_heads": True},
        "data": {"dataset": str(ds), "splits": str(splits), "crop_size": 24, "batch_size": 2},
        "trainer": {"max_steps": 6, "lr": 5e-3, "warmup_steps": 2, "val_every_n_steps": 4,
                    "checkpoint_every_n_steps": 2, "recycles": [0, 1], "threads": 2, **trainer},
        "output_dir": str(out),
    })


def _evaluate(model, dataset, chain_ids) -> tuple[float, float, list[float], list[float]]:
    """Loss, TM-score and CA-lDDT of full-length predictions (no recycling) on `chain_ids`."""
    data = FoldingDataset(dataset[0], chain_ids, crop_size=None)
    batch = collate([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        out = model(batch["aatype"], attention_mask=batch["mask"].long(), position_ids=batch["residue_index"],
                    num_recycles=0)
        loss, terms = folding_loss(out, batch)
    quality = structure_quality(out.positions[-1][..., 1, :], batch)
    return float(loss), float(terms["fape_bb"]), quality["tm_score"], quality["lddt_ca"]


@pytest.fixture(scope="module")
def overfit_dataset(tmp_path_factory):
    # 1psm (38 residues) + 1ejg (crambin, 47): short real chains, whole chains fit in one crop
    root = tmp_path_factory.mktemp("overfit")
    return make_dataset(root / "dataset", [("1psm.cif", "train"), ("1ejg.pdb", "train")])


@pytest.mark.slow  # ~25 s on an idle 2-core CPU (100 steps), ~50 s when the machine is shared
def test_overfit_two_chains_with_stem_lorta_and_heads(overfit_dataset, tmp_path):
    """LoRTA r4 on the ESM-2 stem + the trainable folding head (`model.train_heads`: feature projection,
    structure module, heads) memorises two real chains: the loss falls and the structure gets better."""
    cfg = _cfg(overfit_dataset, tmp_path / "run", max_steps=100, lr=5e-3, warmup_steps=5, schedule="constant",
               recycles=[0, 0], val_every_n_steps=1000, checkpoint_every_n_steps=1000, threads=1)
    cfg["data"].update(crop_size=64, val_split=None)  # whole chains
    ids = ["1psm_A", "1ejg_A"]
    untrained, _ = _build(cfg)
    loss0, fape0, tm0, lddt0 = _evaluate(untrained, overfit_dataset, ids)
    result = train(cfg)
    loss1, fape1, tm1, lddt1 = _evaluate(load_run_model(result.run_dir), overfit_dataset, ids)
    print(f"overfit: loss {loss0:.3f} -> {loss1:.3f}; FAPE_bb {fape0:.3f} -> {fape1:.3f}; "
          f"TM {tm0} -> {tm1}; lDDT-CA {lddt0} -> {lddt1}")
    # Measured (100 steps, seed 0): loss 3.28 -> 1.76, FAPE_bb 0.884 -> 0.812, TM 0.057/0.084 -> 0.155/0.251,
    # CA-lDDT 0.03/0.02 -> 0.40/0.39. Margins leave room for other BLAS builds / thread timings.
    assert loss1 < 0.7 * loss0
    assert fape1 < 0.95 * fape0
    assert all(after > before + 0.05 for before, after in zip(tm0, tm1)), (tm0, tm1)
    assert sum(tm1) / 2 > sum(tm0) / 2 + 0.08
    assert min(lddt1) > 0.25 and max(lddt0) < 0.1
    assert result.summary["steps"] == 100 and result.summary["trainable_params"] < result.summary["total_params"]


class _Kill(pl.Callback):
    """Simulates the process dying after optimizer step `at` (no end-of-training checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated kill")


def test_resume_is_bitwise_identical(dataset, tmp_path):
    full = train(_cfg(dataset, tmp_path / "full"))
    # killed at step 3: the last checkpoint is the periodic one of step 2
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_cfg(dataset, tmp_path / "split"), extra_callbacks=[_Kill(3)])
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert main(["train", "--config", str(tmp_path / "split" / "config.yaml"), "--resume"]) == 0
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("trunk.structure_module") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["foldtune"]["batches_seen"] == 6
    trainable = sum(p.numel() for p in ckpt["state_dict"].values())
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert trainable == summary["trainable_params"]  # only trainable tensors are checkpointed
    metrics = pd.read_csv(tmp_path / "split" / "metrics.csv")
    assert metrics["step"].tolist() == list(range(6))  # both parts of the log kept, one row per step
    assert {"train_loss", "val_tm_score", "val_lddt_ca"} <= set(metrics.columns)
    assert (tmp_path / "split" / "checkpoints" / "best.ckpt").is_file()
    for key in ("train_seconds", "peak_memory_mb", "trainable_params", "total_params", "steps",
                "final_train_loss", "best_val_tm_score", "method", "rank", "targets", "part"):
        assert summary[key] is not None, key


def test_nonfinite_losses_skip_then_abort_cleanly(dataset, tmp_path, monkeypatch):
    cfg = _cfg(dataset, tmp_path / "nan", max_steps=20, max_bad_steps=3, val_every_n_steps=100)
    real = FoldingTask.compute_loss
    calls = {"n": 0}

    def poisoned(self, batch, num_recycles):
        total, terms, outputs = real(self, batch, num_recycles)
        if not self.training:
            return total, terms, outputs
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 5:  # one isolated NaN (skipped), then a run of them
            total = total * float("nan")
        return total, terms, outputs

    monkeypatch.setattr(FoldingTask, "compute_loss", poisoned)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        result = train(cfg)
    assert result.aborted and result.summary["status"] == "aborted_nonfinite_loss"
    # step 3 was skipped, then the abort came on the 3rd NaN in a row (steps 5, 6, 7)
    assert calls["n"] == 7 and result.summary["steps"] == 7
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # last good periodic checkpoint; step 6 (NaN) and the abort wrote none
    good = load_file(str(tmp_path / "nan" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())


def test_method_none_writes_a_run_without_training(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path / "none")
    cfg["adapter"]["method"] = "none"
    cfg["model"]["train_heads"] = False  # the untuned base: nothing trains
    result = train(cfg)
    assert result.summary["steps"] == 0 and result.summary["trainable_params"] == 0
    assert result.summary["status"] == "not_trained"
    assert (tmp_path / "none" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "none" / "config.yaml").is_file() and (tmp_path / "none" / "base.json").is_file()
    load_run_model(tmp_path / "none")  # predictable like any other run


def test_method_none_with_heads_is_the_head_only_control(dataset, tmp_path):
    """`none` + train_heads trains exactly the folding head (no adapter): the control an adapter+head run
    is compared with; its own (adapter) count is 0 and the head's is every trainable parameter."""
    from pipeline.models import head_parameters

    cfg = _cfg(dataset, tmp_path / "head", max_steps=3)
    cfg["adapter"]["method"] = "none"
    assert cfg["model"]["train_heads"]
    result = train(cfg)
    summary = result.summary
    pl.seed_everything(result.summary["seed"], verbose=False)  # the same start as train()
    heads = head_parameters(_build(cfg)[0])
    assert summary["steps"] == 3 and summary["adapter_params"] == 0
    assert summary["head_params"] == summary["trainable_params"] == sum(p.numel() for p in heads.values())
    trained = load_file(str(tmp_path / "head" / "adapter" / "adapter_model.safetensors"))
    assert set(trained) == set(heads)
    moved = [name for name in trained if not torch.equal(trained[name], heads[name].detach())]
    assert moved  # the head did train


def test_runs_record_their_chains_and_a_base_must_not_have_seen_them(dataset, tmp_path):
    from pipeline.train import check_base_is_disjoint, read_split

    cfg = _cfg(dataset, tmp_path / "base", max_steps=1)
    train(cfg)
    record = json.loads((tmp_path / "base" / "chains.json").read_text())
    assert record == {"train": sorted(read_split(cfg["data"]["splits"], cfg["data"]["train_split"])),
                      "val": sorted(read_split(cfg["data"]["splits"], cfg["data"]["val_split"]))}
    seen = record["train"][0]
    with pytest.raises(ValueError, match=f"was trained on 1 of this run's val chains \\({seen}\\)"):
        check_base_is_disjoint(tmp_path / "base", {"train": ["unseen_A"], "val": [seen]})
    check_base_is_disjoint(tmp_path / "base", {"train": ["unseen_A"], "val": record["val"]})  # monitored only


def test_existing_run_needs_resume(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path / "r", max_steps=2)
    train(cfg)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)
